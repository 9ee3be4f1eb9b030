"""Float super-resolution architectures, their registry and checkpoint loading.

>>> from lowbitsr.models import create_model, load_weights
>>> model = create_model("edsr_baseline", scale=4)            # doctest: +SKIP
>>> load_weights(model, "edsr_baseline_x4-6b446fab.pt")       # doctest: +SKIP

Every model maps N×3×H×W float32 RGB in [0, rgb_range] (255 by default) to
N×3×(sH)×(sW) in the same range (not clamped), exposes ``forward_features(lr) -> (sr, feat)``
with the pre-upsampler feature for distillation, and carries ``model_config`` so that
``create_model(**model.model_config)`` rebuilds it. The modules know nothing about quantization.
"""

from __future__ import annotations

# Importing the architecture modules registers their variants.
from .common import MeanShift, Upsampler
from .edsr import EDSR, ResBlock, edsr_keys_from_basicsr
from .loading import canonicalize_state_dict, load_weights, read_state_dict, save_weights
from .rdn import RDB, RDN, DenseLayer
from .registry import create_model, list_models, register_model, supported_scales
from .srresnet import SRResBlock, SRResNet

__all__ = [
    "EDSR",
    "RDB",
    "RDN",
    "DenseLayer",
    "MeanShift",
    "ResBlock",
    "SRResBlock",
    "SRResNet",
    "Upsampler",
    "canonicalize_state_dict",
    "create_model",
    "edsr_keys_from_basicsr",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
    "save_weights",
    "supported_scales",
]
