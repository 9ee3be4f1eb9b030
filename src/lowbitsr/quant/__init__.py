"""Quantizers for super-resolution networks: pure math in :mod:`lowbitsr.quant.functional`."""
