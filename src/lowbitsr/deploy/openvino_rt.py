"""OpenVINO inference of exported SR models (the optional ``openvino`` extra).

:class:`OpenVinoSR` compiles a file written by :func:`~lowbitsr.deploy.onnx_export.export_onnx`
(best with ``target="openvino"``) for OpenVINO's CPU plugin and has the interface of
:class:`~lowbitsr.deploy.runtime.OnnxSR` (``scale``, ``rgb_range``, ``quant``, ``__call__``), so
:func:`~lowbitsr.deploy.runtime.upscale_image_onnx` tiles with it unchanged. OpenVINO reads the
QuantizeLinear/DequantizeLinear pairs as FakeQuantize and runs the convs between them on its int8
kernels (AMX or VNNI where the CPU has them).

The inference precision is set to f32 explicitly: on CPUs with AMX-bf16 OpenVINO's default is
bf16, which changes the float parts' numbers (and, measured here, is slower for these graphs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError

__all__ = ["OpenVinoSR", "openvino_available"]


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise LowbitsrError(
            f"{path}: not a readable .onnx file ({type(exc).__name__}); write one with "
            "'lowbitsr export'"
        ) from exc
    return {p.key: p.value for p in proto.metadata_props}


class OpenVinoSR:
    """An exported SR model compiled by OpenVINO for the CPU.

    Args:
        path: ``.onnx`` file from :func:`~lowbitsr.deploy.onnx_export.export_onnx`.
        threads: inference threads (None: OpenVINO's default).
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``"f32"`` by default; ``"bf16"``
            is its default on AMX CPUs and changes the float parts' numbers).

    Attributes:
        scale, rgb_range, quant: from the file's metadata, as in
            :class:`~lowbitsr.deploy.runtime.OnnxSR`.
        compiled: the ``openvino.CompiledModel``.

    Raises:
        LowbitsrError: missing file, no lowbitsr metadata, a Granular-DQ export (not supported
            on this backend) or a file OpenVINO cannot read.
        ImportError: openvino is not installed (``pip install 'lowbitsr[openvino]'``).
    """

    granular_dq = False

    def __init__(
        self, path: str | Path, *, threads: int | None = None, precision: str = "f32"
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ImportError(
                "the OpenVINO backend needs the openvino package: pip install openvino "
                "(or the 'openvino' extra of lowbitsr)"
            ) from exc
        p = Path(path)
        if not p.is_file():
            raise LowbitsrError(f"{p}: ONNX model not found; write one with 'lowbitsr export'")
        meta = _metadata(p)
        self.scale = int(meta.get("lowbitsr.scale", "0"))
        self.rgb_range = float(meta.get("lowbitsr.rgb_range", "255"))
        self.quant: dict | None = json.loads(meta.get("lowbitsr.quant") or "null")
        if self.scale <= 0:
            raise LowbitsrError(
                f"{p}: no 'lowbitsr.scale' metadata; export the model with 'lowbitsr export'"
            )
        if (self.quant or {}).get("method") == "granular_dq":
            raise LowbitsrError(
                f"{p}: a Granular-DQ export; the OpenVINO backend runs float, DDTB and PAMS "
                "exports (use --backend onnx for Granular-DQ)"
            )
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(p), "CPU", config)
        except Exception as exc:  # RuntimeError with a long multi-line message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LowbitsrError(f"{p}: OpenVINO cannot compile it ({first})") from exc
        self._request = self.compiled.create_infer_request()

    def __call__(self, lr: np.ndarray, bits: Any = None) -> np.ndarray:
        """N×3×H×W float32 in [0, rgb_range] → N×3×(sH)×(sW) float32 (not clamped)."""
        if bits is not None:
            raise ValueError("OpenVinoSR: bits are only for Granular-DQ exports")
        x = np.ascontiguousarray(lr, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"OpenVinoSR: expected an N×3×H×W array, got shape {x.shape}")
        out = self._request.infer({0: x})
        return np.array(next(iter(out.values())), dtype=np.float32, copy=True)
