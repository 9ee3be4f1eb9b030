"""Pure quantizer math: fake quantization, straight-through rounding, bound statistics.

Everything here is a stateless function of tensors and Python numbers: it runs on any device, in
float32 or float64, never synchronises with the host (no ``.item()``, no branching on tensor
values) and is differentiable through autograd. Stateful modules (learned bounds, gates, lazy
initialisation, caching) live one level up and call these.

Map to ``docs/methods.md``:

=============================  ====================================================================
function                       section
=============================  ====================================================================
``round_ste``                  §1.1 ``round_ste`` (round half to even forward, identity backward)
``asym_quant_params``          §1.1 scale ``s`` and zero point ``zp``
``asym_quantize_codes``        §1.1 integer code ``q`` (for the integer exporter)
``asym_fake_quant``            §1.1 DDTB activation quantizer with two bounds (also used by §1.2)
``percentile_bounds``          §1.2 / §1.4 percentile bounds, ``torch.quantile`` in float64 exactly
``weight_bounds``              §1.2 DDTB weight bounds (shared with the packer)
``ddtb_weight_quant``          §1.2 DDTB weight quantizer (percentile + clip, or min/max no clip)
``maxabs_scale``               §1.2 / §1.8 range ``max|w| + 1e-8`` of the symmetric quantizers
``ternary_weight_quant``       §1.2 the gate's symmetric max-abs weight quantizer (k = 2: ternary)
``gate_act_quant``             §1.3 the gate's ``Q2`` (min/max bounds, per sample or per batch)
``pams_act_quant``             §1.8 PAMS symmetric activation quantizer with learned ``alpha``
``pams_weight_quant``          §1.8 PAMS symmetric per-tensor max-abs weight quantizer
``quantsr_round``              §2.3 QuantSR rounding (tanh staircase surrogate gradient)
``lsq_fake_quant``             §2.3 LSQ fake quantizer with gradient-scaled step ``alpha``
``lsq_init_alpha``             §2.3 LSQ step initialisation ``2 * mean|x| / sqrt(Qp)``
=============================  ====================================================================

Speed (the quantizers run on every activation of every training step): ``asym_fake_quant`` (and
the DDTB weight quantizer) and ``pams_act_quant`` are custom autograd Functions whose forward is
bit-identical to the plain formula and whose backward is the closed form of the gradients
autograd derives from that formula (``_AsymFakeQuant``, ``_PAMSActQuant``; the plain versions
are kept as ``_asym_fake_quant_reference`` / ``_pams_act_quant_reference`` and the tests compare
them). Without autograd (eval, ``no_grad``) they run the forward in place and save nothing.
``percentile_bounds`` selects the two order statistics instead of sorting a float64 copy.

Why one module of this size: it is the single source of the quantization formulas of all three
methods (the table above, each function a few lines plus its docstring and, for the fused
quantizers, the autograd Function); the quantizer modules, the packer and the ONNX exporter all
reproduce these numerics bit for bit, so they are kept side by side.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "asym_fake_quant",
    "asym_quant_params",
    "asym_quantize_codes",
    "ddtb_weight_quant",
    "gate_act_quant",
    "lsq_fake_quant",
    "lsq_init_alpha",
    "maxabs_scale",
    "pams_act_quant",
    "pams_weight_quant",
    "percentile_bounds",
    "quantsr_round",
    "round_ste",
    "ternary_weight_quant",
    "weight_bounds",
]

# torch.quantile refuses inputs with more elements than this ("input tensor is too large");
# percentile_bounds selects instead of calling it, so it has no such limit.
_QUANTILE_MAX_NUMEL = 2**24

# Derivative of QuantSR's staircase surrogate (tanh(frac(v) - 0.5) / tanh(0.5)) / 2 + 0.5 is
# (1 - tanh(frac(v) - 0.5)**2) * _QUANTSR_GAIN.
_QUANTSR_GAIN = 1.0 / (2.0 * math.tanh(0.5))


def _check_bits(bits: int, minimum: int, what: str) -> None:
    # bool is an int subclass; True as a bit-width is always a caller bug.
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < minimum:
        raise ValueError(
            f"{what}: bits must be an int >= {minimum}, got {bits!r}; "
            "pass the bit-width as a plain Python int (e.g. bits=4)."
        )


# --------------------------------------------------------------------------------------------
# Rounding with straight-through gradients
# --------------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward, identity backward (a custom Function keeps the forward exact,
    unlike ``x + (round(x) - x).detach()`` which can be off by one ulp)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:
        return grad_out


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer (half to even), with a straight-through gradient.

    docs/methods.md §1.1 ``round_ste``; also the rounding of §1.2 and §1.8.

    Args:
        x: any shape, floating dtype, any values.

    Returns:
        ``torch.round(x)``: same shape and dtype, integer-valued. ``d out / d x = 1`` everywhere.
    """
    return _RoundSTE.apply(x)


