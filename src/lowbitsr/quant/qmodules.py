"""The quantizer modules of DDTB and PAMS (docs/methods.md §1): :class:`QuantConv2d` (weights),
:class:`DDTBActQuant` with its :class:`DynamicGate`, :class:`PAMSActQuant`. Re-exported by
:mod:`lowbitsr.quant.layers`.

Forward passes never call ``.item()``, numpy or device APIs; control flow depends only on Python
flags and tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    asym_fake_quant,
    ddtb_weight_quant,
    gate_act_quant,
    pams_act_quant,
    pams_weight_quant,
    percentile_bounds,
    round_ste,
    ternary_weight_quant,
)

WeightMode = Literal["percentile", "minmax", "pams", "ternary"]
_WEIGHT_MODES: tuple[str, ...] = ("percentile", "minmax", "pams", "ternary")

#: Initial DDTB bounds before calibration: the official code's ``±10`` (docs/methods.md §1.4).
DDTB_INIT_BOUND = 10.0
#: Initial PAMS clip before calibration (the official ``pams_quant_act`` init).
PAMS_INIT_ALPHA = 10.0


def _drop_transient(state: dict[str, Any], *names: str) -> dict[str, Any]:
    # Tensors produced by the last forward (graph-carrying logits, inference-mode caches) must not
    # be deep-copied or pickled: deepcopy refuses non-leaf tensors, and they are rebuilt anyway.
    state = dict(state)
    for name in names:
        if name in state:
            state[name] = None
    return state


# --------------------------------------------------------------------------------- weight quant
def conv_geometry(conv: nn.Conv2d, device: torch.device | str = "meta") -> dict[str, Any]:
    """Constructor keywords that rebuild ``conv``'s shape (by default on the meta device, so no
    throw-away weight is allocated before the caller installs the real parameters)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "device": device,
        "dtype": conv.weight.dtype,
    }


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a per-tensor fake-quantized weight (bias stays full precision).

    Same constructor as ``nn.Conv2d`` plus, keyword-only:

    Args:
        w_bits: weight bit-width ``k`` (2–8).
        w_mode: ``"percentile"`` — DDTB EDSR/SRResNet, 1st/99th percentile bounds with clip;
            ``"minmax"`` — DDTB RDN, min/max bounds, no clip (§1.2); ``"pams"`` — symmetric
            max-abs (§1.8); ``"ternary"`` — the DDTB gate's symmetric max-abs at ``w_bits``
            (§1.2, identical math to ``"pams"``, named apart so ``print(model)`` says which).
        clamp_codes: keep asymmetric codes inside the k-bit range (see
            :func:`~lowbitsr.quant.functional.asym_quantize_codes`); False reproduces the
            official numerics bit for bit, True guarantees at most ``2**k`` levels.

    Forward: ``conv2d(x, Q(weight), bias)``; ``x`` is N×C_in×H×W, any range. In training (or
    whenever autograd needs the weight's gradient) ``Q(weight)`` is recomputed every call. In eval
    without grad it is cached, keyed on the weight's version counter, storage, dtype, device and
    the quantizer settings, so an optimizer step, ``load_state_dict`` or ``.to()`` invalidates it;
    entering training mode drops it. The cache lives on the weight's device.

    ``enabled`` (plain bool attribute, default True): False uses the float weight (the DDTB
    dynamic-intensity calibration pass).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        w_bits: int = 2,
        w_mode: WeightMode = "percentile",
        clamp_codes: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        if w_mode not in _WEIGHT_MODES:
            raise ValueError(
                f"QuantConv2d: unknown w_mode {w_mode!r}; use one of {', '.join(_WEIGHT_MODES)}"
            )
        if isinstance(w_bits, bool) or not isinstance(w_bits, int) or not 2 <= w_bits <= 8:
            raise ValueError(f"QuantConv2d: w_bits must be an int in 2..8, got {w_bits!r}")
        self.w_bits = w_bits
        self.w_mode: WeightMode = w_mode
        self.clamp_codes = bool(clamp_codes)
        self.enabled = True
        self._wq_cache: tuple[tuple[Any, ...], Tensor] | None = None

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        w_bits: int,
        w_mode: WeightMode = "percentile",
        clamp_codes: bool = True,
    ) -> QuantConv2d:
        """Wrap a float conv. The new module **shares** ``conv.weight``/``conv.bias`` (the same
        ``Parameter`` objects): :func:`~lowbitsr.quant.apply.quantize` deep-copies the float model
        first, so the teacher is never touched, and ``to_float`` gives the same objects back."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"QuantConv2d.from_float expects an nn.Conv2d, got {type(conv)}")
        # Built on the meta device so no throw-away weight is allocated before the swap.
        q = cls(
            **conv_geometry(conv),
            w_bits=w_bits,
            w_mode=w_mode,
            clamp_codes=clamp_codes,
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q.train(conv.training)
        return q

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this module's weight and bias parameters."""
        conv = nn.Conv2d(
            **conv_geometry(self),
        )
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def _quantize(self, w: Tensor) -> Tensor:
        if self.w_mode in ("percentile", "minmax"):
            return ddtb_weight_quant(w, self.w_bits, self.w_mode, clamp_codes=self.clamp_codes)
        if self.w_mode == "pams":
            return pams_weight_quant(w, self.w_bits)
        return ternary_weight_quant(w, self.w_bits)

    def quantized_weight(self) -> Tensor:
        """The effective weight used by :meth:`forward`: ``[C_out, C_in/groups, kH, kW]``, at most
        ``2**w_bits`` distinct values (``2**w_bits - 1`` for the symmetric modes)."""
        w = self.weight
        if not self.enabled:
            return w
        if self.training or (torch.is_grad_enabled() and w.requires_grad):
            return self._quantize(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device, self.w_bits, self.w_mode)
        cache = self._wq_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            wq = self._quantize(w)
        self._wq_cache = (key, wq)
        return wq

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def train(self, mode: bool = True) -> QuantConv2d:
        if mode:
            self._wq_cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        return _drop_transient(self.__dict__, "_wq_cache")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, w_mode={self.w_mode}"


