"""Granular-DQ's quantized layers (docs/methods.md §2.3): the shared :class:`BitContext` (the
per-sample bit selection every layer reads), the hard Gumbel one-hot, the LSQ/QuantSR activation
quantizer with one step per candidate bit (:class:`GDQActQuantizer`) and :class:`GDQConv2d`.
Re-exported by :mod:`lowbitsr.quant.gdq_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import lsq_fake_quant, lsq_init_alpha, quantsr_round
from .layers import conv_geometry

# --------------------------------------------------------------------------------------------
# Shared per-sample state
# --------------------------------------------------------------------------------------------


class BitContext:
    """The per-sample bit selection of the current forward pass, shared by all quantized layers.

    Set once per forward by :class:`GranularBitController` (through the model wrapper), read by
    every :class:`GDQConv2d`. It is a plain object, not a module: it owns no state that belongs
    in a checkpoint, and the model clears it at the end of each forward so no autograd graph
    outlives the pass.

    Attributes:
        candidates: the sorted candidate bit-widths, e.g. ``(4, 5, 6, 8)``; column ``j`` of ``y``
            is ``candidates[j]``.
        y: ``[N, B]`` one-hot selection (exactly 0/1 forward; in training with a learned gate its
            backward is the Gumbel-softmax gradient, docs/methods.md §2.1). None outside a forward.
        sel: ``[N]`` int64, column index of each sample's selected bit-width.
        counts: ``[B]`` float, how many samples selected each bit-width (the LSQ gradient scale
            of a bit's α uses the number of elements that bit quantized).
        bits: ``[N]`` int64, the selected bit-width of each sample.
        lr: the network input of the current forward, ``[N, 3, H, W]`` in ``[0, rgb_range]``
            (E2B measures its entropy).
        rgb_range: the value of white in ``lr``.
        forced: ``[N]`` int64 bit-widths imposed by the caller (tiled inference decides the bits
            of all tiles first, then runs each bit-width group); None = let the controller decide.
    """

    def __init__(self, candidates: Sequence[int]) -> None:
        self.candidates: tuple[int, ...] = tuple(sorted({int(b) for b in candidates}))
        self.rgb_range = 255.0
        self.forced: Tensor | None = None
        self.clear()

    def clear(self) -> None:
        """Forget the current pass (the forced bits, a caller setting, are kept)."""
        self.y: Tensor | None = None
        self.sel: Tensor | None = None
        self.counts: Tensor | None = None
        self.bits: Tensor | None = None
        self.lr: Tensor | None = None

    def set_selection(self, y: Tensor, candidates: Tensor) -> None:
        """Store the ``[N, B]`` one-hot ``y`` and derive ``sel``, ``counts`` and ``bits``.

        ``candidates`` is the ``[B]`` int64 tensor of bit-widths on ``y``'s device.
        """
        yd = y.detach()
        self.y = y
        self.sel = yd.argmax(dim=1)
        self.counts = yd.sum(dim=0)
        self.bits = candidates[self.sel]

    def require(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, sel, counts)``; raises if no controller has run in this forward."""
        if self.y is None or self.sel is None or self.counts is None:
            raise RuntimeError(
                "Granular-DQ layer called without a bit selection: call the quantized model "
                "returned by quantize_granular_dq (its forward runs the bit controller first), "
                "not the inner network directly."
            )
        return self.y, self.sel, self.counts

    def __deepcopy__(self, memo: dict[int, Any]) -> BitContext:
        # A copy starts empty: the current pass's tensors may carry an autograd graph (which
        # cannot be deep-copied) and belong to the original model anyway.
        new = BitContext(self.candidates)
        new.rgb_range = self.rgb_range
        memo[id(self)] = new
        return new


class _HardOneHot(torch.autograd.Function):
    """Forward: exact one-hot of the argmax of ``soft``; backward: identity to ``soft``.

    The usual ``hard - soft.detach() + soft`` is not exactly 0/1 in floating point; the
    selected layer output must be exactly ``Q_b(x)`` (docs/methods.md §2.1), so the forward is built
    directly.
    """

    @staticmethod
    def forward(ctx: Any, soft: Tensor) -> Tensor:
        return F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:
        return grad_out


def hard_gumbel_softmax(
    logits: Tensor, tau: float, noise: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Straight-through hard Gumbel-softmax over the last dim (docs/methods.md §2.1).

    Args:
        logits: ``[N, K]`` gate logits.
        tau: temperature ``> 0``.
        noise: add Gumbel(0, 1) noise (training; and at eval in the official code).
        generator: random generator of the noise (None = torch's global one).

    Returns:
        ``[N, K]`` exact one-hot forward; backward is the gradient of
        ``softmax((logits + G) / tau)``.
    """
    if noise:
        # -log(Exp(1)) ~ Gumbel(0, 1), as torch.nn.functional.gumbel_softmax samples it.
        gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
        logits = logits + gumbels
    return _HardOneHot.apply(torch.softmax(logits / tau, dim=-1))


class _ScaleGradPerSample(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a per-sample tensor ``g`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor) -> Tensor:
        ctx.save_for_backward(g)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (g,) = ctx.saved_tensors
        return grad_out * g, None


# --------------------------------------------------------------------------------------------
# Quantized layers (§2.3)
# --------------------------------------------------------------------------------------------


class GDQActQuantizer(nn.Module):
    """LSQ/QuantSR activation quantizer, one step ``α_b`` per candidate bit (docs/methods.md §2.3).

    For each sample ``i`` with selected bit-width ``b_i`` (from the :class:`BitContext`)::

        x'   = x + shift                    (default; the official code adds it after: no effect)
        Q(x) = quantsr_round(clamp(x' / α_b, -Qn_b, Qp_b)) * α_b
        out  = y[i, b_i] * Q(x)[i]          (= exactly Q(x)[i] forward, since y is one-hot)

    which is ``sum_n y_n Q_{b_n}(x)`` of §2.1 evaluated for the selected term only. Instead of
    splitting the batch by bit-width (a host sync to size the groups), each sample gathers its
    own ``α``, ``Qn``, ``Qp``: one elementwise pass, bit-for-bit the value of
    :func:`~lowbitsr.quant.functional.lsq_fake_quant` on that sample at ``b_i``. ``α_b`` gets the
    LSQ gradient scale ``1 / sqrt(numel_b * Qp_b)`` with ``numel_b`` the elements quantized at
    ``b`` in this batch.

    Official mode reproduces the released ``grad_scale``: the step used in the forward pass is
    ``(α - α s) + α s`` (which can be one ulp away from ``α``; the codes do not change, the
    outputs move by about 1e-7 relative), the gradient scale is ``s``, and ``s = 1 /
    math.sqrt(numel * Qp_b)`` is a Python float with ``numel`` the whole batch (the released
    code evaluates every quantizer on it); see :meth:`_official_scales`.

    Lazy initialisation (first training forward): signed iff the input has values below
    ``-1e-5``, then ``α_b = 2 mean|x| / sqrt(Qp_b)`` for every candidate ``b``.

    Args:
        channels: input channels (for the per-channel shift ``[1, C, 1, 1]``).
        candidates: sorted candidate bit-widths (e.g. ``(4, 5, 6, 8)``).
        official: compat mode (shift unused, the released step and gradient scale).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``, same dtype.
    """

    initialized: Tensor
    signed: Tensor
    _qn: Tensor
    _qp: Tensor

    def __init__(self, channels: int, candidates: Sequence[int], official: bool = False) -> None:
        super().__init__()
        self.candidates = tuple(int(b) for b in candidates)
        self.official = bool(official)
        self.alpha = nn.Parameter(torch.ones(len(self.candidates)))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("_qn", torch.zeros(len(self.candidates)), persistent=False)
        self.register_buffer("_qp", torch.zeros(len(self.candidates)), persistent=False)
        # Python mirrors of the two flags so that the forward never reads a tensor to branch.
        self._needs_init = True
        self._signed = False
        self._set_ranges(False)
        # Official mode: cache of the released gradient scales (see _official_scales).
        self._scales_key: tuple[Any, ...] | None = None
        self._scales = torch.zeros(0)

    def _set_ranges(self, signed: bool) -> None:
        self._signed = signed
        qn = [2 ** (b - 1) if signed else 0 for b in self.candidates]
        qp = [2 ** (b - 1) - 1 if signed else 2**b - 1 for b in self.candidates]
        self._qn.copy_(torch.tensor(qn, dtype=self._qn.dtype))
        self._qp.copy_(torch.tensor(qp, dtype=self._qp.dtype))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """LSQ init from a batch ``x`` (the layer input, shift included): docs/methods.md §2.3."""
        signed = bool((x.min() < -1e-5).item())  # once, at calibration: a host sync is fine here
        for j, b in enumerate(self.candidates):
            self.alpha[j] = lsq_init_alpha(x, b, signed)[0]
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._set_ranges(signed)
        self._needs_init = False

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # Re-derive the Python mirrors from the loaded flags (a checkpoint is initialised).
        self._needs_init = not bool(self.initialized)
        self._set_ranges(bool(self.signed))

    def forward(self, x: Tensor, ctx: BitContext) -> Tensor:
        if not self.official:
            x = x + self.shift
        if self._needs_init:
            if not self.training:
                raise RuntimeError(
                    "Granular-DQ activation quantizer is not initialised: run one training-mode "
                    "forward first (calibrate_granular_dq(model, lr)) or load a trained checkpoint."
                )
            self.initialize(x)
        y, sel, counts = ctx.require()
        n = x.shape[0]
        bshape = (n,) + (1,) * (x.dim() - 1)
        qn = self._qn[sel].to(x.dtype).view(bshape)
        qp = self._qp[sel].to(x.dtype)
        alpha = self.alpha[sel].to(x.dtype)
        if self.official:
            # The released grad_scale: forward value (a - a s) + a s (can be one ulp away
            # from a), gradient s, with s = 1 / sqrt(numel * Qp) of the whole batch.
            a_s = alpha * self._official_scales(x.numel(), x)[sel]
            alpha = ((alpha - a_s).detach() + a_s).view(bshape)
        else:
            # LSQ gradient scale g = 1 / sqrt(numel * Qp) with the numel this bit quantized.
            g = torch.rsqrt(counts[sel].to(x.dtype) * x[0].numel() * qp)
            alpha = _ScaleGradPerSample.apply(alpha, g).view(bshape)
        q = quantsr_round(torch.clamp(x / alpha, -qn, qp.view(bshape))) * alpha
        return q * y.gather(1, sel[:, None]).to(x.dtype).view(bshape)

    def _official_scales(self, numel: int, like: Tensor) -> Tensor:
        """``[B]`` released LSQ gradient scales ``1 / math.sqrt(numel * Qp_b)``.

        Computed as Python floats from the exact integer ``numel * Qp_b``, as the released code
        does, then rounded once to ``like``'s dtype (what its ``alpha * s`` does with the
        Python scalar). A float32 ``rsqrt`` of the product can be one ulp away from that.
        Cached for the last ``(numel, signedness, dtype, device)``.
        """
        key = (numel, self._signed, like.dtype, like.device)
        if self._scales_key != key:
            qps = [2 ** (b - 1) - 1 if self._signed else 2**b - 1 for b in self.candidates]
            scales = [1.0 / math.sqrt(numel * qp) for qp in qps]
            self._scales = torch.tensor(scales, dtype=like.dtype, device=like.device)
            self._scales_key = key
        return self._scales

    def extra_repr(self) -> str:
        if self._needs_init:
            state = "uninitialised"
        else:
            alphas = ", ".join(
                f"{b}b: {a:.4g}" for b, a in zip(self.candidates, self.alpha.tolist(), strict=True)
            )
            state = f"signed={self._signed}, alpha=({alphas})"
        mode = "official (shift unused)" if self.official else "shift before quant"
        return f"bits={self.candidates}, per-sample, {state}, {mode}"


class GDQConv2d(nn.Conv2d):
    """Conv2d with Granular-DQ quantization: per-sample activation bits, 8-bit LSQ weights.

    docs/methods.md §2.3. The input goes through :class:`GDQActQuantizer` at the bit-width the
    :class:`BitContext` selected for each sample; the weight through
    :func:`~lowbitsr.quant.functional.lsq_fake_quant` (signed, ``w_bits``, one learnable step
    ``w_alpha`` initialised to ``2 mean|w| / sqrt(Qp)``, official ``2 max|w| / sqrt(Qp)``; in
    official mode the step enters the forward pass in the released ``grad_scale`` form, see
    ``lsq_fake_quant(official=True)``). Bias stays float.

    BitOPs contract (:func:`lowbitsr.quant.bitops.count_bitops`): ``w_bits`` is an int and
    ``a_bits`` the ``[N]`` per-sample bit-widths of the current forward (None outside it).

    Shapes: as the float conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        ctx: BitContext,
        w_bits: int = 8,
        official: bool = False,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **conv_kwargs)
        self.w_bits = int(w_bits)
        self.official = bool(official)
        self.act_quant = GDQActQuantizer(in_channels, ctx.candidates, official)
        self.w_alpha = nn.Parameter(torch.ones(1))
        self.ctx = ctx

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, ctx: BitContext, w_bits: int = 8, official: bool = False
    ) -> GDQConv2d:
        """A quantized copy of ``conv`` (weights copied; ``w_alpha`` initialised from them)."""
        q = cls(
            **conv_geometry(conv, device=conv.weight.device),
            ctx=ctx,
            w_bits=w_bits,
            official=official,
        )
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
            q.init_weight_alpha()
        q.train(conv.training)
        return q

    @torch.no_grad()
    def init_weight_alpha(self) -> None:
        """LSQ weight step: ``2 mean|w| / sqrt(Qp)`` (official: ``2 max|w| / sqrt(Qp)``)."""
        if self.official:
            qp = 2 ** (self.w_bits - 1) - 1
            self.w_alpha.copy_((2 * self.weight.abs().max() / math.sqrt(qp)).reshape(1))
        else:
            self.w_alpha.copy_(lsq_init_alpha(self.weight, self.w_bits, signed=True))

    @property
    def a_bits(self) -> Tensor | None:
        """``[N]`` activation bit-widths of the current forward (None outside a forward)."""
        return self.ctx.bits

    def forward(self, x: Tensor) -> Tensor:
        xq = self.act_quant(x, self.ctx)
        wq = lsq_fake_quant(
            self.weight, self.w_alpha, self.w_bits, signed=True, official=self.official
        )
        return self._conv_forward(xq, wq, self.bias)

    def extra_repr(self) -> str:
        mode = "official" if self.official else "default"
        return (
            f"{super().extra_repr()}, method=granular_dq, w_bits={self.w_bits}, "
            f"a_bits=per-sample{self.ctx.candidates}, compat={mode}"
        )
