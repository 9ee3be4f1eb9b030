"""ONNX emitters of the activation quantizers: DDTB/PAMS static QDQ, per-sample fake
quantization with dynamic gates, the gate branch itself.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...quant.functional import asym_quant_params, asym_quantize_codes
from ...quant.layers import (
    DDTBActQuant,
    DynamicGate,
    PAMSActQuant,
)
from .graph import ExportError, _f32, _Graph, _QParams
from .layers import _bn_torch_order, _conv

_INT8_MIN, _INT8_MAX = -128, 127


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


def _codes(g: _Graph, x: str, qp: _QParams, lo: int, hi: int, name: str, relu: bool = False) -> str:
    """``QuantizeLinear → Clip``: the 8-bit container codes of ``x``. ``relu``: the quantizer
    reads ``relu(x)``; folded into the Clip's lower end, the code of 0 (the zero point), which is
    exact: ``Q(relu(x)) = max(Q(x), Q(0))`` (rounding is monotone and 0 is a grid point)."""
    dtype = np.int8 if qp.container == "int8" else np.uint8
    c = g.op("QuantizeLinear", [x, g.const(qp.step), g.const(qp.zero, dtype)], name)
    floor = max(lo, qp.zero) if relu else lo
    info = np.iinfo(dtype)
    if floor == info.min and hi == info.max:  # 8-bit codes: the Clip would be a no-op
        return c
    return g.op("Clip", [c, g.const(floor, dtype), g.const(hi, dtype)], name)


def _dequant(g: _Graph, codes: str, qp: _QParams, name: str) -> str:
    dtype = np.int8 if qp.container == "int8" else np.uint8
    return g.op("DequantizeLinear", [codes, g.const(qp.step), g.const(qp.zero, dtype)], name)


def _qcdq(g: _Graph, x: str, qp: _QParams, lo: int, hi: int, name: str) -> str:
    return _dequant(g, _codes(g, x, qp, lo, hi, name), qp, name)


def _pams_params(q: PAMSActQuant, container: str, name: str) -> tuple[_QParams, int, int]:
    qmax = 2 ** (q.bits - 1) - 1
    alpha = float(q.alpha.detach().cpu().float()[0])
    if alpha <= 0:
        raise ExportError(f"{name}: PAMS alpha must be > 0, got {alpha}")
    zero, lo, hi = _container(0, -qmax, qmax, container)  # type: ignore[misc]
    return _QParams(float(np.float32(alpha / qmax)), zero, container, hi), lo, hi


def static_act_params(
    q: nn.Module | None, container: str = "uint8", name: str = "quantizer"
) -> tuple[_QParams, int, int] | None:
    """``(QParams, code_min, code_max)`` of an enabled PAMS or ungated DDTB quantizer in an
    8-bit ``container``; None for anything else or codes that do not fit."""
    if isinstance(q, PAMSActQuant) and q.enabled:
        return _pams_params(q, container, name)
    if isinstance(q, DDTBActQuant) and q.enabled and q.gate is None:
        return _ddtb_static_params(q, container)
    return None


def _act_codes(
    g: _Graph, x: str, q: nn.Module | None, name: str, relu: bool = False
) -> tuple[str, _QParams] | None:
    """A static quantizer as its codes only (``QuantizeLinear → Clip``, see :func:`_codes`), for
    the integer layout, where codes move (pixel shuffle) before they are dequantized. None when
    ``q`` is not a static quantizer that fits the container."""
    static = static_act_params(q, g.container, name) if _is_static(g, q) else None
    if static is None:
        return None
    qp, lo, hi = static
    g.report_qcdq.append(name)
    return _codes(g, x, qp, lo, hi, name, relu), qp


def _act(g: _Graph, x: str, q: nn.Module | None, name: str) -> tuple[str, _QParams | None]:
    """An activation quantizer: ``(output, QParams)`` when static (QCDQ), ``(output, None)``
    for float-op quantizers and identities."""
    if q is None or not getattr(q, "enabled", True):
        return x, None
    if isinstance(q, PAMSActQuant):
        qp, lo, hi = _pams_params(q, g.container, name)
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
