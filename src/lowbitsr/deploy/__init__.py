"""Deployment: integer artifacts, ONNX export and onnxruntime inference (issue #5).

* :mod:`~lowbitsr.deploy.pack`: :func:`save_packed` / :func:`load_packed` — a DDTB or PAMS model
  frozen into bit-packed k-bit weight codes in one safetensors file (bit-exact round trip).
* :mod:`~lowbitsr.deploy.onnx_export`: :func:`export_onnx` — float models as plain ONNX,
  static-bit DDTB/PAMS layers as QCDQ (QuantizeLinear → Clip → DequantizeLinear) with int8
  weight initializers, gated DDTB layers and Granular-DQ's per-tile bits as float ops;
  optional onnxruntime parity check.
* :mod:`~lowbitsr.deploy.runtime`: :class:`OnnxSR`, the tiled :func:`upscale_image_onnx` and
  :func:`upscale_image_gdq_onnx` (Granular-DQ tiles at mixed bits in one batch).
* :mod:`~lowbitsr.deploy.openvino_rt`: :class:`OpenVinoSR`, the same exports compiled by
  OpenVINO (``pip install lowbitsr[openvino]``).
* :mod:`~lowbitsr.deploy.torch_int8`: :func:`to_torch_int8`, an integer-layout DDTB/PAMS model
  as PyTorch quantized (x86/oneDNN) kernels.

The ONNX parts import ``onnx``/``onnxruntime`` lazily (``pip install lowbitsr[deploy]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .pack import (
    PackedConv2d,
    PackError,
    WeightCodes,
    convert,
    format_size_report,
    is_packed_file,
    load_packed,
    save_packed,
    size_report,
    weight_codes,
)

if TYPE_CHECKING:
    from .onnx_export import ExportReport, export_onnx
    from .openvino_rt import OpenVinoSR
    from .runtime import OnnxSR, upscale_image_gdq_onnx, upscale_image_onnx
    from .torch_int8 import TorchInt8SR, to_torch_int8

__all__ = [
    "ExportReport",
    "OnnxSR",
    "OpenVinoSR",
    "PackError",
    "PackedConv2d",
    "TorchInt8SR",
    "WeightCodes",
    "convert",
    "export_onnx",
    "format_size_report",
    "is_packed_file",
    "load_packed",
    "save_packed",
    "size_report",
    "to_torch_int8",
    "upscale_image_gdq_onnx",
    "upscale_image_onnx",
    "weight_codes",
]

_LAZY = {
    "ExportReport": "onnx_export",
    "export_onnx": "onnx_export",
    "OnnxSR": "runtime",
    "upscale_image_onnx": "runtime",
    "upscale_image_gdq_onnx": "runtime",
    "OpenVinoSR": "openvino_rt",
    "TorchInt8SR": "torch_int8",
    "to_torch_int8": "torch_int8",
}


def __getattr__(name: str) -> Any:
    # onnx/onnxruntime are optional: import the modules that need them on first use only.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
