"""ONNX export of float and DDTB/PAMS-quantized SR models, with an onnxruntime parity check.

Route: a graph builder (``onnx.helper``) over the architectures of :mod:`lowbitsr.models` (EDSR,
SRResNet, RDN) and their quantized wrappers, reading the model's own tensors; no tracing. Every
graph has one input ``lr`` (``N×3×H×W`` float32 in [0, rgb_range], N/H/W dynamic) and one output
``sr`` (``N×3×sH×sW``, not clamped), and carries the model/quant configs as metadata
(``lowbitsr.model``, ``lowbitsr.quant``, ``lowbitsr.scale``, ``lowbitsr.rgb_range``).

What each part becomes
----------------------

- **Float parts** (mean shifts, head, tail/upsampler, the last body conv, BN, PReLU, skips):
  float32 ``Conv``/``BatchNormalization``/``PRelu``/``DepthToSpace`` (CRD)/``Add``.
- **Static activation quantizers** (DDTB without a gate or with ``gate_applied=False``; PAMS):
  QCDQ, ``QuantizeLinear → Clip → DequantizeLinear``, Clip at the k-bit code range. The code
  container is uint8 by default (``act_container``): x86 onnxruntime fuses only u8 activations ×
  s8 weights into integer kernels (int8 activations only on ARM). DDTB: ``scale = fl(1/s)``,
  ``zero_point = 2**(k-1) - zp`` (for ``lower <= 0``), codes ``q + 2**(k-1)`` clipped to
  ``[0, 2**k - 1]`` (``2**k`` at the top in official compat, whose codes are not clamped); with
  the int8 container ``zero_point = -zp`` and ``q`` itself. PAMS: ``scale = alpha/qmax``, codes
  ``j + 2**(k-1)`` in ``[1, 2**k - 1]``. Clipping the code equals clipping ``x`` to the bounds
  first (rounding is monotone and the bound codes are the range ends).
- **Quantized conv weights** (DDTB §1.2, PAMS §1.8, per tensor): an **int8 initializer** +
  ``DequantizeLinear``. Canonical form: the k-bit codes ``q`` with DDTB ``scale = fl(1/s)``,
  ``zero_point = -zp``, PAMS/ternary ``scale = m/qmax``, ``zero_point = 0``. EDSR's
  ``res_scale`` is folded into conv2's weight scale and bias.
- **Integer convs** (``integer_convs=True``, default): a conv between two static quantizers (EDSR
  conv2 of every block whose ``quant_act2`` and ``quant_act3`` are static) gets an int32 bias at
  ``x_scale·w_scale`` (required by ``QLinearConv``) and zero-point-free weights: the grid index
  ``q + zp`` times ``M = 127 // max|q + zp|`` at ``scale/M`` (the same weights; the bias step is
  M times finer). onnxruntime's QDQ optimizer then runs ``DQ → Conv → Q`` as an **integer
  QLinearConv** (u8 × s8 → int32 accumulation → requantized u8 codes);
  :attr:`ExportReport.optimized_ops` lists what it actually produced. The bias rounding (at most
  ``x_scale·w_scale/(2M)``, which the fake-quant model does not have) is the one numerical change
  integer inference brings: it flips an output code wherever the float conv output lies that
  close to a rounding tie (see Parity). ``integer_convs=False`` keeps these convs float.
- **Every other quantized conv** (EDSR conv1, which by the DDTB/PAMS layout sees the unquantized
  block input; SRResNet/RDN convs, followed by BN/PReLU/ReLU/concat rather than a quantizer;
  convs after a gated quantizer) is a float ``Conv`` on the dequantized int8 initializer, its
  bias added by a separate ``Add`` so that onnxruntime does not round it to int32: the k-bit codes
  are what is stored and shipped, the arithmetic is float32.
- **Gated DDTB quantizers** (§1.3, per-sample bounds): float ops. Gate:
  ``GlobalAveragePool → Q2`` (per-sample ``ReduceMin``/``ReduceMax``, ``Round``, ``Div``,
  ``Where``) ``→`` 1×1 ternary conv (int8 initializer + DequantizeLinear, float ``Conv``) ``→``
  BN (PyTorch's CPU arithmetic: ``fma(x, alpha, beta)`` emulated in float64) ``→ Relu → Q2 →``
  1×1 ternary conv ``→ 2·Sigmoid``; quantizer ``Max(Min(x, u_n), l_n)``,
  ``s = (2**k - 1)·Reciprocal(u_n - l_n)``, ``zp = Round(s·l_n) + 2**(k-1)``,
  ``Clip(Round(a·s - zp))``, ``(q + zp) / s`` — §1.1 in PyTorch's operation order.

Parity (float32, CPU) and its bound
-----------------------------------

QuantizeLinear computes ``round(x / fl(1/s))`` where PyTorch computes ``round(fl(s·a) - zp)``. The
two arguments differ by at most about ``(2**(k-1) + |zp|)·2**-22``, so a code can differ — by
exactly one step ``1/s`` — only for inputs that close to a rounding tie (measured: under 1e-3 of
uniform inputs; none in the parity check of ``edsr_tiny_x4_fp`` calibrated at 4 bits); dequantized
values otherwise differ by about one float32 ulp. With ``integer_convs=False`` the export
reproduces PyTorch to float32 noise (max abs diff < 1e-2 on the 0–255 scale, measured ~1e-4).
Integer convs add the int32 bias rounding above; a flipped code is a whole quantization step and
propagates, so their parity is reported as PSNR between onnxruntime and PyTorch (tests: ≥ 40 dB on
tiny models; see the bench for trained ones). Gated layers follow PyTorch's order exactly, but
reductions and convs sum in a different order (ulp-level); a gate whose ``Q2`` input sits on a
rounding tie (systematic for freshly attached, untrained gates: identity BN after ternary weights)
can then take the other decision, which changes that sample's whole quantization grid.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import LowbitsrError
from ..models.common import MeanShift
from ..models.edsr import EDSR, ResBlock
from ..models.rdn import RDB, RDN, DenseLayer
from ..models.srresnet import SRResBlock, SRResNet
from ..quant.functional import asym_quant_params, asym_quantize_codes
from ..quant.layers import (
    DDTBActQuant,
    DynamicGate,
    PAMSActQuant,
    QuantConv2d,
    QuantDenseLayer,
    QuantGFF,
    QuantRDB,
    QuantResBlock,
    QuantSRResBlock,
)
from .pack import weight_codes

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportReport", "export_onnx", "parity"]

DEFAULT_OPSET = 17
_INT8_MIN, _INT8_MAX = -128, 127


class ExportError(LowbitsrError):
    """The model cannot be exported to ONNX (unknown architecture or module, bad settings)."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: the ``.onnx`` file.
        opset: ONNX opset of the default domain.
        node_counts: op type → count in the exported graph.
        integer_weights: quantized convs stored as int8 codes + DequantizeLinear.
        qcdq_quantizers: activation quantizers exported as QuantizeLinear → Clip → Dequantize.
        float_quantizers: activation quantizers exported as float ops (gated DDTB layers), with
            the reason.
        fusable_convs: convs between two QCDQ quantizers (candidates for ``QLinearConv``).
        optimized_ops: op type (``domain:op`` outside the default domain) → count in
            onnxruntime's optimized graph (``SessionOptions.optimized_model_filepath``); empty
            when ``check`` was off.
        parity: per checked input, ``{"shape", "max_abs_diff", "psnr"}`` between onnxruntime
            (CPUExecutionProvider) and PyTorch on the same input.
    """

    path: str
    opset: int
    node_counts: dict[str, int]
    integer_weights: list[str] = field(default_factory=list)
    qcdq_quantizers: list[str] = field(default_factory=list)
    float_quantizers: dict[str, str] = field(default_factory=dict)
    fusable_convs: list[str] = field(default_factory=list)
    optimized_ops: dict[str, int] = field(default_factory=dict)
    parity: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """A few human lines: what was written, what is integer, parity."""
        fused = sum(v for k, v in self.optimized_ops.items() if "QLinear" in k)
        lines = [
            f"{self.path}: opset {self.opset}, {sum(self.node_counts.values())} nodes; "
            f"{len(self.integer_weights)} int8-coded conv weights, {len(self.qcdq_quantizers)} "
            f"QCDQ activation quantizers, {len(self.float_quantizers)} float-op (gated) ones"
        ]
        if self.optimized_ops:
            lines.append(
                f"onnxruntime runs {fused} conv(s) as integer QLinearConv "
                f"({len(self.fusable_convs)} prepared)"
            )
        for p in self.parity:
            lines.append(
                f"parity {'x'.join(map(str, p['shape']))}: max |ort - torch| "
                f"{p['max_abs_diff']:.3g}, PSNR {p['psnr']:.1f} dB"
            )
        return "\n".join(lines)


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


# ------------------------------------------------------------------------------ layers
def _conv(
    g: _Graph,
    x: str,
    conv: nn.Module,
    name: str,
    *,
    in_q: _QParams | None = None,
    fuse: bool = False,
    post_scale: float = 1.0,
) -> str:
    """``Conv`` of a float, quantized or mean-shift conv; ``post_scale`` multiplies the output
    (folded into the weight scale and bias); ``fuse`` (with ``in_q``) quantizes the bias to
    int32 at ``x_scale * w_scale`` for onnxruntime's QLinearConv fusion."""
    if isinstance(conv, MeanShift):
        w = g.init(_f32(conv.weight), f"{name}.weight")
        b = g.init(_f32(conv.bias), f"{name}.bias")
        return g.op("Conv", [x, w, b], name, kernel_shape=[1, 1])
    if not isinstance(conv, nn.Conv2d):
        raise ExportError(f"{name}: cannot export a {type(conv).__name__} as a convolution")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ExportError(f"{name}: only zero padding given as integers is supported")
    attrs = {
        "kernel_shape": list(conv.kernel_size),
        "strides": list(conv.stride),
        "dilations": list(conv.dilation),
        "group": conv.groups,
        "pads": [conv.padding[0], conv.padding[1], conv.padding[0], conv.padding[1]],
    }
    bias = conv.bias
    codes = None
    if isinstance(conv, QuantConv2d) and conv.enabled:
        codes = weight_codes(conv)
        if codes.scheme == "float":
            codes = None
    if codes is None:
        w_np = _f32(conv.weight if not isinstance(conv, QuantConv2d) else conv.quantized_weight())
        if post_scale != 1.0:
            w_np = w_np * np.float32(post_scale)
        w = g.init(w_np, f"{name}.weight")
        w_step = None
    else:
        step, zero = codes.step_and_zero()
        q = codes.codes.cpu().numpy().astype(np.int64)
        grid = q - zero
        peak = max(1, int(np.abs(grid).max()))
        if fuse and in_q is not None and peak <= 127:
            # Integer conv: zero-point-free grid indices (``q - zero``, so onnxruntime can use its
            # symmetric-weight kernels) times M, at step/M. Same weights; the int32 bias step
            # x_scale * w_scale becomes M times finer, so its rounding moves the conv output M
            # times less. M keeps |stored| <= 127 and the u8*s8 pair sums of AVX2 below 2**15.
            mult = max(1, min(127 // peak, 32767 // (2 * max(1, in_q.hi) * peak)))
            stored, w_zero, w_step = grid * mult, 0, step * post_scale / mult
        else:
            stored, w_zero, w_step = q, zero, step * post_scale
        w_step = float(np.float32(w_step))
        wq = g.init(stored.astype(np.int8), f"{name}.weight_codes")
        w = g.op(
            "DequantizeLinear",
            [wq, g.const(w_step), g.const(w_zero, np.int8)],
            f"{name}.weight",
        )
        g.report_int_weights.append(name)
    inputs = [x, w]
    if bias is not None:
        b_np = _f32(bias) * np.float32(post_scale)
        if fuse and in_q is not None and w_step is not None:
            b_step = np.float32(in_q.step) * np.float32(w_step)
            bq = np.round(b_np.astype(np.float64) / float(b_step))
            if np.all(np.abs(bq) < 2**31 - 1):
                bq_name = g.init(bq.astype(np.int32), f"{name}.bias_codes")
                inputs.append(
                    g.op(
                        "DequantizeLinear",
                        [bq_name, g.const(float(b_step)), g.const(0, np.int32)],
                        f"{name}.bias",
                    )
                )
                g.report_fusable.append(name)
            else:
                inputs.append(g.init(b_np, f"{name}.bias"))
        elif in_q is not None and codes is not None:
            # A float bias on a DQ -> Conv would be rounded to int32 by onnxruntime's own
            # bias quantization; adding it after the conv keeps the conv float and exact.
            y = g.op("Conv", inputs, name, **attrs)
            shape = (1, -1) + (1,) * (len(conv.kernel_size))
            return g.op("Add", [y, g.init(b_np.reshape(shape), f"{name}.bias")], name)
        else:
            inputs.append(g.init(b_np, f"{name}.bias"))
    elif fuse and in_q is not None and w_step is not None:
        g.report_fusable.append(name)
    return g.op("Conv", inputs, name, **attrs)


def _bn(g: _Graph, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{name}: BatchNorm without running statistics cannot be exported")
    c = bn.num_features
    w = _f32(bn.weight) if bn.weight is not None else np.ones(c, np.float32)
    b = _f32(bn.bias) if bn.bias is not None else np.zeros(c, np.float32)
    ins = [
        x,
        g.init(w, f"{name}.weight"),
        g.init(b, f"{name}.bias"),
        g.init(_f32(bn.running_mean), f"{name}.running_mean"),
        g.init(_f32(bn.running_var), f"{name}.running_var"),
    ]
    return g.op("BatchNormalization", ins, name, epsilon=float(bn.eps))


def _bn_torch_order(g: _Graph, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    """Eval BatchNorm in PyTorch's CPU arithmetic: ``invstd = 1/sqrt(var + eps)``,
    ``alpha = w * invstd``, ``beta = fma(-mean, alpha, b)`` (float32 each), ``out = fma(x, alpha,
    beta)``; the fused multiply-add is emulated in float64 (``x * alpha`` is exact there), so only
    a double rounding can differ. Used in the gates, whose ``Q2`` sits on a lattice of values
    where a one-ulp BN difference would flip rounding ties."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{name}: BatchNorm without running statistics cannot be exported")
    c = bn.num_features
    var = bn.running_var.detach().cpu().to(torch.float32)
    invstd = 1.0 / torch.sqrt(var + bn.eps)
    w = bn.weight.detach().cpu().float() if bn.weight is not None else torch.ones(c)
    b = bn.bias.detach().cpu().float() if bn.bias is not None else torch.zeros(c)
    alpha = (w * invstd).double()
    beta = (b.double() - bn.running_mean.detach().cpu().double() * alpha).float().double()
    shape = (1, c, 1, 1)
    x64 = g.op("Cast", [x], name, to=11)  # DOUBLE
    y = g.op("Mul", [x64, g.init(alpha.numpy().reshape(shape), f"{name}.alpha")], name)
    y = g.op("Add", [y, g.init(beta.numpy().reshape(shape), f"{name}.beta")], name)
    return g.op("Cast", [y], name, to=1)  # FLOAT


def _prelu(g: _Graph, x: str, act: nn.PReLU, name: str) -> str:
    slope = _f32(act.weight)
    if slope.size > 1:
        slope = slope.reshape(-1, 1, 1)
    return g.op("PRelu", [x, g.init(slope, f"{name}.weight")], name)


def _seq(g: _Graph, x: str, mod: nn.Module, name: str) -> str:
    """Float modules: Conv2d, PixelShuffle, ReLU, PReLU, BatchNorm2d, MeanShift, Sequential."""
    if isinstance(mod, nn.Sequential):
        for child_name, child in mod.named_children():
            x = _seq(g, x, child, f"{name}.{child_name}")
        return x
    if isinstance(mod, (nn.Conv2d, MeanShift)):
        return _conv(g, x, mod, name)
    if isinstance(mod, nn.PixelShuffle):
        return g.op("DepthToSpace", [x], name, blocksize=mod.upscale_factor, mode="CRD")
    if isinstance(mod, nn.ReLU):
        return g.op("Relu", [x], name)
    if isinstance(mod, nn.PReLU):
        return _prelu(g, x, mod, name)
    if isinstance(mod, nn.BatchNorm2d):
        return _bn(g, x, mod, name)
    raise ExportError(
        f"{name}: no ONNX export for a {type(mod).__name__}; supported models are those of "
        "lowbitsr.models (EDSR, SRResNet, RDN), float or DDTB/PAMS-quantized"
    )


def _per_sample_fq(
    g: _Graph, x: str, lower: str, upper: str, bits: int, clamp: bool, name: str
) -> str:
    """§1.1 fake quantization with (per-sample) bound tensors, in PyTorch's op order."""
    rng = g.op("Sub", [upper, lower], name)
    s = g.op("Mul", [g.op("Reciprocal", [rng], name), g.const(float(2**bits - 1))], name)
    zp = g.op(
        "Add", [g.op("Round", [g.op("Mul", [s, lower], name)], name), g.const(2.0 ** (bits - 1))]
    )
    a = g.op("Max", [g.op("Min", [x, upper], name), lower], name)
    q = g.op("Round", [g.op("Sub", [g.op("Mul", [a, s], name), zp], name)], name)
    if clamp:
        q = g.op("Clip", [q, g.const(-(2.0 ** (bits - 1))), g.const(2.0 ** (bits - 1) - 1)], name)
    return g.op("Div", [g.op("Add", [q, zp], name), s], name)


def _gate_q2(g: _Graph, x: str, bits: int, per_sample: bool, name: str) -> str:
    """The gate's ``Q2`` (METHODS §1.3): min/max bounds, no clip, degenerate range → identity."""
    axes = [1, 2, 3] if per_sample else [0, 1, 2, 3]
    lo = g.op("ReduceMin", [x], name, axes=axes, keepdims=1)
    hi = g.op("ReduceMax", [x], name, axes=axes, keepdims=1)
    rng = g.op("Sub", [hi, lo], name)
    flat = g.op("Equal", [rng, g.const(0.0)], name)
    rng = g.op("Where", [flat, g.const(1.0), rng], name)
    s = g.op("Mul", [g.op("Reciprocal", [rng], name), g.const(float(2**bits - 1))], name)
    zp = g.op(
        "Add", [g.op("Round", [g.op("Mul", [s, lo], name)], name), g.const(2.0 ** (bits - 1))]
    )
    q = g.op("Round", [g.op("Sub", [g.op("Mul", [x, s], name), zp], name)], name)
    out = g.op("Div", [g.op("Add", [q, zp], name), s], name)
    return g.op("Where", [flat, x, out], name)


def _gate(g: _Graph, x: str, gate: DynamicGate, name: str) -> str:
    """Dynamic gate (§1.3): ``x`` N×C×H×W → logits N×2×1×1 (float ops, ternary int8 weights)."""
    t = g.op("GlobalAveragePool", [x], name)
    t = _gate_q2(g, t, gate.bits, gate.per_sample, f"{name}.q1")
    t = _conv(g, t, gate.conv1, f"{name}.conv1")
    t = _bn_torch_order(g, t, gate.bn, f"{name}.bn")
    t = g.op("Relu", [t], name)
    t = _gate_q2(g, t, gate.bits, gate.per_sample, f"{name}.q2")
    return _conv(g, t, gate.conv2, f"{name}.conv2")


def _container(zp_d: int, lo: int, hi: int, container: str) -> tuple[int, int, int] | None:
    """Place the codes ``q`` in ``[lo, hi]`` of ``x ≈ (q + zp_d) * step`` in an 8-bit container:
    ``code = q + t``, ``zero_point = t - zp_d``. Returns ``(zero_point, lo + t, hi + t)`` or None
    when it does not fit. int8: ``t = 0``; uint8: the smallest ``t >= -lo`` that fits (for
    DDTB with ``lower <= 0``: ``t = 2**(k-1)``, codes ``0 .. 2**k - 1``)."""
    if container == "int8":
        t, cmin, cmax = 0, _INT8_MIN, _INT8_MAX
    else:
        t, cmin, cmax = max(zp_d, -lo), 0, 255
    zero = t - zp_d
    if not (cmin <= zero <= cmax and cmin <= lo + t <= hi + t <= cmax):
        return None
    return zero, lo + t, hi + t


def _ddtb_static_params(q: DDTBActQuant, container: str) -> tuple[_QParams, int, int] | None:
    """``(QParams, code_min, code_max)`` of a static DDTB quantizer (container codes), None
    if it does not fit an 8-bit container."""
    lower = q.lower.detach().cpu().to(torch.float32).reshape(1)
    upper = q.upper.detach().cpu().to(torch.float32).reshape(1)
    if not bool(upper > lower):
        return None
    s, zp = asym_quant_params(lower, upper, q.bits)
    ends = asym_quantize_codes(
        torch.cat([lower, upper]), lower, upper, q.bits, clamp_codes=q.clamp_codes
    )
    placed = _container(int(zp), int(ends[0]), int(ends[1]), container)
    if placed is None:
        return None
    zero, lo, hi = placed
    return _QParams(float(np.float32(1.0 / float(s))), zero, container, hi), lo, hi


def _qcdq(g: _Graph, x: str, qp: _QParams, lo: int, hi: int, name: str) -> str:
    dtype = np.int8 if qp.container == "int8" else np.uint8
    step, zero = g.const(qp.step), g.const(qp.zero, dtype)
    c = g.op("QuantizeLinear", [x, step, zero], name)
    c = g.op("Clip", [c, g.const(lo, dtype), g.const(hi, dtype)], name)
    return g.op("DequantizeLinear", [c, step, zero], name)


def _act(g: _Graph, x: str, q: nn.Module | None, name: str) -> tuple[str, _QParams | None]:
    """An activation quantizer: ``(output, QParams)`` when static (QCDQ), ``(output, None)``
    for float-op quantizers and identities."""
    if q is None or not getattr(q, "enabled", True):
        return x, None
    if isinstance(q, PAMSActQuant):
        qmax = 2 ** (q.bits - 1) - 1
        alpha = float(q.alpha.detach().cpu().float()[0])
        if alpha <= 0:
            raise ExportError(f"{name}: PAMS alpha must be > 0, got {alpha}")
        zero, lo, hi = _container(0, -qmax, qmax, g.container)  # type: ignore[misc]
        qp = _QParams(float(np.float32(alpha / qmax)), zero, g.container, hi)
        g.report_qcdq.append(name)
        return _qcdq(g, x, qp, lo, hi, name), qp
    if isinstance(q, DDTBActQuant):
        if q.gate is not None and q.gate_applied:
            c = _gate(g, x, q.gate, f"{name}.gate")
            mult = g.op("Mul", [g.op("Sigmoid", [c], name), g.const(2.0)], name)
            starts, ends, axes = (
                g.const([0], np.int64),
                g.const([1], np.int64),
                g.const([1], np.int64),
            )
            m_up = g.op("Slice", [mult, starts, ends, axes], name)
            m_lo = g.op("Slice", [mult, ends, g.const([2], np.int64), axes], name)
            upper = g.op("Mul", [m_up, g.init(_f32(q.upper), f"{name}.upper")], name)
            lower = g.op("Mul", [m_lo, g.init(_f32(q.lower), f"{name}.lower")], name)
            g.report_float_q[name] = "dynamic gate: per-sample bounds"
            return _per_sample_fq(g, x, lower, upper, q.bits, q.clamp_codes, name), None
        static = _ddtb_static_params(q, g.container)
        if static is None:
            g.report_float_q[name] = f"zero point or codes do not fit {g.container}"
            lo_t = g.init(_f32(q.lower), f"{name}.lower")
            up_t = g.init(_f32(q.upper), f"{name}.upper")
            return _per_sample_fq(g, x, lo_t, up_t, q.bits, q.clamp_codes, name), None
        qp, lo, hi = static
        g.report_qcdq.append(name)
        return _qcdq(g, x, qp, lo, hi, name), qp
    raise ExportError(f"{name}: no ONNX export for activation quantizer {type(q).__name__}")


def _is_static(q: nn.Module | None) -> bool:
    if isinstance(q, PAMSActQuant):
        return q.enabled
    if isinstance(q, DDTBActQuant):
        return q.enabled and (q.gate is None or not q.gate_applied)
    return False


# ------------------------------------------------------------------------------ architectures
def _edsr(g: _Graph, lr: str, model: EDSR) -> str:
    x = _conv(g, lr, model.sub_mean, "sub_mean")
    x = _seq(g, x, model.head, "head")
    h = x
    for i, blk in enumerate(model.body):
        name = f"body.{i}"
        if isinstance(blk, QuantResBlock):
            r, _ = _act(g, h, blk.quant_act1, f"{name}.quant_act1")
            t = _conv(g, h, blk.body[0], f"{name}.body.0")
            t = _seq(g, t, blk.body[1], f"{name}.body.1")
            t, qp = _act(g, t, blk.quant_act2, f"{name}.quant_act2")
            fuse = g.integer_convs and qp is not None and _is_static(blk.quant_act3)
            t = _conv(
                g, t, blk.body[2], f"{name}.body.2", in_q=qp, fuse=fuse, post_scale=blk.res_scale
            )
            t, _ = _act(g, t, blk.quant_act3, f"{name}.quant_act3")
            h = g.op("Add", [t, r], name)
        elif isinstance(blk, ResBlock):
            t = _seq(g, h, blk.body, f"{name}.body")
            if blk.res_scale != 1.0:
                t = g.op("Mul", [t, g.const(blk.res_scale)], name)
            h = g.op("Add", [t, h], name)
        else:
            h = _seq(g, h, blk, name)
    feat = g.op("Add", [h, x], "body")
    return _conv(g, _seq(g, feat, model.tail, "tail"), model.add_mean, "add_mean")


def _srresnet(g: _Graph, lr: str, model: SRResNet) -> str:
    h = _prelu(g, _conv(g, lr, model.conv_input, "conv_input"), model.relu, "relu")
    t = h
    for i, blk in enumerate(model.residual):
        name = f"residual.{i}"
        if isinstance(blk, QuantSRResBlock):
            a, qp = _act(g, t, blk.quant_act1, f"{name}.quant_act1")
            u = _conv(g, a, blk.conv1, f"{name}.conv1", in_q=qp)
            u = _prelu(g, _bn(g, u, blk.in1, f"{name}.in1"), blk.relu, f"{name}.relu")
            a, qp = _act(g, u, blk.quant_act2, f"{name}.quant_act2")
            u = _bn(g, _conv(g, a, blk.conv2, f"{name}.conv2", in_q=qp), blk.in2, f"{name}.in2")
        elif isinstance(blk, SRResBlock):
            u = _conv(g, t, blk.conv1, f"{name}.conv1")
            u = _prelu(g, _bn(g, u, blk.in1, f"{name}.in1"), blk.relu, f"{name}.relu")
            u = _bn(g, _conv(g, u, blk.conv2, f"{name}.conv2"), blk.in2, f"{name}.in2")
        else:
            raise ExportError(f"{name}: unexpected {type(blk).__name__} in SRResNet.residual")
        t = g.op("Add", [u, t], name)
    feat = _bn(g, _conv(g, t, model.conv_mid, "conv_mid"), model.bn_mid, "bn_mid")
    feat = g.op("Add", [feat, h], "feat")
    return _conv(g, _seq(g, feat, model.upscale, "upscale"), model.conv_output, "conv_output")


def _dense(g: _Graph, x: str, layer: nn.Module, qp: _QParams | None, name: str) -> str:
    if isinstance(layer, QuantDenseLayer):
        if layer.quant_act is not None:
            x, qp = _act(g, x, layer.quant_act, f"{name}.quant_act")
        y = _conv(g, x, layer.conv[0], f"{name}.conv.0", in_q=qp)
        for j, m in list(layer.conv.named_children())[1:]:
            y = _seq(g, y, m, f"{name}.conv.{j}")
    elif isinstance(layer, DenseLayer):
        y = _seq(g, x, layer.conv, f"{name}.conv")
    else:
        raise ExportError(f"{name}: unexpected {type(layer).__name__} in an RDB")
    return g.op("Concat", [x, y], name, axis=1)


def _rdn(g: _Graph, lr: str, model: RDN) -> str:
    f1 = _conv(g, lr, model.SFENet1, "SFENet1")
    x = _conv(g, f1, model.SFENet2, "SFENet2")
    outs = []
    for i, rdb in enumerate(model.RDBs):
        name = f"RDBs.{i}"
        if isinstance(rdb, QuantRDB):
            xin, qp = _act(g, x, rdb.quant_act1, f"{name}.quant_act1")
            cur = xin
            for j, layer in enumerate(rdb.convs):
                cur = _dense(g, cur, layer, qp if j == 0 else None, f"{name}.convs.{j}")
            a, qp2 = _act(g, cur, rdb.quant_act2, f"{name}.quant_act2")
            x = g.op("Add", [_conv(g, a, rdb.LFF, f"{name}.LFF", in_q=qp2), xin], name)
        elif isinstance(rdb, RDB):
            cur = x
            for j, layer in enumerate(rdb.convs):
                cur = _dense(g, cur, layer, None, f"{name}.convs.{j}")
            x = g.op("Add", [_conv(g, cur, rdb.LFF, f"{name}.LFF"), x], name)
        else:
            raise ExportError(f"{name}: unexpected {type(rdb).__name__} in RDN.RDBs")
        outs.append(x)
    cat = g.op("Concat", outs, "GFF", axis=1)
    gff = model.GFF
    if isinstance(gff, QuantGFF):
        a, qp = _act(g, cat, gff.quant_act, "GFF.quant_act")
        t = _conv(g, a, gff._modules["0"], "GFF.0", in_q=qp)  # type: ignore[arg-type]
        t = _conv(g, t, gff._modules["1"], "GFF.1")  # type: ignore[arg-type]
    else:
        t = _seq(g, cat, gff, "GFF")
    feat = g.op("Add", [t, f1], "feat")
    return _seq(g, feat, model.UPNet, "UPNet")


_ARCH_EMITTERS = ((EDSR, _edsr), (SRResNet, _srresnet), (RDN, _rdn))


# ------------------------------------------------------------------------------ public API
def _build(
    model: nn.Module, opset: int, container: str, integer_convs: bool = True
) -> tuple[Any, _Graph]:
    import onnx
    from onnx import TensorProto, helper

    emit = next((e for cls, e in _ARCH_EMITTERS if isinstance(model, cls)), None)
    if emit is None:
        raise ExportError(
            f"export_onnx: no exporter for a {type(model).__name__}; supported: EDSR, SRResNet, "
            "RDN from lowbitsr.models, float or DDTB/PAMS-quantized (Granular-DQ is not)"
        )
    scale = int(getattr(model, "scale", 0) or (getattr(model, "model_config", {}) or {})["scale"])
    n_colors = 3
    g = _Graph(opset, container)
    g.integer_convs = integer_convs
    out = emit(g, "lr", model)
    g.nodes.append(helper.make_node("Identity", [out], ["sr"], name="sr"))
    inp = helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", n_colors, "H", "W"])
    outp = helper.make_tensor_value_info(
        "sr", TensorProto.FLOAT, ["N", n_colors, f"H*{scale}", f"W*{scale}"]
    )
    graph = helper.make_graph(g.nodes, "lowbitsr", [inp], [outp], initializer=g.inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="lowbitsr",
        ir_version=helper.find_min_ir_version_for(opsets),
    )
    meta = {
        "lowbitsr.scale": str(scale),
        "lowbitsr.rgb_range": str(float(getattr(model, "rgb_range", 255.0))),
        "lowbitsr.model": json.dumps(getattr(model, "model_config", None)),
        "lowbitsr.quant": json.dumps(getattr(model, "quant_config_dict", None)),
    }
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto, g


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def parity(
    model: nn.Module,
    session: Any,
    inputs: Sequence[np.ndarray],
    peak: float = 255.0,
) -> list[dict[str, Any]]:
    """Run onnxruntime and PyTorch on the same inputs and compare.

    Args:
        model: the PyTorch model (run in eval mode under ``no_grad``, on CPU).
        session: an ``onnxruntime.InferenceSession`` of its export.
        inputs: N×3×H×W float32 arrays in [0, rgb_range].
        peak: PSNR peak (the model's rgb_range).

    Returns:
        Per input ``{"shape", "max_abs_diff", "psnr"}`` (PSNR in dB on the unclamped float
        outputs; ``inf`` when identical).
    """
    was_training = model.training
    model.eval()
    rows = []
    try:
        for x in inputs:
            x = np.ascontiguousarray(x, dtype=np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x.copy())).numpy()
            got = session.run(["sr"], {"lr": x})[0]
            if got.shape != ref.shape:
                raise ExportError(f"onnx output shape {got.shape} != PyTorch {ref.shape}")
            rows.append(
                {
                    "shape": list(x.shape),
                    "max_abs_diff": float(np.max(np.abs(got - ref))),
                    "psnr": _psnr(got, ref, peak),
                }
            )
    finally:
        model.train(was_training)
    return rows


def _default_check_inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Two sizes (dynamic H/W) and a batch of two; smooth-ish content in [0, 255].
    out = []
    for n, h, w in ((1, 24, 20), (2, 17, 31)):
        base = rng.random((n, 3, h // 4 + 2, w // 4 + 2)).astype(np.float32)
        up = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)[:, :, :h, :w]
        out.append(np.clip(up * 255 + rng.normal(0, 8, up.shape), 0, 255).astype(np.float32))
    return out


def _optimized_ops(path: Path) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # the NCHWc "hardware specific" note is expected here
        so.optimized_model_filepath = str(opt_path)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(opt_path))
    counts: Counter[str] = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
        for n in opt.graph.node
    )
    return dict(sorted(counts.items()))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_inputs: Sequence[np.ndarray] | None = None,
    act_container: str = "uint8",
    integer_convs: bool = True,
) -> ExportReport:
    """Export an SR model to ONNX (module docstring: what is integer and what stays float).

    Args:
        model: a model of :mod:`lowbitsr.models` (EDSR, SRResNet, RDN), float, DDTB- or
            PAMS-quantized (trained/calibrated, or from :func:`lowbitsr.load_model` /
            :func:`~lowbitsr.deploy.pack.load_packed`); exported as it computes in eval mode.
        path: output ``.onnx`` file (parent folders created).
        opset: default-domain opset, 13..21 (17 by default).
        check: also run onnxruntime (CPUExecutionProvider): fill
            :attr:`ExportReport.optimized_ops` with the optimized graph's op types and
            :attr:`ExportReport.parity` with the difference to PyTorch.
        check_inputs: N×3×H×W float32 arrays for the parity check; default two smooth random
            images of different sizes (1×3×24×20 and 2×3×17×31) in [0, 255] (scaled to
            rgb_range).
        act_container: 8-bit type of the activation codes, ``"uint8"`` (default: x86
            onnxruntime fuses only u8 activations × s8 weights into QLinearConv; int8 activations
            are fused on ARM builds only) or ``"int8"``.
        integer_convs: give the convs between two static quantizers an int32 bias (at
            ``x_scale * w_scale``, rounding error at most half of that) so that onnxruntime runs
            them as integer ``QLinearConv``; False keeps their float bias (exact, but they then
            run as float convs).

    Returns:
        :class:`ExportReport`.

    Raises:
        ExportError: unsupported architecture/module, or a wrong opset.
        ImportError: onnx (and, with ``check``, onnxruntime) is not installed.
    """
    import onnx

    if act_container not in ("uint8", "int8"):
        raise ExportError(
            f"export_onnx: act_container must be 'uint8' or 'int8', got {act_container!r}"
        )
    if not 13 <= opset <= 21:
        raise ExportError(
            f"export_onnx: opset must be in 13..21 (per-axis DQ, int8 Clip), got {opset}"
        )
    if any(t.device.type != "cpu" for t in model.state_dict().values()):
        model = copy.deepcopy(model).cpu()
    proto, g = _build(model, opset, act_container, integer_convs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    report = ExportReport(
        path=str(out),
        opset=opset,
        node_counts=dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        integer_weights=g.report_int_weights,
        qcdq_quantizers=g.report_qcdq,
        float_quantizers=g.report_float_q,
        fusable_convs=g.report_fusable,
    )
    if check:
        import onnxruntime as ort

        report.optimized_ops = _optimized_ops(out)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        rgb_range = float(getattr(model, "rgb_range", 255.0))
        if check_inputs is None:
            check_inputs = [x * np.float32(rgb_range / 255.0) for x in _default_check_inputs()]
        report.parity = parity(model, sess, check_inputs, peak=rgb_range)
    return report
