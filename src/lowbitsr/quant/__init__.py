"""Quantization of SR networks by module swap: DDTB, PAMS, Granular-DQ (and the pure math).

* :mod:`~lowbitsr.quant.functional`: pure fake-quant functions with straight-through gradients.
* :mod:`~lowbitsr.quant.layers`: quantized conv / activation / gate modules
  (:mod:`~lowbitsr.quant.qmodules`) and block wrappers (:mod:`~lowbitsr.quant.blocks`).
* one module per method: :mod:`~lowbitsr.quant.ddtb`, :mod:`~lowbitsr.quant.pams`,
  :mod:`~lowbitsr.quant.granular_dq` (a package; layers in :mod:`~lowbitsr.quant.gdq_layers`).
* :func:`quantize` (``{config type -> transform}`` table), :func:`calibrate`, trainer helpers.
* :mod:`~lowbitsr.quant.recipes`: QAT with distillation for the shared training loop, through
  the :class:`lowbitsr.recipe.Recipe` interface (this package never imports the loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .apply import (
    bound_parameters,
    config_from_dict,
    config_to_dict,
    dequantize,
    gate_parameters,
    gate_regularizer,
    is_quantized,
    quantize,
    quantized_convs,
    quantizers,
    set_gates_applied,
)
from .calibrate import attach_gates, calibrate, gated_layer_names
from .ddtb import DDTBConfig
from .granular_dq import GranularDQConfig, gdq_super_resolve, quantize_granular_dq
from .pams import PAMSConfig

if TYPE_CHECKING:
    from ..config import ExperimentConfig
    from ..recipe import Recipe

__all__ = [
    "DDTBConfig",
    "GranularDQConfig",
    "PAMSConfig",
    "attach_gates",
    "bound_parameters",
    "calibrate",
    "config_from_dict",
    "config_to_dict",
    "dequantize",
    "gate_parameters",
    "gate_regularizer",
    "gated_layer_names",
    "gdq_super_resolve",
    "is_quantized",
    "quantize",
    "quantize_granular_dq",
    "quantized_convs",
    "quantizers",
    "recipe_for",
    "set_gates_applied",
]


def recipe_for(cfg: ExperimentConfig) -> Recipe:
    """The training recipe for ``cfg.quant`` (its ``method`` key)."""
    if (cfg.quant or {}).get("method") == GranularDQConfig.method:
        from .granular_dq import GranularDQRecipe

        return GranularDQRecipe(cfg)
    from .recipes import QATRecipe

    return QATRecipe(cfg)