class _QuantSRRound(torch.autograd.Function):
    """``torch.round`` forward; backward scales by the slope of QuantSR's tanh staircase."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # frac via floor (not torch.frac, which truncates toward zero) so the surrogate is the
        # same periodic staircase for negative inputs, as in QuantSR's round_pass.
        frac = x - torch.floor(x)
        t = torch.tanh(frac - 0.5)
        return grad_out * ((1.0 - t * t) * _QUANTSR_GAIN)


def quantsr_round(x: Tensor) -> Tensor:
    """QuantSR rounding: ``torch.round`` forward, smooth-staircase gradient backward.

    docs/methods.md §2.3 "Rounding (QuantSR's)". The backward multiplies the incoming gradient by
    ``d/dv [(tanh(frac(v) - 0.5) / tanh(0.5)) / 2 + 0.5] = (1 - tanh(frac(v) - 0.5)**2)
    / (2 tanh(0.5))`` at ``v = x``, with ``frac(v) = v - floor(v)`` in ``[0, 1)``: about 0.8509 at
    integers and 1.0820 at half-integers, periodic with period 1.

    Args:
        x: any shape, floating dtype, any values.

    Returns:
        ``torch.round(x)``: same shape and dtype, integer-valued.
    """
    return _QuantSRRound.apply(x)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a Python constant backward (LSQ's g)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        # view_as: returning an input unchanged from a Function must still create a new node.
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        return grad_out * ctx.scale, None


# --------------------------------------------------------------------------------------------
# DDTB asymmetric quantizer (§1.1, §1.2, §1.3)
# --------------------------------------------------------------------------------------------


def _asym_params(lower: Tensor, upper: Tensor, bits: int, guard: bool) -> tuple[Tensor, Tensor]:
    """``(s, zp)`` of §1.1; ``guard`` replaces a zero range by 1 so that ``s`` stays finite."""
    n = 2**bits - 1
    rng = upper - lower
    if guard:
        rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    # Keep `python_int / tensor`: torch evaluates it as reciprocal(rng) * n, which is what the
    # official code computes; torch.div(n, rng) can differ in the last bit.
    s = n / rng
    zp = round_ste(s * lower) + 2 ** (bits - 1)
    return s, zp


def _asym_codes(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    clip: bool,
    guard: bool,
    clamp_codes: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Shared core of §1.1: returns ``(q, s, zp)`` so fake quant is ``(q + zp) / s``.

    Callers that pass ``guard=True`` must select their own output where ``upper == lower``.
    """
    # Clip with min/max (not clamp) so exact ties split the gradient 0.5/0.5 with the bound.
    a = torch.max(torch.min(x, upper), lower) if clip else x
    s, zp = _asym_params(lower, upper, bits, guard)
    q = round_ste(s * a - zp)
    if clamp_codes:
        # Straight-through clamp: the forward is exact (small integers), and the gradients stay
        # those of §1.1, since the clamp only moves the one code that rounding pushed past the
        # k-bit range.
        q = q + (torch.clamp(q, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) - q).detach()
    return q, s, zp


