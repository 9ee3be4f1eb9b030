"""The ONNX graph builder of the exporter: node and initializer bookkeeping, static
quantizer parameters, :class:`ExportError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import LowbitsrError
from ...quant.granular_dq.model import GranularDQModel


class ExportError(LowbitsrError):
    """The model cannot be exported to ONNX (unknown architecture or module, bad settings)."""


# ------------------------------------------------------------------------------ graph builder
@dataclass(frozen=True)
class _QParams:
    """A static activation quantizer's ONNX form: ``x ≈ (code - zero) * step``, int8 code."""

    step: float
    zero: int
    container: str = "uint8"
    hi: int = 255  # largest container code (the Clip's upper end)


class _Graph:
    """Accumulates nodes and initializers; names are unique and derived from module names."""

    def __init__(self, opset: int, container: str) -> None:
        import onnx

        self.onnx = onnx
        self.opset = opset
        self.container = container
        self.integer_convs = True
        self.float_weights = True
        self.pixel_shuffle = "transpose"
        self.per_sample_qdq = True
        # OpenVINO target: Min(DQ(codes), top grid value) before a skip Add (exact no-op)
        self.skip_guard = False
        # Granular-DQ: the model, and the [N] int64 candidate index of each sample (set at the
        # head, read by every GDQ quantizer)
        self.gdq: GranularDQModel | None = None
        self.gdq_sel: str | None = None
        self.gdq_bits: str | None = None
        self.report_gdq: dict[str, Any] = {}
        # name -> (m_upper, m_lower) of gated DDTB layers exported static (opt-in); None = off
        self.static_gates: dict[str, tuple[float, float]] | None = None
        self.report_static_gates: dict[str, tuple[float, float]] = {}
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._names: Counter[str] = Counter()
        self._consts: dict[tuple[str, Any], str] = {}
        self.report_int_weights: list[str] = []
        self.report_qcdq: list[str] = []
        self.report_float_q: dict[str, str] = {}
        self.report_fusable: list[str] = []

    def fresh(self, base: str) -> str:
        base = base or "t"
        self._names[base] += 1
        n = self._names[base]
        return base if n == 1 else f"{base}_{n}"

    def init(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.inits.append(
            self.onnx.numpy_helper.from_array(np.asarray(array).copy(order="C"), name)
        )
        return name

    def const(self, value: float | int | Sequence[int], dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes() + bytes(str(arr.shape), "ascii"))
        if key not in self._consts:
            self._consts[key] = self.init(arr, "const")
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], base: str = "", **attrs: Any) -> str:
        out = self.fresh(f"{base}/{op_type}" if base else op_type)
        self.nodes.append(
            self.onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attrs)
        )
        return out


def _f32(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()
