"""Integer artifacts: freeze a trained DDTB or PAMS fake-quant model into bit-packed k-bit codes.

The file format (tensors, code schemes, bit packing, metadata) and the reader
(:func:`load_packed`) are documented and implemented in :mod:`lowbitsr.quant.packed`; this module
writes packed files (:func:`convert`, :func:`save_packed`) and reports their sizes, and re-exports
the reader so ``lowbitsr.deploy.pack`` offers the whole format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import Tensor, nn

from ..fileio import atomic_write
from ..quant.layers import DDTBActQuant
from ..quant.packed import (
    _PACKING_RULES,
    PACKED_FORMAT,
    PACKED_VERSION,
    PackedConv2d,
    PackError,
    WeightCodes,
    _all_quant_convs,
    is_packed_file,
    load_packed,
    pack_codes,
    packed_path,
    unpack_codes,
    weight_codes,
)

__all__ = [
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "PackError",
    "PackedConv2d",
    "WeightCodes",
    "convert",
    "format_size_report",
    "is_packed_file",
    "load_packed",
    "pack_codes",
    "packed_path",
    "save_packed",
    "size_report",
    "unpack_codes",
    "weight_codes",
]


def _check_packable(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = getattr(model, "model_config", None)
    quant = getattr(model, "quant_config_dict", None)
    if not isinstance(cfg, Mapping):
        raise PackError(
            "convert: the model has no model_config; build it with lowbitsr.create_model and "
            "quantize it with lowbitsr.quant.quantize (or load it with lowbitsr.load_model)"
        )
    if not isinstance(quant, Mapping) or quant.get("method") not in ("ddtb", "pams"):
        what = "a float model" if quant is None else f"method {quant.get('method')!r}"
        raise PackError(
            f"convert: packing needs a DDTB or PAMS quantized model, got {what}; quantize it "
            "with lowbitsr.quant.quantize(model, DDTBConfig(bits=...)) and calibrate/train first"
        )
    return dict(cfg), dict(quant)


def convert(model: nn.Module) -> dict[str, Any]:
    """Freeze a DDTB or PAMS fake-quant model into bit-packed tensors and a JSON layout.

    Args:
        model: a quantized model (:func:`lowbitsr.quant.quantize` + calibration/training, or
            :func:`lowbitsr.load_model` of a saved one, or :func:`load_packed`), any device.

    Returns:
        ``{"tensors": {key: CPU tensor}, "metadata": {str: str}, "layout": dict}``: the
        safetensors payload (module docstring) and the parsed layout.

    Raises:
        PackError: not a DDTB/PAMS model of :mod:`lowbitsr.models`, or a weight whose codes do
            not reproduce it exactly.
    """
    cfg, quant = _check_packable(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, conv in _all_quant_convs(model):
        key = f"{name}.weight"
        codes = weight_codes(conv)
        if codes.scheme == "float":
            continue  # stays in the state dict as float32
        del state[key]
        u = (codes.codes.to(torch.int64) - codes.qmin).numpy()
        pack_bits = max(codes.bits, int(u.max()).bit_length() if u.size else 1)
        tensors[f"{key}.packed"] = torch.from_numpy(pack_codes(u, pack_bits))
        tensors[f"{key}.scale"] = codes.scale.detach().cpu().to(torch.float32).reshape(1)
        if codes.zero_point is not None:
            tensors[f"{key}.zero_point"] = codes.zero_point.cpu().to(torch.float32).reshape(1)
        entries[key] = {
            "scheme": codes.scheme,
            "bits": codes.bits,
            "pack_bits": pack_bits,
            "qmin": codes.qmin,
            "shape": list(conv.weight.shape),
            "count": conv.weight.numel(),
        }
    for k, v in state.items():
        t = v.to(torch.float32) if v.is_floating_point() else v
        tensors[k] = t.clone().contiguous()
    ddtb = [(n, q) for n, q in model.named_modules() if isinstance(q, DDTBActQuant)]
    layout = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "model": cfg,
        "quant": quant,
        "gated": [n for n, q in ddtb if q.gate is not None],
        "gate_applied": {n: bool(q.gate_applied) for n, q in ddtb if q.gate is not None},
        "packing": _PACKING_RULES,
        "tensors": entries,
    }
    metadata = {
        "format": PACKED_FORMAT,
        "version": str(PACKED_VERSION),
        "layout": json.dumps(layout, sort_keys=True),
    }
    return {"tensors": tensors, "metadata": metadata, "layout": layout}


def save_packed(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write :func:`convert`'s payload to one safetensors file (atomically).

    Args:
        model: see :func:`convert`.
        path: output file (``.safetensors`` appended when missing).

    Returns:
        :func:`size_report` of the model plus ``path`` (str) and ``file_bytes`` (on disk).
    """
    payload = convert(model)
    out = packed_path(path)
    atomic_write(out, lambda t: save_file(payload["tensors"], str(t), metadata=payload["metadata"]))
    report = size_report(model, payload=payload)
    report["path"] = str(out)
    report["file_bytes"] = out.stat().st_size
    return report