def asym_quant_params(lower: Tensor, upper: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the DDTB asymmetric quantizer, docs/methods.md §1.1.

    ``s = (2**k - 1) / (upper - lower)`` and ``zp = round(s * lower) + 2**(k-1)``; the
    dequantised value of an integer code ``q`` is ``(q + zp) / s``. In ONNX QuantizeLinear terms
    (``x = (q - z) * step``) that is ``step = 1 / s`` and ``z = -zp``. Gradients flow to the bounds
    (``round`` is straight-through).

    Args:
        lower, upper: bounds, shape ``[1]`` (per tensor) or ``[N, 1, 1, 1]`` (per sample);
            floating dtype; ``upper > lower`` (equal bounds give ``s = inf``).
        bits: bit-width ``k >= 1``.

    Returns:
        ``(s, zp)``, both of the bounds' broadcast shape and dtype. ``s > 0`` is in levels per
        unit (the reciprocal of the step); ``zp`` is integer-valued.
    """
    _check_bits(bits, 1, "asym_quant_params")
    return _asym_params(lower, upper, bits, guard=False)


def asym_quantize_codes(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    *,
    clip: bool = True,
    clamp_codes: bool = False,
) -> Tensor:
    """Integer codes of the DDTB asymmetric quantizer, docs/methods.md §1.1.

    ``q = round(s * max(min(x, upper), lower) - zp)`` with ``s, zp`` from
    :func:`asym_quant_params`, so that ``asym_fake_quant(x, ...) == (q + zp) / s`` bit for bit.

    For ``k >= 2``, ``q`` lies in ``[-2**(k-1), 2**(k-1) - 1]`` except in a corner the formula
    does not guard: when ``s * lower`` is (within float error of) a half-integer that rounds half
    to even *down*, inputs at or near ``upper`` get ``q = 2**(k-1)``, one extra level half a step
    above ``upper`` (``2**k + 1`` levels in all). This happens for **every exactly symmetric pair**
    ``lower == -upper`` (then ``s * lower = -(2**k - 1) / 2``), e.g. the official ±10 init of
    3/4-bit bounds. The official code behaves this way; ``clamp_codes=True`` clamps ``q`` to the
    k-bit range (straight-through, so gradients are unchanged), which an integer exporter needs.

    Args:
        x: ``[N, C, H, W]`` (or any shape the bounds broadcast against), floating dtype.
        lower, upper: shape ``[1]`` or ``[N, 1, 1, 1]``, ``upper > lower``.
        bits: bit-width ``k >= 1``.
        clip: clip ``x`` to the bounds first (False only when ``x`` is known to be inside them,
            as for RDN's min/max weights).
        clamp_codes: clamp ``q`` to ``[-2**(k-1), 2**(k-1) - 1]`` (False: official numerics).

    Returns:
        Integer-valued tensor of the broadcast shape of ``x`` and the bounds, floating dtype,
        straight-through differentiable.
    """
    _check_bits(bits, 1, "asym_quantize_codes")
    q, _, _ = _asym_codes(x, lower, upper, bits, clip=clip, guard=False, clamp_codes=clamp_codes)
    return q


def _asym_fake_quant_reference(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    *,
    clip: bool = True,
    clamp_codes: bool = False,
    guard: bool = False,
) -> Tensor:
    """Plain-autograd §1.1 fake quantizer: the numerical reference of :func:`asym_fake_quant`.

    Same contract as :func:`asym_fake_quant` (``guard`` as in :func:`_asym_params`). Its autograd
    graph (``torch.minimum``/``torch.maximum`` backward, the division by ``s``, the zero point)
    is the definition the fused :class:`_AsymFakeQuant` backward reproduces; tests compare the two.
    Also the fallback for inputs the fused path does not take (mixed dtypes, ``x`` broadcast by
    the bounds, a guarded range with trainable bounds).
    """
    q, s, zp = _asym_codes(x, lower, upper, bits, clip=clip, guard=guard, clamp_codes=clamp_codes)
    return (q + zp) / s


def _quant_chain(a: Tensor, s: Tensor, zp: Tensor, bits: int, clamp_codes: bool) -> Tensor:
    """``(clamp(round(s * a - zp)) + zp) / s`` in the §1.1 order, in one fresh buffer.

    Bit-identical to the reference graph: the same elementwise kernels run in the same order
    (``a * s == s * a``), only in place; the reference's straight-through clamp
    ``q + (clamp(q) - q)`` equals ``clamp(q)`` exactly because the codes are small integers.
    """
    out = torch.mul(a, s)
    out.sub_(zp).round_()
    if clamp_codes:
        out.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return out.add_(zp).div_(s)


def _asym_fq_forward(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    clip: bool,
    clamp_codes: bool,
    guard: bool,
) -> Tensor:
    """The §1.1 forward without autograd (eval, ``no_grad``): three buffers-worth of work.

    Bit-identical to :func:`_asym_fake_quant_reference`; ``x`` must already have the broadcast
    shape of ``x`` and the bounds, and all three the same dtype (see :func:`_fused_ok`).
    """
    s, zp = _asym_params(lower, upper, bits, guard)
    if not clip:
        return _quant_chain(x, s, zp, bits, clamp_codes)
    a = torch.minimum(x, upper)
    torch.maximum(a, lower, out=a)
    return _quant_chain(a, s, zp, bits, clamp_codes)


def _reduce_rows(rows: Tensor, g: Tensor, shape: torch.Size) -> Tensor:
    """``sum(rows[i] * g)`` down to the bounds' ``shape`` for every row ``i``, without a
    ``rows``-sized temporary.

    Args:
        rows: ``[r, *g.shape]`` per-element weights, contiguous.
        g: the incoming gradient, the full broadcast shape.
        shape: the bounds' broadcast shape: ``[1]`` (one matrix-vector product over
            everything), ``[N, 1, ..., 1]`` (one per sample) or any shape broadcasting to ``g``.

    Returns:
        ``[r, *shape]``, dtype of ``g``.
    """
    r = rows.shape[0]
    padded = (1,) * (g.dim() - len(shape)) + tuple(shape)
    if math.prod(padded) == 1:
        sums = torch.mv(rows.view(r, -1), g.reshape(-1))
    elif padded[0] == g.shape[0] and math.prod(padded[1:]) == 1:
        n = g.shape[0]
        rs, gs = rows.view(r, n, -1), g.reshape(n, -1)
        sums = torch.stack([torch.mv(rs[:, i], gs[i]) for i in range(n)], dim=1)
    else:
        sums = (rows * g).sum_to_size((r, *padded))
    return sums.reshape((r, *shape))


class _AsymFakeQuant(torch.autograd.Function):
    """docs/methods.md §1.1 fake quantizer: exact forward, closed-form backward in three passes.

    The forward is :func:`_quant_chain` after the min/max clip, bit-identical to
    :func:`_asym_fake_quant_reference`. The backward gives the gradients autograd derives from
    that reference graph (``t = min(x, u)``, ``a = max(t, l)``, ``s = n * (1/R)``,
    ``R = u - l``, ``zp = round_ste(s*l) + 2**(k-1)``, ``out = (round_ste(s*a - zp) + zp) / s``;
    ``g`` is the incoming gradient, sums run over the dims a bound broadcasts over):

    - The division passes ``g / s`` to ``q + zp`` and ``-sum(g * out / s)`` to ``s``; ``g / s``
      goes straight through both roundings (and the straight-through clamp) to ``s * a``, which
      passes ``(g / s) * s`` to ``a`` and ``sum((g / s) * a)`` to ``s``.
    - The zero point gets ``sum(g / s)`` from ``q + zp`` and ``-sum(g / s)`` from ``s*a - zp``:
      exactly zero, so nothing reaches ``s`` or ``l`` through ``round_ste(s * l)``.
    - Hence ``d/ds = sum(g * (a - out)) / s`` and ``d/dR = -(n * d/ds) * (1/R)**2``, which goes
      to ``u`` with sign ``+`` and to ``l`` with sign ``-``.
    - ``torch.minimum``/``torch.maximum`` send the gradient to the smaller/larger argument and
      half to each at a tie. With ``σ = sign(x - u)``, ``τ = sign(l - t)`` and
      ``ok = 1[l < u]`` (per bound element), the share of ``a``'s gradient that reaches each
      input is ``w_x = -ok (σ + τ) / 2``, ``w_u = ok (1 + σ) / 2``, ``w_l = (1 + τ) / 2``:

      ==========  =====  =====  =====
      region      w_x    w_u    w_l
      ==========  =====  =====  =====
      x > u       0      1      0
      x == u      1/2    1/2    0
      l < x < u   1      0      0
      x == l      1/2    0      1/2
      x < l       0      0      1
      l > u       0      0      1     (crossed bounds: ``a = l`` everywhere)
      ==========  =====  =====  =====

    - So ``d/dx = ((g / s) * s) * w_x``, computed as ``(g / s) * (s * w_x)``: the same bits,
      since ``w_x`` is 0, 1/2 or 1 (exact scalings); ``d/du = sum(g * w_u) + d/dR`` and
      ``d/dl = sum(g * w_l) - d/dR`` (``g`` for the reference's ``(g / s) * s``, one ulp apart,
      and summation order differ: the bound gradients agree to rounding).

    ``l == u`` gives ``s = inf`` and NaN, in the reference as here. Saved for the backward:
    ``s * w_x`` (if ``x`` needs a gradient) and a ``[3, *x.shape]`` buffer with rows ``a - out``,
    ``1 + σ``, ``1 + τ`` (if a bound does), built in the forward with in-place passes over
    buffers it needs anyway; the backward is one division, one multiplication and one
    matrix-vector product per bound element group.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        lower: Tensor,
        upper: Tensor,
        bits: int,
        clip: bool,
        clamp_codes: bool,
        guard: bool,
    ) -> Tensor:
        need_x, need_lo, need_up = ctx.needs_input_grad[:3]
        need_b = need_lo or need_up
        s, zp = _asym_params(lower, upper, bits, guard)
        ok = (lower < upper).to(s.dtype)
        rows: Tensor | None = None
        sw: Tensor | None = None
        if clip:
            rows = x.new_empty((3, *x.shape))
            a = torch.minimum(x, upper, out=rows[0])  # t, then a, then a - out
            torch.sub(x, upper, out=rows[1])
            torch.sub(lower, a, out=rows[2])
            rows[1:].sign_()  # σ, τ
            if need_x:
                sw = torch.add(rows[1], rows[2]).mul_(s * (-0.5) * ok)  # s * w_x
            torch.maximum(a, lower, out=a)
            out = _quant_chain(a, s, zp, bits, clamp_codes)
            if need_b:
                rows[1:].add_(1)  # 2 w_u / ok, 2 w_l
                a.sub_(out)
            else:
                rows = None
        else:
            out = _quant_chain(x, s, zp, bits, clamp_codes)
            if need_b:
                rows = torch.sub(x, out).unsqueeze(0)
        ctx.bits = bits
        ctx.clip = clip
        ctx.shapes = (lower.shape, upper.shape)
        ctx.save_for_backward(s, lower, upper, ok, sw, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        s, lower, upper, ok, sw, rows = ctx.saved_tensors
        need_x, need_lo, need_up = ctx.needs_input_grad[:3]
        gx = gl = gu = None
        if need_x:
            gx = torch.div(g, s).mul_(sw if ctx.clip else s)
        if need_lo or need_up:
            sums = _reduce_rows(rows, g, s.shape)
            r = torch.reciprocal(upper - lower)
            g_rng = -((sums[0] / s) * (2**ctx.bits - 1)) * (r * r)
            if ctx.clip:
                g_up = sums[1] * (0.5 * ok) + g_rng
                g_lo = sums[2] * 0.5 - g_rng
            else:
                g_up, g_lo = g_rng, -g_rng
            lo_shape, up_shape = ctx.shapes
            if need_lo:
                gl = g_lo if g_lo.shape == lo_shape else g_lo.sum_to_size(lo_shape)
            if need_up:
                gu = g_up if g_up.shape == up_shape else g_up.sum_to_size(up_shape)
        return gx, gl, gu, None, None, None, None


def _fused_ok(x: Tensor, lower: Tensor, upper: Tensor) -> bool:
    """Whether the fused path applies: one floating dtype, and ``x`` already has the full
    broadcast shape (the bounds broadcast to it, not the other way round)."""
    return (
        x.is_floating_point()
        and x.dtype == lower.dtype == upper.dtype
        and torch.broadcast_shapes(x.shape, lower.shape, upper.shape) == x.shape
    )


def _asym_fake_quant(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    clip: bool,
    clamp_codes: bool,
    guard: bool,
) -> Tensor:
    """Dispatch: no-autograd forward, fused autograd Function, or the reference graph."""
    if not _fused_ok(x, lower, upper):
        return _asym_fake_quant_reference(
            x, lower, upper, bits, clip=clip, clamp_codes=clamp_codes, guard=guard
        )
    bounds_grad = lower.requires_grad or upper.requires_grad
    if not torch.is_grad_enabled() or not (x.requires_grad or bounds_grad):
        return _asym_fq_forward(x, lower, upper, bits, clip, clamp_codes, guard)
    if guard and bounds_grad:
        # The guard's torch.where would need its own gradient rule; not a training path.
        return _asym_fake_quant_reference(
            x, lower, upper, bits, clip=clip, clamp_codes=clamp_codes, guard=guard
        )
    return _AsymFakeQuant.apply(x, lower, upper, bits, clip, clamp_codes, guard)


def asym_fake_quant(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    *,
    clip: bool = True,
    clamp_codes: bool = False,
) -> Tensor:
    """DDTB fake quantizer with two trainable bounds, docs/methods.md §1.1 (exact operation order).

    Forward::

        a   = max(min(x, upper), lower)        # skipped when clip=False
        s   = (2**k - 1) / (upper - lower)
        zp  = round(s * lower) + 2**(k-1)
        q   = round(s * a - zp)
        out = (q + zp) / s

    The grid is the multiples of ``1/s`` (anchored at 0, not at ``lower``), so the extreme levels
    can lie up to half a step outside ``[lower, upper]``. Rounding is half to even. At most
    ``2**k`` distinct outputs, except ``2**k + 1`` when ``s * lower`` is a half-integer that
    rounds down, which includes every exactly symmetric pair of bounds (see
    :func:`asym_quantize_codes`); ``clamp_codes=True`` restores the ``2**k`` bound.

    Gradients (``R = upper - lower``, summed over every element a bound broadcasts to):
    ``d out/d x = 1[lower < x < upper]``;
    ``d out/d upper = 1[x > upper] - (a - out) / R``;
    ``d out/d lower = 1[x < lower] + (a - out) / R``.
    At exact ties ``x == upper`` (or ``lower``) ``torch.min``/``torch.max`` give ``x`` and the
    bound 0.5 of the clip gradient each. With ``clip=False``, ``d out/d x = 1`` everywhere.

    Implementation: a custom autograd Function (:class:`_AsymFakeQuant`) whose forward is bit
    for bit the formula above and whose backward gives the gradients autograd derives from it
    (the ``x`` gradient bit for bit, the bound gradients up to summation order): about 18
    full-tensor passes per training step instead of about 45 for the plain autograd graph.
    Without autograd (eval, ``no_grad``) only the forward runs, in place (8 passes, nothing
    saved). Inputs where ``x`` is broadcast by the bounds or dtypes differ use the plain graph.

    Args:
        x: ``[N, C, H, W]`` (any shape the bounds broadcast against), float32 or float64.
        lower, upper: shape ``[1]`` (per tensor) or ``[N, 1, 1, 1]`` (per sample; each sample
            gets its own grid); ``upper > lower`` (not checked: equal bounds give NaN).
        bits: bit-width ``k >= 1``.
        clip, clamp_codes: see :func:`asym_quantize_codes`.

    Returns:
        Fake-quantized tensor, broadcast shape of ``x`` and the bounds, same dtype.
    """
    _check_bits(bits, 1, "asym_fake_quant")
    return _asym_fake_quant(x, lower, upper, bits, clip, clamp_codes, guard=False)


def _quantile_select(flat: Tensor, q: float) -> Tensor:
    """``torch.quantile(flat.double(), q)`` (linear interpolation), bit for bit, by selection.

    Reproduces torch.quantile's arithmetic: rank ``q * (n - 1)`` in float64,
    ``below = trunc(rank)``, ``above = ceil(rank)``, ``lerp(v[below], v[above], rank - below)`` in
    float64, and NaN if the input holds any NaN. The two order statistics are exact elements of
    ``flat``, and converting to float64 is exact and monotone, so they are selected in ``flat``'s
    own dtype with ``topk`` on the nearer tail (O(n), no full sort, no float64 copy of the
    tensor, no size limit); only they are converted. The ranks are Python numbers (they depend on
    shapes only). The one difference a sort could make, which of ``-0.0``/``+0.0`` sits at a
    rank, does not change any value.

    Args:
        flat: 1-D, floating dtype, non-empty.
        q: in ``[0, 1]``.

    Returns:
        0-dim float64 tensor on ``flat``'s device.
    """
    n = flat.numel()
    rank = q * (n - 1)
    below = int(rank)
    above = math.ceil(rank)
    if above + 1 <= n - below:
        vals = torch.topk(flat, above + 1, largest=False, sorted=True).values
        v_below, v_above = vals[below], vals[above]
    else:
        vals = torch.topk(flat, n - below, largest=True, sorted=True).values
        v_below, v_above = vals[n - 1 - below], vals[n - 1 - above]
    out = torch.lerp(v_below.double(), v_above.double(), rank - below)
    nan = torch.full_like(out, float("nan"))
    return torch.where(torch.isnan(flat).any(), nan, out)


def percentile_bounds(t: Tensor, q_low: float, q_high: float) -> tuple[Tensor, Tensor]:
    """Percentile bounds of a tensor, docs/methods.md §1.2 (weights) and §1.4 (bound init).

    Each bound is ``torch.quantile(t.detach().double().flatten(), q / 100).float()`` (linear
    interpolation in float64, then rounded to float32), computed bit for bit by selecting the two
    neighbouring order statistics with ``topk`` (:func:`_quantile_select`) instead of sorting a
    float64 copy: this runs every training forward of every percentile-mode weight, where the
    sort cost 3.5 ms for a 64-channel 3×3 conv and 80 ms for a 256-channel one (CPU, one thread).
    There is no size limit (torch.quantile refuses more than 2**24 elements). No gradient flows
    to ``t``.

    Args:
        t: any shape, non-empty, floating dtype, any device.
        q_low, q_high: percentiles in ``[0, 100]`` with ``q_low <= q_high`` (e.g. 1 and 99).

    Returns:
        ``(lower, upper)``: float32 tensors of shape ``[1]`` on ``t``'s device.
    """
    if not 0.0 <= q_low <= q_high <= 100.0:
        raise ValueError(
            f"percentile_bounds: need 0 <= q_low <= q_high <= 100, got q_low={q_low!r}, "
            f"q_high={q_high!r}; percentiles are in percent (e.g. 1 and 99)."
        )
    if t.numel() == 0:
        raise ValueError("percentile_bounds: the tensor is empty; pass at least one element.")
    flat = t.detach().flatten()
    lower = _quantile_select(flat, q_low / 100).float().reshape(1)
    upper = _quantile_select(flat, q_high / 100).float().reshape(1)
    return lower, upper


def ddtb_weight_quant(
    w: Tensor,
    bits: int,
    mode: Literal["percentile", "minmax"] = "percentile",
    *,
    clamp_codes: bool = False,
) -> Tensor:
    """DDTB per-tensor asymmetric weight quantizer, docs/methods.md §1.2.

    The §1.1 formula with bounds computed from ``w.detach()`` (no gradient through them):

    - ``"percentile"`` (EDSR, SRResNet): 1st/99th percentile (:func:`percentile_bounds`), weights
      clipped to them with min/max; ``d out/d w = 1`` inside, 0 outside (0.5 at exact ties).
    - ``"minmax"`` (RDN): ``w.min()``/``w.max()`` and no clip op, so ``d out/d w = 1`` everywhere.

    A tensor whose bounds coincide (e.g. a constant weight) is returned unchanged instead of the
    NaN the formula would give (the official code has no guard; it produces NaN there).

    Args:
        w: conv weight ``[C_out, C_in, kH, kW]`` (any shape), float32 or float64.
        bits: bit-width ``k >= 1``.
        mode: ``"percentile"`` or ``"minmax"``.
        clamp_codes: keep codes in the k-bit range (see :func:`asym_quantize_codes`); False
            reproduces the official numerics.

    Returns:
        Fake-quantized weight, same shape and dtype, at most ``2**k`` distinct values (``2**k+1``
        in the corner described in :func:`asym_quantize_codes` unless ``clamp_codes``).
    """
    _check_bits(bits, 1, "ddtb_weight_quant")
    lower, upper, clip = weight_bounds(w, mode)
    # The bounds carry no gradient, so the fused path only prepares d out/d w (see asym_fake_quant).
    out = _asym_fake_quant(w, lower, upper, bits, clip, clamp_codes, guard=True)
    return torch.where(upper == lower, w, out)


def weight_bounds(w: Tensor, mode: Literal["percentile", "minmax"]) -> tuple[Tensor, Tensor, bool]:
    """``(lower, upper, clip)`` of the DDTB weight quantizer (:func:`ddtb_weight_quant`): the
    1st/99th percentile of ``w.detach()`` with clipping (``"percentile"``) or its min/max without
    (``"minmax"``), shape ``[1]``, in ``w``'s dtype. Shared with the packer
    (:func:`lowbitsr.deploy.pack.weight_codes`), which must find exactly these bounds.

    Raises:
        ValueError: an unknown ``mode``.
    """
    wd = w.detach()
    if mode == "percentile":
        lower, upper = percentile_bounds(wd, 1.0, 99.0)
        return lower.to(w.dtype), upper.to(w.dtype), True
    if mode == "minmax":
        return wd.min().reshape(1), wd.max().reshape(1), False
    raise ValueError(
        f"ddtb_weight_quant: unknown mode {mode!r}; use 'percentile' (EDSR, SRResNet) or "
        "'minmax' (RDN)."
    )


def maxabs_scale(w: Tensor) -> Tensor:
    """``m = max|w.detach()| + 1e-8`` (a 0-d tensor), the range of the symmetric max-abs weight
    quantizers (:func:`pams_weight_quant`, :func:`ternary_weight_quant`) and of their packed
    codes."""
    return w.detach().abs().max() + 1e-8


def _maxabs_sym_quant(w: Tensor, bits: int) -> Tensor:
    # Operation order mirrors the official quant_weight: (w * qmax) / m, round, (q * m) / qmax.
    qmax = 2.0 ** (bits - 1) - 1.0
    m = maxabs_scale(w)
    return round_ste(w * qmax / m) * m / qmax


def ternary_weight_quant(w: Tensor, bits: int = 2) -> Tensor:
    """The DDTB gate's symmetric per-tensor max-abs weight quantizer, docs/methods.md §1.2.

    ``qmax = 2**(k-1) - 1`` (1 at k = 2, i.e. ternary), ``m = max|w.detach()| + 1e-8``,
    ``w_q = round(w * qmax / m) * m / qmax`` in exactly that order. Backward is the identity to
    ``w`` (``m`` carries no gradient, the rounding is straight-through).

    Args:
        w: weight, any shape, float32 or float64.
        bits: ``k >= 2`` (default 2: values in ``{-m, 0, m}``).

    Returns:
        Same shape and dtype, at most ``2**k - 1`` distinct values, symmetric about 0.
    """
    _check_bits(bits, 2, "ternary_weight_quant")
    return _maxabs_sym_quant(w, bits)


def gate_act_quant(
    g: Tensor, bits: int = 2, per_sample: bool = True, straight_through: bool = True
) -> Tensor:
    """The DDTB gate's activation quantizer ``Q2``, docs/methods.md §1.3.

    The §1.1 formula (without the clip, which is a no-op here) with ``lower = min``,
    ``upper = max`` of the input, computed without gradient:

    - ``per_sample=True`` (default): min/max over all non-batch dims of each sample, bounds
      ``[N, 1, ..., 1]``; a sample's output does not depend on the rest of the batch.
      ``per_sample=False`` (official): min/max over the whole batch tensor.
    - ``straight_through=True`` (default): ``d out/d g = 1`` everywhere, so the whole gate trains.
      ``straight_through=False`` (official): the input is detached and the output carries no
      gradient (only the gate's last conv then learns).

    Degenerate range (all of a sample's values equal — e.g. an all-zero ReLU output — or, with
    ``per_sample=False``, the whole batch): that sample is returned unchanged. This also holds in
    the official configuration. The official code has no guard: ``s = 3 / 0 = inf`` makes the
    output NaN (``inf * 0`` or ``inf - inf``), the NaN reaches the layer's bounds and the
    official forward then stops in its NaN check, so there is no finite official output to
    match; for every non-degenerate input ``per_sample=False, straight_through=False`` is bit
    exact with the official ``quant_activation``.

    Args:
        g: gate features, ``[N, C, 1, 1]`` (any shape with the batch first), float32 or float64.
        bits: ``k >= 1`` (2 in DDTB).
        per_sample: bounds per sample (True) or per batch tensor (False, official).
        straight_through: pass gradients to ``g`` (True) or detach it (False, official).

    Returns:
        Same shape and dtype as ``g``, at most ``2**k`` distinct values per sample (per batch
        when ``per_sample=False``; ``2**k + 1`` in the corner of :func:`asym_quantize_codes`,
        e.g. a sample whose min is exactly minus its max, as in the official code).
    """
    _check_bits(bits, 1, "gate_act_quant")
    x = g if straight_through else g.detach()
    gd = g.detach()
    if per_sample:
        dims = tuple(range(1, g.dim()))
        lower = gd.amin(dim=dims, keepdim=True)
        upper = gd.amax(dim=dims, keepdim=True)
    else:
        lower, upper = gd.min().reshape(1), gd.max().reshape(1)
    q, s, zp = _asym_codes(x, lower, upper, bits, clip=False, guard=True)
    return torch.where(upper == lower, x, (q + zp) / s)


# --------------------------------------------------------------------------------------------
# PAMS (§1.8)
# --------------------------------------------------------------------------------------------


def _pams_act_quant_reference(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Plain-autograd §1.8 quantizer: the numerical reference of :func:`pams_act_quant` (and
    its fallback for mixed dtypes or an ``x`` that the clip value broadcasts)."""
    qmax = 2.0 ** (bits - 1) - 1.0
    a = torch.clamp(x, -alpha, alpha)
    return round_ste(a * qmax / alpha) * alpha / qmax


class _PAMSActQuant(torch.autograd.Function):
    """docs/methods.md §1.8 quantizer: the reference's forward bits, closed-form backward.

    Reference graph: ``c = clamp(x, -alpha, alpha)``, ``v = (c * q) / alpha``,
    ``out = (round_ste(v) * alpha) / q``. The clamp is computed as ``min(max(x, -alpha), alpha)``
    (the same values, and much faster on CPU than clamp with tensor bounds). Autograd of the
    reference gives, with ``t = max(x, -alpha)``, ``hi = sign(t - c)``, ``lo = sign(t - x)`` and
    ``ok = 1[-alpha < alpha]``:

    - ``d/dx = ((((g / q) * alpha) / alpha) * q) * m`` with ``m = ok (1 - hi - lo)``: 1 for
      ``-alpha <= x <= alpha`` (clamp gives ties to ``x``), else 0; computed as
      ``(((g / q) * alpha) / alpha) * (q * m)``, the same bits (``m`` is 0 or 1);
    - ``d/dalpha = sum(g * (round(v) - v)) / q + sum(g_c * hi) - ok * sum(g_c * lo)``: the
      ``out`` and ``v`` terms, then the clamp's max argument (``x > alpha``, or everything
      when ``alpha < 0``) and its min argument ``-alpha`` (``x < -alpha`` and ``alpha > 0``);
      ``g`` stands in for ``g_c = ((g / q) * alpha / alpha) * q`` (an ulp apart).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, bits: int) -> Tensor:
        need_x, need_a = ctx.needs_input_grad[:2]
        qmax = 2.0 ** (bits - 1) - 1.0
        neg = -alpha
        ok = (neg < alpha).to(x.dtype)
        rows = x.new_empty((3, *x.shape))
        t = torch.maximum(x, neg)
        c = torch.minimum(t, alpha, out=rows[0])
        torch.sub(t, c, out=rows[1])
        torch.sub(t, x, out=rows[2])
        rows[1:].sign_()  # hi, lo
        qm: Tensor | None = None
        if need_x:
            qm = torch.add(rows[1], rows[2], out=t).sub_(1).mul_(ok * -qmax)  # q * m
        v = c.mul_(qmax).div_(alpha)
        out = torch.round(v)
        if need_a:
            torch.sub(out, v, out=rows[0])  # round(v) - v
        out.mul_(alpha).div_(qmax)
        ctx.qmax = qmax
        ctx.save_for_backward(alpha, ok, qm, rows if need_a else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        alpha, ok, qm, rows = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        qmax = ctx.qmax
        gx = ga = None
        if need_x:
            # q == 1 (2 bits): dividing and multiplying by 1.0 are exact, so they are skipped.
            y = torch.mul(g, alpha) if qmax == 1.0 else torch.div(g, qmax).mul_(alpha)
            gx = y.div_(alpha).mul_(qm)
        if need_a:
            sums = _reduce_rows(rows, g, alpha.shape)
            ga = sums[0] / qmax + sums[1] - ok * sums[2]
        return gx, ga, None


def pams_act_quant(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PAMS symmetric activation quantizer with a learnable clipping value, docs/methods.md §1.8.

    ``out = round(clamp(x, -alpha, alpha) * q / alpha) * alpha / q`` with ``q = 2**(k-1) - 1``,
    in that order (as in the official ``pams_quant_act``; the official clip uses min/max, which
    only differs from ``clamp`` in how exact ties split the gradient).

    Gradients (``c = clamp(x, -alpha, alpha)``, rounding straight-through):
    ``d out/d x = 1[-alpha <= x <= alpha]``;
    ``d out/d alpha = sign(x) * 1[|x| > alpha] + (out - c) / alpha``, summed over elements.
    Outside the range ``out = ±alpha`` exactly so the second term vanishes there; inside it is the
    rounding error divided by ``alpha``.

    Implementation: as :func:`asym_fake_quant`, a custom autograd Function
    (:class:`_PAMSActQuant`) with the reference's forward bits, the reference's ``x`` gradient
    bits and its ``alpha`` gradient up to summation order; an in-place forward without autograd.

    Args:
        x: activation, any shape, float32 or float64.
        alpha: clipping value, shape ``[1]``, ``alpha > 0``.
        bits: ``k >= 2``.

    Returns:
        Same shape and dtype as ``x``; values ``j * alpha / q`` for integer ``|j| <= q``
        (at most ``2**k - 1`` levels).
    """
    _check_bits(bits, 2, "pams_act_quant")
    if not _fused_ok(x, alpha, alpha):
        return _pams_act_quant_reference(x, alpha, bits)
    if not torch.is_grad_enabled() or not (x.requires_grad or alpha.requires_grad):
        qmax = 2.0 ** (bits - 1) - 1.0
        c = torch.maximum(x, -alpha)
        torch.minimum(c, alpha, out=c)
        return c.mul_(qmax).div_(alpha).round_().mul_(alpha).div_(qmax)
    return _PAMSActQuant.apply(x, alpha, bits)


def pams_weight_quant(w: Tensor, bits: int) -> Tensor:
    """PAMS weight quantizer: symmetric per-tensor max-abs, docs/methods.md §1.8.

    Same computation as the official PAMS ``quant_weight`` (which DDTB reuses for its gate, see
    :func:`ternary_weight_quant`): ``m = max|w.detach()| + 1e-8``, ``qmax = 2**(k-1) - 1``,
    ``round(w * qmax / m) * m / qmax``; identity gradient to ``w``.

    Args:
        w: weight, any shape, float32 or float64.
        bits: ``k >= 2``.

    Returns:
        Same shape and dtype, at most ``2**k - 1`` distinct values.
    """
    _check_bits(bits, 2, "pams_weight_quant")
    return _maxabs_sym_quant(w, bits)


# --------------------------------------------------------------------------------------------
# LSQ / QuantSR (Granular-DQ, §2.3)
# --------------------------------------------------------------------------------------------


def _lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Qn, Qp)``: codes lie in ``[-Qn, Qp]``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_fake_quant(
    x: Tensor,
    alpha: Tensor,
    bits: int,
    signed: bool,
    grad_scale: float | None = None,
    *,
    official: bool = False,
) -> Tensor:
    """LSQ fake quantizer with QuantSR rounding (Granular-DQ activations and weights), §2.3.

    ``out = quantsr_round(clamp(x / alpha, -Qn, Qp)) * alpha`` with ``(Qn, Qp) =
    (2**(k-1), 2**(k-1) - 1)`` if ``signed`` else ``(0, 2**k - 1)``. The forward uses ``alpha``
    exactly; only its gradient is multiplied by ``g = grad_scale`` (default
    ``1 / sqrt(x.numel() * Qp)``, LSQ's step-size gradient scale, a Python float).

    ``official=True`` (Granular-DQ ``compat="official"``) reproduces the released code's
    ``grad_scale``: the forward uses ``alpha' = (alpha - alpha * g) + alpha * g`` in ``x``'s
    dtype, which can be one ulp away from ``alpha`` (the codes do not change; the output moves
    by up to an ulp of ``alpha`` per code), and the gradient reaches ``alpha`` through
    ``alpha * g``.

    Gradients (``v = x / alpha``, ``r`` = round, ``r'`` = QuantSR factor at ``v``, see
    :func:`quantsr_round`): inside ``-Qn <= v <= Qp``: ``d out/d x = r'(v)``,
    ``d out/d alpha = g * (r(v) - r'(v) * v)``; below: ``0`` and ``-g * Qn``; above: ``0`` and
    ``g * Qp``. (With plain STE rounding, ``r' = 1`` gives LSQ's published gradient.)

    Args:
        x: any shape, float32 or float64.
        alpha: step size, shape ``[1]``, ``alpha > 0``.
        bits: ``k >= 2`` if signed, ``k >= 1`` otherwise.
        signed: symmetric signed range (inputs with negatives, weights) or unsigned.
        grad_scale: multiplier for alpha's gradient; None for the LSQ default.
        official: the released forward value of the step (see above).

    Returns:
        Same shape and dtype as ``x``; values ``j * alpha`` for integer ``j`` in ``[-Qn, Qp]``
        (``j * alpha'`` when ``official``).
    """
    _check_bits(bits, 2 if signed else 1, "lsq_fake_quant")
    qn, qp = _lsq_range(bits, signed)
    g = 1.0 / math.sqrt(x.numel() * qp) if grad_scale is None else float(grad_scale)
    if official:
        a_g = alpha * g
        alpha_s = (alpha - a_g).detach() + a_g
    else:
        alpha_s = _ScaleGrad.apply(alpha, g)
    return quantsr_round(torch.clamp(x / alpha_s, -qn, qp)) * alpha_s


def lsq_init_alpha(x: Tensor, bits: int, signed: bool) -> Tensor:
    """LSQ step initialisation ``2 * mean|x| / sqrt(Qp)``, docs/methods.md §2.3.

    Args:
        x: the first batch of the quantizer's input (or the weight), any shape, floating dtype.
        bits, signed: as in :func:`lsq_fake_quant` (``Qp = 2**(k-1) - 1`` or ``2**k - 1``).

    Returns:
        Shape ``[1]``, dtype of ``x``, no gradient; ``> 0`` unless ``x`` is all zeros.
    """
    _check_bits(bits, 2 if signed else 1, "lsq_init_alpha")
    _, qp = _lsq_range(bits, signed)
    return (2 * x.detach().abs().mean() / math.sqrt(qp)).reshape(1)
