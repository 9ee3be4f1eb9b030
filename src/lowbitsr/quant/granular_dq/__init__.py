"""Granular-DQ: patch-wise, layer-invariant dynamic quantization (docs/methods.md §2).

Wang et al., "Thinking in Granularity: Dynamic Quantization for Image Super-Resolution by
Intriguing Multi-Granularity Clues", AAAI 2025 (arXiv 2409.14330).

>>> from lowbitsr.models import create_model
>>> from lowbitsr.quant.granular_dq import (
...     GranularDQConfig, calibrate_granular_dq, gdq_super_resolve, quantize_granular_dq)
>>> float_model = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
>>> qmodel = quantize_granular_dq(float_model, GranularDQConfig(entropy_thresholds=(2.8, 3.18)))
>>> calibrate_granular_dq(qmodel, lr_batch)              # doctest: +SKIP  (LSQ lazy init)
>>> sr = qmodel.eval()(lr)                                # doctest: +SKIP  forward(lr) -> sr
>>> sr, bit_map = gdq_super_resolve(qmodel, lr, scale=2)  # doctest: +SKIP  §2.4 tiles

Contents, one module per concern: :mod:`.config` (:class:`GranularDQConfig`); :mod:`.model`
(model wrapper, module swap, calibration); :mod:`.tables` (the entropy table: E2B thresholds
from the training set); :mod:`.tiling` (tiled inference); :mod:`.recipe` (the training recipe).
Everything is importable from ``lowbitsr.quant.granular_dq`` as before.

What the swap does (:func:`quantize_granular_dq`): the body's convs (EDSR residual blocks, RDN
residual dense blocks, SRResNet residual blocks) become :class:`~.gdq_layers.GDQConv2d`; the head
conv is wrapped so that its output ``Z1`` feeds the bit controller; head, upsampler, tail and the
convs between blocks stay float (docs/methods.md §2.3). The float model's own
``forward_features`` runs unchanged inside :class:`GranularDQModel`.
"""

from __future__ import annotations

from .config import DEFAULT_ATC_GAMMA, OFFICIAL_ATC_GAMMA, GranularDQConfig
from .model import GranularDQModel, calibrate_granular_dq, quantize_granular_dq
from .model import _HeadTap as _HeadTap
from .rd import (
    TileMeasurements,
    fit_rd_controller,
    measure_images,
    rd_model,
    with_rd_controller,
)
from .recipe import TABLE_PATCHES, GranularDQRecipe
from .tables import (
    ENTROPY_TABLE_FORMAT,
    EntropyTable,
    build_entropy_table,
    compute_entropy_table,
    entropy_table_path,
    load_entropy_table,
    save_entropy_table,
)
from .tiling import _own_bounds as _own_bounds
from .tiling import gdq_super_resolve, gdq_tile_regions, gdq_tile_starts

__all__ = [
    "DEFAULT_ATC_GAMMA",
    "ENTROPY_TABLE_FORMAT",
    "OFFICIAL_ATC_GAMMA",
    "TABLE_PATCHES",
    "EntropyTable",
    "GranularDQConfig",
    "GranularDQModel",
    "GranularDQRecipe",
    "TileMeasurements",
    "build_entropy_table",
    "calibrate_granular_dq",
    "compute_entropy_table",
    "entropy_table_path",
    "fit_rd_controller",
    "gdq_super_resolve",
    "gdq_tile_regions",
    "gdq_tile_starts",
    "load_entropy_table",
    "measure_images",
    "quantize_granular_dq",
    "rd_model",
    "save_entropy_table",
    "with_rd_controller",
]
