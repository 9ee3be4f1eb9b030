"""Quantized modules for DDTB and PAMS, and the quantized versions of the SR residual blocks.

This module gathers :mod:`~lowbitsr.quant.qmodules` (the quantizers) and
:mod:`~lowbitsr.quant.blocks` (block wrappers, architecture swap) under one import path.

Stateful modules above the pure math of :mod:`lowbitsr.quant.functional`:

=======================  ===========================================================================
module                   what (``docs/methods.md`` section)
=======================  ===========================================================================
:class:`QuantConv2d`     ``nn.Conv2d`` whose weight is fake-quantized per tensor (§1.2, §1.8)
:class:`DDTBActQuant`    activation quantizer with two trainable bounds, optional gate (§1.1, §1.3)
:class:`DynamicGate`     the per-sample bound-scaling controller (§1.3)
:class:`PAMSActQuant`    symmetric activation quantizer with one learned clip ``alpha`` (§1.8)
:class:`QuantResBlock`   EDSR block with the §1.5 quantizer positions (or the integer layout)
:class:`QuantInputConv`  a conv with a quantized input (integer layout's upsampler and tail)
:class:`QuantSRResBlock` SRResNet block (§1.5)
:class:`QuantDenseLayer` / :class:`QuantRDB` / :class:`QuantGFF`   RDN pieces (§1.5)
=======================  ===========================================================================

The block wrappers keep the float block's conv submodules (swapped for :class:`QuantConv2d`, which
shares the float ``Parameter`` objects) under the same child names, so the float weights keep their
state-dict keys (``body.0.body.0.weight``, ``residual.3.conv1.weight``, ``RDBs.0.LFF.weight``...).
Every wrapper has ``to_float()`` that rebuilds the float block around the same parameters.

Forward passes never call ``.item()``, numpy or device APIs; control flow depends only on Python
flags and tensor shapes.
"""

from __future__ import annotations

from .blocks import (
    QuantDenseLayer,
    QuantGFF,
    QuantInputConv,
    QuantRDB,
    QuantResBlock,
    QuantSpec,
    QuantSRResBlock,
    UnsupportedModelError,
    architecture_of,
    swap_blocks,
)
from .qmodules import (
    DDTB_INIT_BOUND,
    PAMS_INIT_ALPHA,
    DDTBActQuant,
    DynamicGate,
    PAMSActQuant,
    QuantConv2d,
    WeightMode,
    conv_geometry,
)

__all__ = [
    "DDTB_INIT_BOUND",
    "PAMS_INIT_ALPHA",
    "DDTBActQuant",
    "DynamicGate",
    "PAMSActQuant",
    "QuantConv2d",
    "QuantDenseLayer",
    "QuantGFF",
    "QuantInputConv",
    "QuantRDB",
    "QuantResBlock",
    "QuantSRResBlock",
    "QuantSpec",
    "UnsupportedModelError",
    "WeightMode",
    "architecture_of",
    "conv_geometry",
    "swap_blocks",
]
