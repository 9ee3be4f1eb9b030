"""lowbitsr: ultra-low-bit quantization of image super-resolution networks."""

__version__ = "0.1.0"
