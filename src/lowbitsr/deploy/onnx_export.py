"""ONNX export of float and DDTB/PAMS-quantized SR models, with an onnxruntime parity check.

Route: a graph builder (``onnx.helper``) over the architectures of :mod:`lowbitsr.models` (EDSR,
SRResNet, RDN) and their quantized wrappers, reading the model's own tensors; no tracing. Every
graph has one input ``lr`` (``N×3×H×W`` float32 in [0, rgb_range], N/H/W dynamic) and one output
``sr`` (``N×3×sH×sW``, not clamped), and carries the model/quant configs as metadata
(``lowbitsr.model``, ``lowbitsr.quant``, ``lowbitsr.scale``, ``lowbitsr.rgb_range``) and the
export options (``lowbitsr.export``, JSON).

What each part becomes
----------------------

- **Float parts** (mean shifts, head, tail/upsampler, the last body conv, BN, PReLU, skips):
  float32 ``Conv``/``BatchNormalization``/``PRelu``/``Add``; the pixel shuffle as
  ``Reshape → Transpose → Reshape → Transpose → Reshape`` (``pixel_shuffle="transpose"``,
  default: row moves that onnxruntime runs faster than its generic ``DepthToSpace``) or one
  ``DepthToSpace`` (CRD). Either moves the same values.
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
  convs after a gated quantizer; the gates' 1×1 convs) runs in float32. By default
  (``float_conv_weights="float"``) its weight is the fake-quant weight itself as a float32
  initializer, bias in the ``Conv``: onnxruntime pre-packs constant weights for its blocked NCHWc
  kernels, while the output of a ``DequantizeLinear`` is not constant-folded and would leave the
  conv on the generic path (about 1.5× slower per conv here). ``float_conv_weights="codes"``
  stores the k-bit codes as an int8 initializer + ``DequantizeLinear`` instead (smaller file),
  the bias then added by a separate ``Add`` so that onnxruntime does not round it to int32. A
  conv between two static quantizers that must stay float (``integer_convs=False``) always uses
  the codes form: onnxruntime would otherwise quantize a constant float weight and bias of a
  ``DQ → Conv → Q`` group itself.
- **Gated DDTB quantizers** (§1.3, per-sample bounds): float ops. Gate:
  ``GlobalAveragePool → Q2`` (per-sample ``ReduceMin``/``ReduceMax``, ``Round``, ``Div``,
  ``Where``) ``→`` 1×1 ternary conv (int8 initializer + DequantizeLinear, float ``Conv``) ``→``
  BN (PyTorch's CPU arithmetic: ``fma(x, alpha, beta)`` emulated in float64) ``→ Relu → Q2 →``
  1×1 ternary conv ``→ 2·Sigmoid``; quantizer ``Max(Min(x, u_n), l_n)``,
  ``s = (2**k - 1)·Reciprocal(u_n - l_n)``, ``zp = Round(s·l_n) + 2**(k-1)``,
  ``Clip(Round(a·s - zp))``, ``(q + zp) / s`` — §1.1 in PyTorch's operation order.
  **Opt-in approximation** ``static_gates`` (off by default, changes the outputs): every gated
  quantizer becomes a static QCDQ one with bounds ``(m_upper·upper, m_lower·lower)``, ``m = 1``
  (the gate's identity) or given multipliers (:func:`mean_gate_multipliers`: the mean of
  ``2·sigmoid(c)`` over some images); listed in :attr:`ExportReport.static_gates` and in the
  ``lowbitsr.export`` metadata. It removes the gate ops and lets the convs next to such a layer
  become QLinearConv.

- **Granular-DQ** (:class:`~lowbitsr.quant.granular_dq.GranularDQModel`, docs/methods.md §2): one
  graph for a batch of tiles, each tile at its own bit-width. Extra input ``bits`` (``[N]`` int64: a
  positive value forces that sample's bit-width, 0 lets the graph decide) and extra output
  ``bits_used``. The decision is in the graph for the learned gate (GBC: ceil-mode
  ``AveragePool``, GroupNorm as ``InstanceNormalization`` over groups, the adaptive pooling +
  mean as exact per-axis weights, ``Gemm``, ``ArgMax`` of the ``Softmax``; E2B: the soft-histogram
  entropy with the frozen thresholds) and the fixed gate; the random and official gates draw
  random numbers, so their bits must be passed (e.g. from ``decide_bits``). Every quantized
  conv's input quantizer is float ops that gather each sample's ``alpha_b``, ``-Qn_b``,
  ``Qp_b`` from the layer's tables: ``round(clamp((x + shift) / alpha, -Qn, Qp)) * alpha``
  (PyTorch's order); the 8-bit LSQ weights are float32 constants (``code * alpha``) or int8 +
  DequantizeLinear (``float_conv_weights="codes"``). All arithmetic stays float32.

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
can then take the other decision, which changes that sample's whole quantization grid. Float convs
also sum in onnxruntime's order (its NCHWc kernels), so a downstream code can flip the same way.
On trained models these flips are rare and do not move image quality (bench: PSNR/Y of the
integer model within 0.001 dB of PyTorch fake-quant on the bundled test photos); in a deep
random-weight network (EDSR-baseline, 16 blocks) each flip is amplified and the ORT/PyTorch
parity PSNR drops to about 35 dB, for the float-conv and integer exports alike.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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
from ..quant.functional import asym_quant_params, asym_quantize_codes, lsq_fake_quant
from ..quant.gdq_layers import ENTROPY_BINS, ENTROPY_EPS, ENTROPY_SIGMA, GDQActQuantizer, GDQConv2d
from ..quant.granular_dq import GranularDQModel, _HeadTap
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

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "mean_gate_multipliers",
    "parity",
]

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
        static_gates: gated DDTB quantizers exported static (``static_gates`` option, an
            approximation) → their ``[m_upper, m_lower]``.
        granular_dq: for a Granular-DQ model, its candidate bit-widths and where the per-sample
            bit decision is made (empty otherwise).
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
    static_gates: dict[str, list[float]] = field(default_factory=dict)
    granular_dq: dict[str, Any] = field(default_factory=dict)
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
            f"QCDQ activation quantizers, {len(self.float_quantizers)} float-op ones (gated/GDQ)"
        ]
        if self.optimized_ops:
            lines.append(
                f"onnxruntime runs {fused} conv(s) as integer QLinearConv "
                f"({len(self.fusable_convs)} prepared)"
            )
        if self.static_gates:
            lines.append(
                f"APPROXIMATION: {len(self.static_gates)} gated quantizer(s) exported with static "
                "bounds (static_gates); outputs differ from the PyTorch model"
            )
        if self.granular_dq:
            lines.append(
                f"Granular-DQ: per-sample bits {self.granular_dq.get('candidates')}, decision "
                f"{self.granular_dq.get('decision')}; float-op quantizers"
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
        self.float_weights = True
        self.pixel_shuffle = "transpose"
        self.per_sample_qdq = True
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


# ------------------------------------------------------------------------------ layers
def _conv(
    g: _Graph,
    x: str,
    conv: nn.Module,
    name: str,
    *,
    in_q: _QParams | None = None,
    fuse: bool = False,
    qdq_float: bool = False,
    post_scale: float = 1.0,
) -> str:
    """``Conv`` of a float, quantized or mean-shift conv; ``post_scale`` multiplies the output
    (folded into the weight scale and bias); ``fuse`` (with ``in_q``) quantizes the bias to
    int32 at ``x_scale * w_scale`` for onnxruntime's QLinearConv fusion. ``qdq_float``: the conv
    sits between two QCDQ quantizers but must stay float (``integer_convs=False``): its weight
    then stays int8 + DequantizeLinear and its bias a separate Add, because onnxruntime would
    quantize a constant float weight and bias of a ``DQ → Conv → Q`` group itself (its
    weight/bias quantization pass), which changes the numbers."""
    if isinstance(conv, _HeadTap):
        return _gdq_decide(g, _seq(g, x, conv.inner, name), name)
    if isinstance(conv, GDQConv2d):
        x = _gdq_act(g, x, conv.act_quant, f"{name}.act_quant")
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
    integer = False
    if codes is not None:
        step, zero = codes.step_and_zero()
        q = codes.codes.cpu().numpy().astype(np.int64)
        grid = q - zero
        peak = max(1, int(np.abs(grid).max()))
        integer = fuse and in_q is not None and peak <= 127
        if not integer and g.float_weights and not (qdq_float or fuse):
            # A conv that runs in float anyway: its fake-quant weight as a float32 constant, so
            # onnxruntime can pre-pack it for its blocked (NCHWc) kernels; a DequantizeLinear
            # output is not constant-folded and would leave the conv on the slower generic path.
            codes = None
    if isinstance(conv, GDQConv2d):
        return _gdq_conv(g, x, conv, name, attrs)
    if codes is None:
        if isinstance(conv, QuantConv2d):
            with torch.no_grad():
                w_np = _f32(conv.quantized_weight())
        else:
            w_np = _f32(conv.weight)
        if post_scale != 1.0:
            w_np = w_np * np.float32(post_scale)
        w = g.init(w_np, f"{name}.weight")
        w_step = None
    else:
        if integer:
            # Integer conv: zero-point-free grid indices (``q - zero``, so onnxruntime can use its
            # symmetric-weight kernels) times M, at step/M. Same weights; the int32 bias step
            # x_scale * w_scale becomes M times finer, so its rounding moves the conv output M
            # times less. M keeps |stored| <= 127 and the u8*s8 pair sums below 2**15 (the
            # saturating 16-bit pair add of AVX2 kernels; VNNI kernels accumulate in 32 bits).
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
    if isinstance(mod, (nn.Conv2d, MeanShift, _HeadTap)):
        return _conv(g, x, mod, name)
    if isinstance(mod, nn.PixelShuffle):
        return _pixel_shuffle(g, x, int(mod.upscale_factor), name)
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


def _pixel_shuffle(g: _Graph, x: str, r: int, name: str) -> str:
    """PyTorch's ``PixelShuffle(r)`` (ONNX ``DepthToSpace``, CRD). With ``g.pixel_shuffle ==
    "transpose"`` as two transposes that onnxruntime runs as row moves rather than its generic
    6-D shuffle: ``[NC, r1, r2, H, W] → [NC, r2, H, r1, W]`` (whole W-rows move) ``→
    [NC, H·r1·W, r2]`` (one interleave). Pure data movement: the same values either way."""
    if g.pixel_shuffle == "depth_to_space":
        return g.op("DepthToSpace", [x], name, blocksize=r, mode="CRD")
    i64 = np.int64
    shape = g.op("Shape", [x], name)
    n = g.op("Slice", [shape, g.const([0], i64), g.const([1], i64)], name)
    h = g.op("Slice", [shape, g.const([2], i64), g.const([3], i64)], name)
    w = g.op("Slice", [shape, g.const([3], i64), g.const([4], i64)], name)
    s1 = g.op("Concat", [g.const([-1, r, r], i64), h, w], name, axis=0)
    t = g.op("Reshape", [x, s1], name)
    t = g.op("Transpose", [t], name, perm=[0, 2, 3, 1, 4])
    t = g.op("Reshape", [t, g.const([0, r, -1], i64)], name)
    t = g.op("Transpose", [t], name, perm=[0, 2, 1])
    hr = g.op("Mul", [h, g.const([r], i64)], name)
    wr = g.op("Mul", [w, g.const([r], i64)], name)
    s2 = g.op("Concat", [n, g.const([-1], i64), hr, wr], name, axis=0)
    return g.op("Reshape", [t, s2], name)


# ------------------------------------------------------------------------------ Granular-DQ
def _gdq_conv(g: _Graph, x: str, conv: GDQConv2d, name: str, attrs: dict[str, Any]) -> str:
    """A Granular-DQ conv on its (already quantized) input: the 8-bit LSQ weight, as a float32
    constant or (``float_conv_weights="codes"``) int8 codes + DequantizeLinear at ``w_alpha``
    (``code * alpha``, the fake-quant product); float bias."""
    with torch.no_grad():
        alpha = conv.w_alpha.detach().float()
        if getattr(conv, "official", False):
            # the released grad_scale form, whose forward step can be one ulp away from alpha
            gs = 1.0 / math.sqrt(conv.weight.numel() * (2 ** (conv.w_bits - 1) - 1))
            alpha = (alpha - alpha * gs) + alpha * gs
        wq = lsq_fake_quant(conv.weight.detach().float(), alpha, conv.w_bits, signed=True)
    if g.float_weights or conv.w_bits > 8:
        w = g.init(_f32(wq), f"{name}.weight")
    else:
        codes = torch.round(wq / alpha).to(torch.int8).numpy()
        deq = torch.from_numpy(codes.astype(np.float32)) * alpha
        if not torch.equal(deq, wq):
            raise ExportError(f"{name}: the LSQ weight is not code * alpha in float32")
        w = g.op(
            "DequantizeLinear",
            [g.init(codes, f"{name}.weight_codes"), g.const(float(alpha[0])), g.const(0, np.int8)],
            f"{name}.weight",
        )
        g.report_int_weights.append(name)
    inputs = [x, w] + ([g.init(_f32(conv.bias), f"{name}.bias")] if conv.bias is not None else [])
    return g.op("Conv", inputs, name, **attrs)


def _gdq_act(g: _Graph, x: str, q: GDQActQuantizer, name: str) -> str:
    """§2.3 activation quantizer at each sample's bit-width: ``x + shift`` (default compat),
    ``round(clamp(x / alpha_b, -Qn_b, Qp_b)) * alpha_b`` with ``alpha_b``, ``Qn_b``, ``Qp_b``
    gathered per sample from the layer's tables (float ops, PyTorch's order)."""
    if g.gdq_sel is None:
        raise ExportError(f"{name}: a Granular-DQ layer before the bit decision (head)")
    if q._needs_init:
        raise ExportError(f"{name}: Granular-DQ activation quantizer is not initialised")
    g.report_float_q[name] = "Granular-DQ: per-sample bit-width"
    if not q.official:
        x = g.op("Add", [x, g.init(_f32(q.shift), f"{name}.shift")], name)
    shape = g.const([-1, 1, 1, 1], np.int64)

    def per_sample(table: np.ndarray, what: str) -> str:
        t = g.op("Gather", [g.init(table.astype(np.float32), f"{name}.{what}"), g.gdq_sel], name)
        return g.op("Reshape", [t, shape], name)

    alpha = per_sample(_f32(q.alpha), "alpha")
    lo = per_sample(-_f32(q._qn), "neg_qn")
    hi = per_sample(_f32(q._qp), "qp")
    v = g.op("Div", [x, alpha], name)
    v = g.op("Min", [g.op("Max", [v, lo], name), hi], name)
    return g.op("Mul", [g.op("Round", [v], name), alpha], name)


def _axis_pool_weights(g: _Graph, length: str, out: str, name: str) -> str:
    """``[L]`` weights ``w_i`` with ``mean(adaptive_avg_pool1d(x, O)) = sum_i w_i x_i``: cell
    ``r`` averages ``[floor(rL/O), ceil((r+1)L/O))`` (PyTorch's adaptive pooling)."""
    i64 = np.int64
    r = g.op("Range", [g.const(0, i64), out, g.const(1, i64)], name)
    start = g.op("Div", [g.op("Mul", [r, length], name), out], name)
    r1 = g.op("Add", [r, g.const(1, i64)], name)
    end = g.op(
        "Div",
        [g.op("Add", [g.op("Mul", [r1, length], name), g.op("Sub", [out, g.const(1, i64)])]), out],
        name,
    )
    i = g.op(
        "Unsqueeze",
        [g.op("Range", [g.const(0, i64), length, g.const(1, i64)], name), g.const([1], i64)],
        name,
    )
    inside = g.op(
        "And",
        [g.op("GreaterOrEqual", [i, start], name), g.op("Less", [i, end], name)],
        name,
    )
    size = g.op("Cast", [g.op("Sub", [end, start], name)], name, to=1)
    m = g.op("Div", [g.op("Cast", [inside], name, to=1), size], name)
    w = g.op("ReduceSum", [m, g.const([1], i64)], name, keepdims=0)
    return g.op("Div", [w, g.op("Cast", [out], name, to=1)], name)


def _gdq_descriptor(g: _Graph, z1: str, name: str) -> str:
    """GBC descriptor ``S`` ``[N, 3C]`` (§2.1, :meth:`GranularityBitController.descriptor`)."""
    assert g.gdq is not None
    gbc = g.gdq.controller.gbc
    assert gbc is not None
    i64 = np.int64
    pool = {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 0}
    z2 = g.op("AveragePool", [z1], name, **pool)
    z3 = g.op("AveragePool", [z2], name, **pool)
    s3 = g.op("Shape", [z3], name)
    oh = g.op("Slice", [s3, g.const([2], i64), g.const([3], i64)], name)
    ow = g.op("Slice", [s3, g.const([3], i64), g.const([4], i64)], name)
    oh, ow = (g.op("Squeeze", [t, g.const([0], i64)], name) for t in (oh, ow))
    pooled = []
    for k, z in enumerate((z1, z2, z3)):
        if gbc.norms is not None:
            gn = gbc.norms[k]
            t = g.op("Reshape", [z, g.const([0, gn.num_groups, -1], i64)], name)
            t = g.op(
                "InstanceNormalization",
                [t, g.const(np.ones(gn.num_groups)), g.const(np.zeros(gn.num_groups))],
                name,
                epsilon=float(gn.eps),
            )
            t = g.op("Reshape", [t, g.op("Shape", [z], name)], name)
            c = gn.num_channels
            t = g.op("Mul", [t, g.init(_f32(gn.weight).reshape(c, 1, 1), f"{name}.gn{k}.w")], name)
            z = g.op("Add", [t, g.init(_f32(gn.bias).reshape(c, 1, 1), f"{name}.gn{k}.b")], name)
        sz = g.op("Shape", [z], name)
        h = g.op(
            "Squeeze",
            [g.op("Slice", [sz, g.const([2], i64), g.const([3], i64)], name), g.const([0], i64)],
            name,
        )
        w = g.op(
            "Squeeze",
            [g.op("Slice", [sz, g.const([3], i64), g.const([4], i64)], name), g.const([0], i64)],
            name,
        )
        wy = g.op("Unsqueeze", [_axis_pool_weights(g, h, oh, name), g.const([1], i64)], name)
        wx = _axis_pool_weights(g, w, ow, name)
        t = g.op("Mul", [g.op("Mul", [z, wy], name), wx], name)
        pooled.append(g.op("ReduceSum", [t, g.const([2, 3], i64)], name, keepdims=0))
    if gbc.official:
        pooled = [pooled[2], pooled[0], pooled[1]]
    return g.op("Concat", pooled, name, axis=1)


def _entropy(g: _Graph, lr255: str, name: str) -> str:
    """:func:`~lowbitsr.quant.gdq_layers.patch_entropy` ``[N]`` (default compat)."""
    i64 = np.int64
    ch = [
        g.op("Slice", [lr255, g.const([c], i64), g.const([c + 1], i64), g.const([1], i64)], name)
        for c in range(3)
    ]
    grey = g.op(
        "Add",
        [
            g.op(
                "Add",
                [
                    g.op("Mul", [ch[0], g.const(0.2989)], name),
                    g.op("Mul", [ch[1], g.const(0.5870)], name),
                ],
                name,
            ),
            g.op("Mul", [ch[2], g.const(0.1140)], name),
        ],
        name,
    )
    v = g.op("Reshape", [g.op("Div", [grey, g.const(255.0)], name), g.const([0, -1, 1], i64)])
    bins = g.const(np.linspace(0, 1, ENTROPY_BINS, dtype=np.float32).reshape(1, 1, -1))
    t = g.op("Div", [g.op("Sub", [v, bins], name), g.const(ENTROPY_SIGMA)], name)
    k = g.op("Exp", [g.op("Mul", [g.const(-0.5), g.op("Mul", [t, t], name)], name)], name)
    count = g.op("Slice", [g.op("Shape", [k], name), g.const([1], i64), g.const([2], i64)], name)
    pdf = g.op("ReduceSum", [k, g.const([1], i64)], name, keepdims=0)
    pdf = g.op("Div", [pdf, g.op("Cast", [count], name, to=1)], name)
    tot = g.op("ReduceSum", [pdf, g.const([1], i64)], name, keepdims=1)
    eps = g.const(ENTROPY_EPS)
    pdf = g.op("Add", [g.op("Div", [pdf, g.op("Add", [tot, eps], name)], name), eps], name)
    pos = g.op("Greater", [pdf, g.const(0.0)], name)
    plogp = g.op("Mul", [pdf, g.op("Log", [g.op("Where", [pos, pdf, g.const(1.0)], name)])])
    return g.op("Neg", [g.op("ReduceSum", [plogp, g.const([1], i64)], name, keepdims=0)], name)


def _gdq_in_graph(model: GranularDQModel) -> bool:
    """Whether the export decides the bits itself (deterministic gates)."""
    ctl = model.controller
    return ctl.gate == "fixed" or (ctl.gate == "learned" and not ctl.official)


def _gdq_decide(g: _Graph, z1: str, name: str) -> str:
    """The bit decision of every sample (§2.1 GBC argmax + §2.2 E2B with frozen thresholds) or
    the caller's ``bits`` input where positive; sets ``g.gdq_sel``. Returns ``z1``."""
    model = g.gdq
    if model is None:
        raise ExportError(f"{name}: a Granular-DQ head outside a Granular-DQ model")
    ctl = model.controller
    i64 = np.int64
    cands = np.asarray(ctl.candidates, dtype=i64)
    n = g.op("Slice", [g.op("Shape", [z1], name), g.const([0], i64), g.const([1], i64)], name)
    decided: str | None = None
    if ctl.gate == "fixed":
        decided = g.op("Expand", [g.const([int(ctl.fixed_bits)], i64), n], name)
        g.report_gdq["decision"] = f"fixed {ctl.fixed_bits} bits"
    elif _gdq_in_graph(model):
        assert ctl.gbc is not None
        s = _gdq_descriptor(g, z1, f"{name}.gbc")
        fc = ctl.gbc.fc
        logits = g.op(
            "Gemm",
            [
                s,
                g.init(_f32(fc.weight), f"{name}.gbc.fc.weight"),
                g.init(_f32(fc.bias), f"{name}.gbc.fc.bias"),
            ],
            name,
            transB=1,
        )
        soft = g.op(
            "Softmax", [g.op("Div", [logits, g.const(float(ctl.tau))], name)], name, axis=-1
        )
        gsel = g.op("ArgMax", [soft], name, axis=1, keepdims=0)
        gbits = np.asarray(ctl.gbc_bits, dtype=i64)
        decided = g.op("Gather", [g.const(gbits, i64), gsel], name)
        if ctl.e2b is not None:
            e2b = ctl.e2b
            if not e2b.ready:
                raise ExportError(f"{name}: E2B thresholds are not set")
            lr = "lr"
            if model.rgb_range != 255.0:
                lr = g.op("Mul", [lr, g.const(255.0 / model.rgb_range)], name)
            h = _entropy(g, lr, f"{name}.e2b")
            thr = e2b.thresholds.detach().float().numpy()
            bucket = g.op(
                "Add",
                [
                    g.op("Cast", [g.op("Greater", [h, g.const(float(thr[0]))], name)], name, to=7),
                    g.op("Cast", [g.op("Greater", [h, g.const(float(thr[1]))], name)], name, to=7),
                ],
                name,
            )
            ebits = g.op("Gather", [g.const(np.asarray(ctl.e2b_bits, dtype=i64), i64), bucket])
            top = g.op("Equal", [decided, g.const(int(max(ctl.gbc_bits)), i64)], name)
            decided = g.op("Where", [top, ebits, decided], name)
        g.report_gdq["decision"] = "in graph: GBC argmax" + (
            " + E2B (frozen thresholds)" if ctl.e2b is not None else ""
        )
    else:
        g.report_gdq["decision"] = (
            f"not in the graph ({'official' if ctl.official else ctl.gate} gate draws random "
            "numbers): pass the bits input (e.g. from GranularDQModel.decide_bits)"
        )
    forced = g.op("Cast", ["bits"], name, to=7)
    if decided is None:
        final = forced
    else:
        final = g.op("Where", [g.op("Greater", [forced, g.const(0, i64)], name), forced, decided])
    g.gdq_bits = final
    hit = g.op("Equal", [g.op("Unsqueeze", [final, g.const([1], i64)], name), g.const(cands, i64)])
    g.gdq_sel = g.op("ArgMax", [g.op("Cast", [hit], name, to=6)], name, axis=1, keepdims=0)
    g.report_gdq["candidates"] = [int(b) for b in cands]
    return z1


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


def _per_sample_qdq(
    g: _Graph,
    x: str,
    lower: str,
    upper: str,
    q: DDTBActQuant,
    name: str,
) -> str | None:
    """§1.1 with per-sample bounds as per-sample ``QuantizeLinear → Clip → DequantizeLinear``
    (``axis=0``: one scale and zero point per sample, computed in the graph from the bounds with
    :func:`_per_sample_fq`'s ops): three passes over the tensor instead of eight, with the same
    arithmetic as a static QCDQ quantizer (codes equal PyTorch's except within a few ulps of a
    rounding tie). The container shift is the static one, which fits every sample when
    ``lower <= 0 <= upper`` (the gate's multipliers are positive); None otherwise. Without
    ``clamp_codes`` (official compat, whose top code depends on the sample) ``x`` is clamped to
    the bounds first, as PyTorch does."""
    lo_p, up_p = float(q.lower.detach().float()[0]), float(q.upper.detach().float()[0])
    if not lo_p <= 0.0 <= up_p or up_p <= lo_p:
        return None
    k, half = q.bits, 2 ** (q.bits - 1)
    if g.container == "int8":
        t, dtype, onnx_type = 0, np.int8, 3
    else:
        t, dtype, onnx_type = half, np.uint8, 2
    code_lo, code_hi = t - half, t + half - (1 if q.clamp_codes else 0)
    rng = g.op("Sub", [upper, lower], name)
    s = g.op("Mul", [g.op("Reciprocal", [rng], name), g.const(float(2**k - 1))], name)
    zp = g.op("Add", [g.op("Round", [g.op("Mul", [s, lower], name)], name), g.const(float(half))])
    flat = g.const([-1], np.int64)
    step = g.op("Reshape", [g.op("Reciprocal", [s], name), flat], name)
    zero = g.op("Sub", [g.const(float(t)), zp], name)
    zero = g.op("Reshape", [g.op("Cast", [zero], name, to=onnx_type), flat], name)
    if not q.clamp_codes:
        x = g.op("Max", [g.op("Min", [x, upper], name), lower], name)
    c = g.op("QuantizeLinear", [x, step, zero], name, axis=0)
    c = g.op("Clip", [c, g.const(code_lo, dtype), g.const(code_hi, dtype)], name)
    return g.op("DequantizeLinear", [c, step, zero], name, axis=0)


def _gate_q2(g: _Graph, x: str, bits: int, per_sample: bool, name: str) -> str:
    """The gate's ``Q2`` (docs/methods.md §1.3): min/max bounds, no clip, degenerate range →
    identity."""
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


def _ddtb_static_params(
    q: DDTBActQuant, container: str, mult: tuple[float, float] = (1.0, 1.0)
) -> tuple[_QParams, int, int] | None:
    """``(QParams, code_min, code_max)`` of a static DDTB quantizer (container codes), None
    if it does not fit an 8-bit container. ``mult`` = ``(m_upper, m_lower)`` scales the bounds
    as a gate would (float32 products, as PyTorch's ``mult * upper``); ``(1, 1)`` = static."""
    lower = q.lower.detach().cpu().to(torch.float32).reshape(1)
    upper = q.upper.detach().cpu().to(torch.float32).reshape(1)
    if mult != (1.0, 1.0):
        upper = torch.tensor([mult[0]], dtype=torch.float32) * upper
        lower = torch.tensor([mult[1]], dtype=torch.float32) * lower
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
        mult = (1.0, 1.0)
        if q.gate is not None and q.gate_applied and g.static_gates is not None:
            # Opt-in approximation (changes numerics): the gate replaced by a fixed multiplier.
            mult = g.static_gates.get(name, (1.0, 1.0))
            g.report_static_gates[name] = mult
        elif q.gate is not None and q.gate_applied:
            c = _gate(g, x, q.gate, f"{name}.gate")
            gm = g.op("Mul", [g.op("Sigmoid", [c], name), g.const(2.0)], name)
            starts, ends, axes = (
                g.const([0], np.int64),
                g.const([1], np.int64),
                g.const([1], np.int64),
            )
            m_up = g.op("Slice", [gm, starts, ends, axes], name)
            m_lo = g.op("Slice", [gm, ends, g.const([2], np.int64), axes], name)
            upper = g.op("Mul", [m_up, g.init(_f32(q.upper), f"{name}.upper")], name)
            lower = g.op("Mul", [m_lo, g.init(_f32(q.lower), f"{name}.lower")], name)
            g.report_float_q[name] = "dynamic gate: per-sample bounds"
            if g.per_sample_qdq:
                y = _per_sample_qdq(g, x, lower, upper, q, name)
                if y is not None:
                    return y, None
            return _per_sample_fq(g, x, lower, upper, q.bits, q.clamp_codes, name), None
        static = _ddtb_static_params(q, g.container, mult)
        if static is None:
            g.report_float_q[name] = f"zero point or codes do not fit {g.container}"
            lo_np, up_np = _f32(q.lower), _f32(q.upper)
            if mult != (1.0, 1.0):
                up_np, lo_np = np.float32(mult[0]) * up_np, np.float32(mult[1]) * lo_np
            lo_t = g.init(lo_np, f"{name}.lower")
            up_t = g.init(up_np, f"{name}.upper")
            return _per_sample_fq(g, x, lo_t, up_t, q.bits, q.clamp_codes, name), None
        qp, lo, hi = static
        g.report_qcdq.append(name)
        return _qcdq(g, x, qp, lo, hi, name), qp
    raise ExportError(f"{name}: no ONNX export for activation quantizer {type(q).__name__}")


def _is_static(g: _Graph, q: nn.Module | None) -> bool:
    if isinstance(q, PAMSActQuant):
        return q.enabled
    if isinstance(q, DDTBActQuant):
        gated = q.gate is not None and q.gate_applied and g.static_gates is None
        return q.enabled and not gated
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
            between = qp is not None and _is_static(g, blk.quant_act3)
            t = _conv(
                g,
                t,
                blk.body[2],
                f"{name}.body.2",
                in_q=qp,
                fuse=between and g.integer_convs,
                qdq_float=between and not g.integer_convs,
                post_scale=blk.res_scale,
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
    model: nn.Module,
    opset: int,
    container: str,
    integer_convs: bool = True,
    float_weights: bool = True,
    static_gates: dict[str, tuple[float, float]] | None = None,
    pixel_shuffle: str = "transpose",
) -> tuple[Any, _Graph]:
    import onnx
    from onnx import TensorProto, helper

    net = model.net if isinstance(model, GranularDQModel) else model
    emit = next((e for cls, e in _ARCH_EMITTERS if isinstance(net, cls)), None)
    if emit is None:
        raise ExportError(
            f"export_onnx: no exporter for a {type(net).__name__}; supported: EDSR, SRResNet, "
            "RDN from lowbitsr.models, float, DDTB/PAMS-quantized or Granular-DQ"
        )
    scale = int(getattr(model, "scale", 0) or (getattr(model, "model_config", {}) or {})["scale"])
    n_colors = 3
    g = _Graph(opset, container)
    if isinstance(model, GranularDQModel):
        g.gdq = model
    g.integer_convs = integer_convs
    g.float_weights = float_weights
    g.static_gates = static_gates
    g.pixel_shuffle = pixel_shuffle
    out = emit(g, "lr", net)
    g.nodes.append(helper.make_node("Identity", [out], ["sr"], name="sr"))
    inputs = [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", n_colors, "H", "W"])]
    outputs = [
        helper.make_tensor_value_info(
            "sr", TensorProto.FLOAT, ["N", n_colors, f"H*{scale}", f"W*{scale}"]
        )
    ]
    if g.gdq is not None:
        if g.gdq_bits is None:
            raise ExportError("export_onnx: the Granular-DQ bit decision was not emitted")
        g.nodes.append(helper.make_node("Identity", [g.gdq_bits], ["bits_used"], name="bits_used"))
        inputs.append(helper.make_tensor_value_info("bits", TensorProto.INT64, ["N"]))
        outputs.append(helper.make_tensor_value_info("bits_used", TensorProto.INT64, ["N"]))
    graph = helper.make_graph(g.nodes, "lowbitsr", inputs, outputs, initializer=g.inits)
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
        "lowbitsr.export": json.dumps(
            {
                "act_container": container,
                "integer_convs": integer_convs,
                "float_conv_weights": "float" if float_weights else "codes",
                "static_gates": g.report_static_gates,
                "pixel_shuffle": pixel_shuffle,
                "granular_dq": g.report_gdq,
            }
        ),
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
            feeds: dict[str, np.ndarray] = {"lr": x}
            gdq = "bits" in {i.name for i in session.get_inputs()}
            with torch.no_grad():
                if gdq and isinstance(model, GranularDQModel) and not _gdq_in_graph(model):
                    # Random/official gates: decide once in PyTorch, force it on both sides.
                    forced = model.decide_bits(torch.from_numpy(x.copy()))
                    feeds["bits"] = forced.cpu().numpy().astype(np.int64)
                    with model.force_bits(forced):
                        ref = model(torch.from_numpy(x.copy())).numpy()
                else:
                    ref = model(torch.from_numpy(x.copy())).numpy()
            if gdq:
                feeds.setdefault("bits", np.zeros(x.shape[0], np.int64))  # 0: decide in graph
                got, bits = session.run(["sr", "bits_used"], feeds)
            else:
                got = session.run(["sr"], feeds)[0]
            if got.shape != ref.shape:
                raise ExportError(f"onnx output shape {got.shape} != PyTorch {ref.shape}")
            row: dict[str, Any] = {
                "shape": list(x.shape),
                "max_abs_diff": float(np.max(np.abs(got - ref))),
                "psnr": _psnr(got, ref, peak),
            }
            last = getattr(model, "last_bits", None)
            if gdq and last is not None:
                row["bits"] = [int(b) for b in bits]
                row["bits_torch"] = [int(b) for b in last]
            rows.append(row)
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


def mean_gate_multipliers(
    model: nn.Module, batches: Iterable[Tensor]
) -> dict[str, tuple[float, float]]:
    """Mean bound multipliers ``2·sigmoid(c)`` of every applied DDTB gate over some inputs.

    For :func:`export_onnx`'s opt-in ``static_gates`` approximation: each gated quantizer then
    uses ``(mean m_upper · upper, mean m_lower · lower)`` for every input.

    Args:
        model: a DDTB-quantized model (run in eval mode under ``no_grad``, on its device).
        batches: N×3×H×W float inputs in [0, rgb_range] (e.g. bundled LR images or tiles).

    Returns:
        Quantizer name → ``(m_upper, m_lower)``, averaged over all samples; empty if the model
        has no applied gate.
    """
    gated = {
        n: q
        for n, q in model.named_modules()
        if isinstance(q, DDTBActQuant) and q.gate is not None and q.gate_applied and q.enabled
    }
    sums = {n: torch.zeros(2, dtype=torch.float64) for n in gated}
    count = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
                count += x.shape[0]
                for n, q in gated.items():
                    c = q.last_logits
                    if c is None:
                        raise ExportError(f"{n}: the gate did not run")
                    m = 2 * torch.sigmoid(c.detach().float().reshape(c.shape[0], 2))
                    sums[n] += m.double().sum(0).cpu()
    finally:
        model.train(was_training)
    if gated and count == 0:
        raise ExportError("mean_gate_multipliers: no input batches")
    return {n: (float(v[0] / count), float(v[1] / count)) for n, v in sums.items()}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_inputs: Sequence[np.ndarray] | None = None,
    act_container: str = "uint8",
    integer_convs: bool = True,
    float_conv_weights: str = "float",
    static_gates: bool | Mapping[str, tuple[float, float]] = False,
    pixel_shuffle: str = "transpose",
) -> ExportReport:
    """Export an SR model to ONNX (module docstring: what is integer and what stays float).

    Args:
        model: a model of :mod:`lowbitsr.models` (EDSR, SRResNet, RDN), float, DDTB- or
            PAMS-quantized (trained/calibrated, or from :func:`lowbitsr.load_model` /
            :func:`~lowbitsr.deploy.pack.load_packed`), or a Granular-DQ model (inputs ``lr``
            and ``bits``, outputs ``sr`` and ``bits_used``); exported as it computes in eval
            mode.
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
        float_conv_weights: how the quantized convs that run in float (EDSR conv1, gate convs,
            SRResNet/RDN convs, convs next to a gated quantizer) store their weight:
            ``"float"`` (default) their fake-quant weight as a float32 initializer (the same
            values; onnxruntime pre-packs constant weights for its fastest, blocked NCHWc float
            kernels) or ``"codes"`` the k-bit codes as int8 + ``DequantizeLinear`` (smaller
            file; onnxruntime does not constant-fold a DequantizeLinear, so these convs run on
            its slower generic path). Convs that run as integer QLinearConv always store codes.
        static_gates: **opt-in approximation, changes numerics**: export gated DDTB quantizers
            as static QCDQ ones with fixed bounds ``(m_upper * upper, m_lower * lower)`` instead
            of the per-sample gate. True: ``m = 1`` (the gate's identity, ``c = 0``); a mapping
            quantizer name → ``(m_upper, m_lower)``, e.g. from :func:`mean_gate_multipliers`.
            Listed in :attr:`ExportReport.static_gates`; measure its PSNR before shipping.
        pixel_shuffle: ``"transpose"`` (default: Reshape/Transpose row moves, faster in
            onnxruntime than its DepthToSpace) or ``"depth_to_space"`` (one ``DepthToSpace``,
            CRD). Both move the same values.

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
    if float_conv_weights not in ("float", "codes"):
        raise ExportError(
            "export_onnx: float_conv_weights must be 'float' or 'codes', got "
            f"{float_conv_weights!r}"
        )
    if pixel_shuffle not in ("transpose", "depth_to_space"):
        raise ExportError(
            "export_onnx: pixel_shuffle must be 'transpose' or 'depth_to_space', got "
            f"{pixel_shuffle!r}"
        )
    gates: dict[str, tuple[float, float]] | None = None
    if static_gates is True:
        gates = {}
    elif isinstance(static_gates, Mapping):
        gates = {str(k): (float(v[0]), float(v[1])) for k, v in static_gates.items()}
    elif static_gates is not False:
        raise ExportError(
            "export_onnx: static_gates must be False, True or a mapping name -> "
            f"(m_upper, m_lower), got {static_gates!r}"
        )
    proto, g = _build(
        model,
        opset,
        act_container,
        integer_convs,
        float_conv_weights == "float",
        gates,
        pixel_shuffle,
    )
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
        static_gates={k: list(v) for k, v in g.report_static_gates.items()},
        granular_dq=g.report_gdq,
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