def _full_precision(x: Tensor) -> Tensor:
    # Under bf16/fp16 autocast a conv hands its output on in half precision; the rounding to
    # 2-4-bit codes is done in float32 so the codes do not depend on the training precision.
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


# --------------------------------------------------------------------------------- DDTB gate
class DynamicGate(nn.Module):
    """DDTB's dynamic gate controller (docs/methods.md §1.3): layer input → two bound logits.

    ``g = AvgPool(x.detach()) → Q2 → conv1 (C→hidden, ternary) → BN → ReLU → Q2 →
    conv2 (hidden→2, ternary) = c``. ``Q2`` is :func:`~lowbitsr.quant.functional.gate_act_quant`.

    Args:
        in_channels: ``C``, channels of the quantized layer's input.
        hidden: width of the hidden 1×1 layer (32 in the paper).
        bits: bit-width of the gate's activations and weights (2).
        per_sample: ``Q2`` bounds per sample (default) or over the whole batch (official), so with
            True an image's logits in eval mode do not depend on the rest of its batch.
        straight_through: ``Q2`` passes gradients (default: conv1 and the BN affine train) or cuts
            the graph (official: only conv2 learns).

    Forward: ``x`` N×C×H×W (any range) → logits ``c`` N×2×1×1 (``c[:, 0]`` scales the upper
    bound, ``c[:, 1]`` the lower). No gradient reaches ``x``. With N = 1 in training mode, where
    BatchNorm has no batch statistics over a 1×1 map, the BN uses its running statistics.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 32,
        bits: int = 2,
        *,
        per_sample: bool = True,
        straight_through: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.per_sample = per_sample
        self.straight_through = straight_through
        kw: dict[str, Any] = {"bias": False, "w_bits": bits, "w_mode": "ternary"}
        self.conv1 = QuantConv2d(in_channels, hidden, 1, device=device, dtype=dtype, **kw)
        self.bn = nn.BatchNorm2d(hidden, device=device, dtype=dtype)
        self.conv2 = QuantConv2d(hidden, 2, 1, device=device, dtype=dtype, **kw)

    def _q(self, g: Tensor) -> Tensor:
        return gate_act_quant(g, self.bits, self.per_sample, self.straight_through)

    def _bn(self, g: Tensor) -> Tensor:
        if self.training and g.shape[0] == 1:
            bn = self.bn
            return F.batch_norm(
                g, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        return self.bn(g)

    def forward(self, x: Tensor) -> Tensor:
        g = F.adaptive_avg_pool2d(x.detach(), 1)
        g = self.conv1(self._q(g))
        g = F.relu(self._bn(g))
        return self.conv2(self._q(g))

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, per_sample={self.per_sample}, "
            f"straight_through={self.straight_through}"
        )


# ------------------------------------------------------------------------------ DDTB activation
def _ddtb_gate_load_hook(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    *_: Any,
) -> None:
    # A state dict that carries this quantizer's bounds also says whether it is gated: attach or
    # drop the gate before the keys are matched, so a plain load_state_dict works both ways.
    assert isinstance(module, DDTBActQuant)
    if prefix + "lower" not in state_dict:
        return
    gated = prefix + "gate.conv1.weight" in state_dict
    if gated and module.gate is None:
        module.add_gate()
    elif not gated and module.gate is not None:
        module.remove_gate()


class DDTBActQuant(nn.Module):
    """DDTB activation quantizer with dual trainable bounds and an optional dynamic gate.

    docs/methods.md §1.1 (static), §1.3 (gated: per-sample bounds ``2·sigmoid(c[:,0])·upper`` and
    ``2·sigmoid(c[:,1])·lower``), §1.3 dynamic-intensity statistics and §1.4 initialisation.

    Parameters (trainable, shape ``[1]``): ``lower``, ``upper`` (init ``-10``/``+10``).
    Child ``gate``: :class:`DynamicGate` or None (attached by calibration or checkpoint loading).

    State flags are plain Python attributes (not saved; they steer control flow only):

    - ``enabled`` (True): False makes the forward the identity (dynamic-intensity pass).
    - ``recording`` (False): True accumulates the max/min statistics of every input.
    - ``gate_applied`` (True): with a gate and False, the gate is still run in training mode and
      its logits kept for the regulariser, but the static bounds are used (first stage, §1.6).
    - ``calibrating`` (False): True skips the gate entirely (bound initialisation).

    Transient attribute ``last_logits``: the gate logits ``c`` (N×2×1×1, with graph) of the last
    forward that ran the gate, else None; reset on every forward.

    Statistics (non-persistent float64 buffer ``calib_stats`` = ``[n, mean_max, M2_max, mean_min,
    M2_min]``, Chan's parallel update): one max and one min per sample (``per_sample_stats``,
    default) or per batch tensor (official). :meth:`intensity` = population
    ``var(max) + var(min)``.

    Args:
        bits: activation bit-width (2–4).
        channels: input channels ``C`` (for the gate).
        calib_percentile: ``M`` of §1.4 (99 EDSR/SRResNet, 95 RDN).
        official: reproduce the released code (per-batch statistics, batch-wide gate ``Q2`` with
            a graph cut, unclamped codes) instead of the paper's intent.
        gate_channels, gate_bits: gate hidden width (32) and bit-width (2).

    Forward: N×C×H×W, any range → same shape, at most ``2**bits`` values per sample (per batch
    tensor when static; in official mode ``2**bits + 1`` in the corner of
    :func:`~lowbitsr.quant.functional.asym_quantize_codes`).
    """

    calib_stats: Tensor

    def __init__(
        self,
        bits: int,
        channels: int,
        *,
        calib_percentile: float = 99.0,
        official: bool = False,
        gate_channels: int = 32,
        gate_bits: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.channels = channels
        self.calib_percentile = float(calib_percentile)
        self.official = bool(official)
        self.gate_channels = gate_channels
        self.gate_bits = gate_bits
        self.clamp_codes = not self.official
        self.per_sample_stats = not self.official
        self.lower = nn.Parameter(torch.full((1,), -DDTB_INIT_BOUND, device=device, dtype=dtype))
        self.upper = nn.Parameter(torch.full((1,), DDTB_INIT_BOUND, device=device, dtype=dtype))
        self.register_module("gate", None)
        self.register_buffer(
            "calib_stats", torch.zeros(5, dtype=torch.float64, device=device), persistent=False
        )
        self.enabled = True
        self.recording = False
        self.gate_applied = True
        self.calibrating = False
        self.init_pending = False
        self.last_logits: Tensor | None = None
        self.register_load_state_dict_pre_hook(_ddtb_gate_load_hook)

    # ---------------------------------------------------------------- gate management
    def add_gate(self) -> DynamicGate:
        """Attach a fresh :class:`DynamicGate` (on the bounds' device and dtype) and return it."""
        gate = DynamicGate(
            self.channels,
            self.gate_channels,
            self.gate_bits,
            per_sample=not self.official,
            straight_through=not self.official,
            device=self.lower.device,
            dtype=self.lower.dtype,
        )
        gate.train(self.training)
        self.gate = gate
        return gate

    def remove_gate(self) -> None:
        """Make the layer static again."""
        self.gate = None
        self.last_logits = None

    # ---------------------------------------------------------------- calibration helpers
    def reset_bounds(self, lower: float = -DDTB_INIT_BOUND, upper: float = DDTB_INIT_BOUND) -> None:
        """Set the bounds to constants (the official 3/4-bit init is ``±10``)."""
        with torch.no_grad():
            self.lower.fill_(lower)
            self.upper.fill_(upper)

    def reset_stats(self) -> None:
        """Forget the max/min statistics."""
        self.calib_stats.zero_()

    def intensity(self) -> Tensor | None:
        """Dynamic intensity ``var(max) + var(min)`` (population), 0-dim float64; None if no
        input was recorded."""
        s = self.calib_stats
        if not bool(s[0] > 0):
            return None
        return (s[2] + s[4]) / s[0]

    def _record(self, x: Tensor) -> None:
        with torch.no_grad():
            xd = x.detach()
            if self.per_sample_stats:
                mx = xd.flatten(1).amax(1).double()
                mn = xd.flatten(1).amin(1).double()
            else:
                mx = xd.max().double().reshape(1)
                mn = xd.min().double().reshape(1)
            s = self.calib_stats
            n = s[0].clone()
            nb = float(mx.numel())
            tot = n + nb
            new = [tot]
            for v, mean, m2 in ((mx, s[1], s[2]), (mn, s[3], s[4])):
                bm = v.mean()
                delta = bm - mean
                new.append(mean + delta * (nb / tot))
                new.append(m2 + ((v - bm) ** 2).sum() + delta * delta * (n * nb / tot))
            s.copy_(torch.stack(new))

    def _init_bounds(self, x: Tensor) -> None:
        m = self.calib_percentile
        lo, hi = percentile_bounds(x, 100.0 - m, m)
        # A constant input would give equal bounds and a NaN quantizer; open them slightly.
        pad = 0.5e-3 * (hi.abs() + 1.0)
        flat = hi <= lo
        lo = torch.where(flat, lo - pad, lo)
        hi = torch.where(flat, hi + pad, hi)
        with torch.no_grad():
            self.lower.copy_(lo.to(self.lower.dtype))
            self.upper.copy_(hi.to(self.upper.dtype))

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self.last_logits = None
        x = _full_precision(x)
        if self.recording:
            self._record(x)
        if not self.enabled:
            return x
        if self.init_pending:
            self._init_bounds(x)
            self.init_pending = False
        lower: Tensor = self.lower
        upper: Tensor = self.upper
        gate = self.gate
        if gate is not None and not self.calibrating and (self.gate_applied or self.training):
            c = gate(x)
            self.last_logits = c
            if self.gate_applied:
                mult = 2 * torch.sigmoid(c)  # N×2×1×1, each in (0, 2)
                upper = mult[:, 0:1] * self.upper
                lower = mult[:, 1:2] * self.lower
        return asym_fake_quant(x, lower, upper, self.bits, clamp_codes=self.clamp_codes)

    def __getstate__(self) -> dict[str, Any]:
        return _drop_transient(self.__dict__, "last_logits")

    def extra_repr(self) -> str:
        gated = "no" if self.gate is None else ("applied" if self.gate_applied else "not applied")
        return (
            f"method=ddtb, bits={self.bits}, lower={self.lower.detach().float()[0].item():.6g}, "
            f"upper={self.upper.detach().float()[0].item():.6g}, gate={gated}"
            + (", compat=official" if self.official else "")
        )


# ------------------------------------------------------------------------------ PAMS activation
def _pams_quant_unclipped(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    # PAMS's first-epoch forward: the same rounding as pams_act_quant but without the clamp
    # (docs/methods.md §1.8, "input unclipped during it").
    qmax = 2.0 ** (bits - 1) - 1.0
    return round_ste(x * qmax / alpha) * alpha / qmax


class PAMSActQuant(nn.Module):
    """PAMS symmetric activation quantizer with one learnable clip ``alpha``, docs/methods.md §1.8.

    Parameter ``alpha`` (shape ``[1]``, init 10 as in PAMS, set by calibration).

    Plain-attribute flags: ``enabled`` (False = identity) and ``ema_mode`` (calibration: each
    forward updates ``alpha`` with the EMA of the batch's mean per-sample ``max|x|`` — the first
    batch sets it — then quantizes the *unclipped* input with the updated ``alpha``).

    Args:
        bits: 2–8.
        ema_decay: ``alpha <- (1 - d) * m + d * alpha`` (PAMS's 0.9997).

    Forward: N×C×H×W, any range → same shape, values ``j·alpha/q`` with ``|j| <= q =
    2**(bits-1) - 1`` (at most ``2**bits - 1`` levels) outside ``ema_mode``.
    """

    def __init__(
        self,
        bits: int,
        *,
        ema_decay: float = 0.9997,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.ema_decay = float(ema_decay)
        self.alpha = nn.Parameter(torch.full((1,), PAMS_INIT_ALPHA, device=device, dtype=dtype))
        self.enabled = True
        self.ema_mode = False
        self.ema_started = False

    def _ema_update(self, x: Tensor) -> None:
        with torch.no_grad():
            m = x.detach().abs().flatten(1).amax(1).mean().to(self.alpha.dtype)
            if self.ema_started:
                m = (1.0 - self.ema_decay) * m + self.ema_decay * self.alpha[0]
            self.alpha.copy_(m.reshape(1))
            self.ema_started = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        x = _full_precision(x)
        if self.ema_mode:
            self._ema_update(x)
            return _pams_quant_unclipped(x, self.alpha, self.bits)
        return pams_act_quant(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"method=pams, bits={self.bits}, alpha={self.alpha.detach().float()[0].item():.6g}"