def format_size_report(report: Mapping[str, Any]) -> str:
    """One human line for :func:`save_packed`'s (or :func:`size_report`'s) result."""
    where = f"{report['path']}: " if "path" in report else ""
    return (
        f"{where}{report['packed_bytes'] / 1024:.1f} KB packed {report['bits']}-bit vs "
        f"{report['fp32_bytes'] / 1024:.1f} KB float32 ({report['ratio']:.3f}); body "
        f"{report['body_packed_bytes'] / 1024:.1f} KB vs {report['body_fp32_bytes'] / 1024:.1f} KB "
        f"(1/{1 / report['body_ratio']:.2f})"
    )


# ------------------------------------------------------------------------------- sizes
def size_report(model: nn.Module, *, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Bytes of the packed artifact vs the float32 safetensors of the same network.

    Args:
        model: a DDTB/PAMS model (see :func:`convert`).
        payload: :func:`convert`'s output, if already computed.

    Returns:
        ``packed_bytes`` / ``fp32_bytes``: serialised safetensors sizes (headers included) of
        the packed file and of the float state dict (what :func:`lowbitsr.save_model` writes);
        ``ratio`` = packed/fp32; ``body_packed_bytes`` / ``body_fp32_bytes``: data bytes of the
        body's quantized conv weights (packed codes + scale + zero point vs ``numel * 4``; gate
        convs and biases excluded); ``body_ratio``; ``bits``.
    """
    from ..quant import quantized_convs

    payload = payload if payload is not None else convert(model)
    tensors: Mapping[str, Tensor] = payload["tensors"]
    packed_bytes = len(st_save(dict(tensors), metadata=payload["metadata"]))
    fp32_state = {
        k: (v.detach().cpu().to(torch.float32) if v.is_floating_point() else v.detach().cpu())
        .clone()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    fp32_bytes = len(st_save(fp32_state, metadata={"format": "lowbitsr-model"}))
    body_packed = body_fp32 = 0
    for name, conv in quantized_convs(model):
        key = f"{name}.weight"
        body_fp32 += conv.weight.numel() * 4
        if f"{key}.packed" in tensors:
            body_packed += sum(
                tensors[f"{key}{sfx}"].numel() * tensors[f"{key}{sfx}"].element_size()
                for sfx in (".packed", ".scale", ".zero_point")
                if f"{key}{sfx}" in tensors
            )
        else:
            body_packed += conv.weight.numel() * 4
    return {
        "bits": payload["layout"]["quant"].get("bits"),
        "packed_bytes": packed_bytes,
        "fp32_bytes": fp32_bytes,
        "ratio": packed_bytes / fp32_bytes,
        "body_packed_bytes": body_packed,
        "body_fp32_bytes": body_fp32,
        "body_ratio": body_packed / body_fp32 if body_fp32 else float("nan"),
    }
