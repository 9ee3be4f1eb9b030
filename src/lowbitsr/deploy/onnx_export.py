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

from ..quant.granular_dq.model import GranularDQModel
from ..quant.layers import (
    DDTBActQuant,
)
from .onnx_ops.archs import _ARCH_EMITTERS
from .onnx_ops.gdq import _gdq_in_graph
from .onnx_ops.graph import ExportError, _Graph
from .onnx_ops.quantizers import _act as _act

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "mean_gate_multipliers",
    "parity",
    "runtime_parity",
]


DEFAULT_OPSET = 17
#: The pixel shuffle each runtime runs fastest (``export_onnx(target=...)``).
_TARGETS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"pixel_shuffle": "transpose", "per_sample_qdq": True, "skip_guard": False},
    # OpenVINO cannot take a per-sample (axis 0) QuantizeLinear scale: gated layers as float ops.
    # skip_guard: an exact no-op Min between QA3's DequantizeLinear and the block's skip Add;
    # without it OpenVINO's CPU plugin fuses int8 Conv -> Q -> Clip -> DQ -> Add -> Q into one
    # conv whose inner quantizer clamps but does not round (QA3 runs unquantized).
    "openvino": {"pixel_shuffle": "depth_to_space", "per_sample_qdq": False, "skip_guard": True},
}


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
        fused = sum(v for k, v in self.optimized_ops.items() if k.endswith("QLinearConv"))
        adds = sum(v for k, v in self.optimized_ops.items() if k.endswith("QLinearAdd"))
        lines = [
            f"{self.path}: opset {self.opset}, {sum(self.node_counts.values())} nodes; "
            f"{len(self.integer_weights)} int8-coded conv weights, {len(self.qcdq_quantizers)} "
            f"QCDQ activation quantizers, {len(self.float_quantizers)} float-op ones (gated/GDQ)"
        ]
        if self.optimized_ops:
            lines.append(
                f"onnxruntime runs {fused} conv(s) as integer QLinearConv "
                f"({len(self.fusable_convs)} prepared)"
                + (f" and {adds} residual add(s) as QLinearAdd" if adds else "")
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
            rt = "openvino" if p.get("runtime") == "openvino" else "ort"
            lines.append(
                f"parity {'x'.join(map(str, p['shape']))}: max |{rt} - torch| "
                f"{p['max_abs_diff']:.3g}, PSNR {p['psnr']:.1f} dB"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------ public API
def _build(
    model: nn.Module,
    opset: int,
    container: str,
    integer_convs: bool = True,
    float_weights: bool = True,
    static_gates: dict[str, tuple[float, float]] | None = None,
    pixel_shuffle: str = "transpose",
    per_sample_qdq: bool = True,
    skip_guard: bool = False,
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
    g.per_sample_qdq = per_sample_qdq
    g.skip_guard = skip_guard
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


def runtime_parity(
    model: nn.Module,
    run: Any,
    inputs: Sequence[np.ndarray],
    peak: float = 255.0,
    runtime: str = "",
) -> list[dict[str, Any]]:
    """PyTorch ``model`` (eval, CPU, ``no_grad``) against ``run`` (N×3×H×W float32 array →
    array) on the same inputs: per input ``{"shape", "max_abs_diff", "psnr", "runtime"}``, as
    :func:`parity` (used for OpenVINO and the PyTorch int8 backend)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for x in inputs:
            x = np.ascontiguousarray(x, dtype=np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x.copy())).numpy()
            got = np.asarray(run(x))
            rows.append(
                {
                    "shape": list(x.shape),
                    "max_abs_diff": float(np.max(np.abs(got - ref))),
                    "psnr": _psnr(got, ref, peak),
                    "runtime": runtime,
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
    pixel_shuffle: str | None = None,
    target: str = "onnxruntime",
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
            :attr:`ExportReport.parity` with the difference to PyTorch; with
            ``target="openvino"`` OpenVINO's parity rows too (``"runtime": "openvino"``;
            needs the openvino package).
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
        pixel_shuffle: ``"transpose"`` (Reshape/Transpose row moves, faster in onnxruntime
            than its DepthToSpace) or ``"depth_to_space"`` (one ``DepthToSpace``, CRD); None =
            the target's choice. Both move the same values.
        target: the runtime the graph is tuned for (the same numbers either way):
            ``"onnxruntime"`` (default) or ``"openvino"``; it picks the pixel shuffle form when
            ``pixel_shuffle`` is None (Reshape/Transpose for onnxruntime, DepthToSpace for
            OpenVINO, each measured faster on its runtime); for OpenVINO, gated DDTB layers
            quantize with float ops (it rejects a per-sample QuantizeLinear scale), and each
            residual block's QA3 output passes a ``Min`` at its top grid value before the skip
            ``Add`` (an exact no-op: OpenVINO's CPU plugin otherwise fuses conv2 → QA3 → Add →
            next quantizer into one int8 conv whose QA3 clamps without rounding).

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
    if target not in _TARGETS:
        raise ExportError(
            f"export_onnx: target must be one of {', '.join(_TARGETS)}, got {target!r}"
        )
    if isinstance(model, GranularDQModel) and model.config.image_fab is not None:
        raise ExportError(
            f"export_onnx: this Granular-DQ model has per-image rate control (image_fab "
            f"{model.config.image_fab:g}), which the ONNX graph cannot hold (it decides each "
            "tile alone); export it after model.set_image_fab(None), and pass the bits input "
            "to keep a budget"
        )
    if pixel_shuffle is None:
        pixel_shuffle = _TARGETS[target]["pixel_shuffle"]
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
        _TARGETS[target]["per_sample_qdq"],
        _TARGETS[target]["skip_guard"],
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
        if target == "openvino":
            from .openvino_rt import OpenVinoSR, openvino_available

            if not openvino_available():
                raise ExportError(
                    f"{out}: written, but checking it for OpenVINO needs the openvino package: "
                    "pip install openvino (or export without --check)"
                )
            ov = OpenVinoSR(out)
            report.parity += runtime_parity(model, ov, check_inputs, rgb_range, "openvino")
    return report
