"""Small pretrained weights shipped with the package (trained by configs in this repo).

Each model is ``<name>.safetensors`` + ``<name>.json`` in this folder; the JSON records the
architecture, the quantization config (if any) and the command and metrics of the run that made it.
Names follow the configs: ``<arch>_x<scale>_fp`` and ``<arch>_x<scale>_<method>_w<k>a<k>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError

__all__ = ["list_pretrained", "load_pretrained", "pretrained_info"]

_DIR = Path(__file__).resolve().parent


def list_pretrained() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted(p.stem for p in _DIR.glob("*.json") if p.with_suffix(".safetensors").is_file())


def pretrained_info(name: str) -> dict[str, Any]:
    """The JSON header of a shipped model (architecture, quant config, training metadata)."""
    path = _DIR / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(
            f"no pretrained model named {name!r}; "
            f"available: {', '.join(list_pretrained()) or 'none'}"
        )
    return json.loads(path.read_text())


def load_pretrained(name: str) -> nn.Module:
    """Load a shipped model by name, ready for inference (eval mode, CPU).

    Input convention: (N, 3, H, W) float RGB in [0, 255]; output (N, 3, sH, sW) in [0, 255].
    """
    from ..checkpoint import load_model
    from ..quant.packed import PACKED_FORMAT, load_packed

    # pretrained_info raises a helpful error for unknown names
    if pretrained_info(name).get("format") == PACKED_FORMAT:
        # quantized weights shipped as bit-packed integer codes (a few times smaller)
        return load_packed(_DIR / name)
    return load_model(_DIR / name)
