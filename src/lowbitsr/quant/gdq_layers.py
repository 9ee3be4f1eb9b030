"""Granular-DQ building blocks: the shared bit context, quantized conv, GBC, E2B/ATC, entropy.

The bit context and the quantized layers live in :mod:`~lowbitsr.quant.gdq_quantizers` and are
re-exported here; this module holds the bit controllers and the entropy.

docs/methods.md §2 (Wang et al., AAAI 2025). One bit-width per image patch is chosen once per
forward pass and used by every quantized layer of the network for that patch ("layer-invariant").

How the pieces talk to each other: the model wrapper in
:mod:`lowbitsr.quant.granular_dq` owns one :class:`BitContext`. The
:class:`GranularBitController` writes the per-sample selection into it once per forward (from
the head features), and every :class:`GDQConv2d` reads it. No ``[x, bits]`` lists travel through
the blocks; the float architectures keep ``forward(lr) -> sr``.

=================================  ===============================================================
object                             docs/methods.md section
=================================  ===============================================================
:class:`GDQActQuantizer`           §2.3 LSQ/QuantSR activation quantizer, one α per candidate bit
:class:`GDQConv2d`                 §2.3 8-bit LSQ weights + the activation quantizer on its input
:class:`GranularityBitController`  §2.1 GBC (multi-granularity descriptor, Gumbel gate)
:func:`patch_entropy`              §2.2 soft-histogram entropy of an LR patch
:class:`EntropyToBit`              §2.2 E2B thresholds and adaptive threshold calibration (ATC)
:class:`GranularBitController`     §2.1 + §2.2 the whole per-patch decision
=================================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import rgb_to_y
from .gdq_quantizers import BitContext, GDQActQuantizer, GDQConv2d, hard_gumbel_softmax

__all__ = [
    "BitContext",
    "EntropyToBit",
    "GDQActQuantizer",
    "GDQConv2d",
    "GranularBitController",
    "GranularityBitController",
    "hard_gumbel_softmax",
    "interp_quantile_curve",
    "patch_entropy",
    "quantile_curve_cdf",
    "tile_statistics",
]

#: Number of histogram bins, kernel width and epsilon of the E2B entropy (docs/methods.md §2.2).
ENTROPY_BINS = 32
ENTROPY_SIGMA = 0.0255
ENTROPY_EPS = 1e-40
#: Official ATC normalisation ``(H - 1.2) / 2.2`` (docs/methods.md §2.2, compat only).
_OFFICIAL_ATC_SHIFT = 1.2
_OFFICIAL_ATC_SCALE = 2.2


# --------------------------------------------------------------------------------------------
# GBC (§2.1)
# --------------------------------------------------------------------------------------------


class GranularityBitController(nn.Module):
    """Granularity-Bit Controller, docs/methods.md §2.1: head features -> one bit choice per patch.

    ::

        Z2 = avg_pool2d(Z1, 2); Z3 = avg_pool2d(Z2, 2)
        Zk_hat = adaptive_avg_pool2d(GroupNorm_k(Zk), size(Z3))     (no GN in official mode)
        S = GAP(cat(Z1_hat, Z2_hat, Z3_hat))                          [N, 3C]
        g = Linear(3C -> K)(S)

    Pooling uses ``ceil_mode`` so that patches smaller than 4 pixels still get a descriptor. In
    official mode the descriptors are concatenated coarse, fine, medium (the released layout of
    the linear weight) and, without GroupNorm, all three are the mean head feature.

    With ``extra`` > 0 the linear layer reads ``cat(S, x)``, ``x`` ``[N, extra]`` given to
    :meth:`forward` (the tile statistics of ``gbc_tile_stats``).

    Args:
        channels: C, the head's output channels (divisible by 8 unless official).
        num_bits: K, number of GBC candidate bit-widths.
        official: no GroupNorm, released concatenation order.
        extra: number of extra inputs of the linear layer (0: the paper's GBC).
    """

    def __init__(
        self, channels: int, num_bits: int, official: bool = False, extra: int = 0
    ) -> None:
        super().__init__()
        self.official = bool(official)
        self.extra = int(extra)
        if not official and channels % 8:
            raise ValueError(
                f"GBC: GroupNorm(8, C) needs C divisible by 8, got C={channels}; build the model "
                "with a multiple of 8 feature channels (e.g. n_feats=16) or use compat='official'."
            )
        self.norms = (
            None if official else nn.ModuleList(nn.GroupNorm(8, channels) for _ in range(3))
        )
        self.fc = nn.Linear(3 * channels + self.extra, num_bits)

    def descriptor(self, z1: Tensor) -> Tensor:
        """``[N, C, H, W]`` head features -> ``[N, 3C]`` multi-granularity descriptor ``S``."""
        z2 = F.avg_pool2d(z1, 2, ceil_mode=True)
        z3 = F.avg_pool2d(z2, 2, ceil_mode=True)
        size = z3.shape[-2:]
        zs = [z1, z2, z3]
        if self.norms is not None:
            zs = [norm(z) for norm, z in zip(self.norms, zs, strict=True)]
        pooled = [F.adaptive_avg_pool2d(z, size).mean(dim=(2, 3)) for z in zs]
        if self.official:
            pooled = [pooled[2], pooled[0], pooled[1]]
        return torch.cat(pooled, dim=1)

    def inputs(self, z1: Tensor, extra: Tensor | None = None) -> Tensor:
        """What the linear layer reads: ``S`` ``[N, 3C]``, or ``cat(S, extra)`` ``[N, 3C+E]``."""
        s = self.descriptor(z1)
        if self.extra:
            if extra is None or extra.shape != (s.shape[0], self.extra):
                got = None if extra is None else tuple(extra.shape)
                raise ValueError(
                    f"GBC: expected extra inputs [{s.shape[0]}, {self.extra}], got {got}"
                )
            s = torch.cat([s, extra.to(s.dtype)], dim=1)
        return s

    def forward(self, z1: Tensor, extra: Tensor | None = None) -> Tensor:
        """``[N, C, H, W]`` (and ``[N, extra]``) -> ``[N, K]`` logits."""
        return self.fc(self.inputs(z1, extra))


def tile_statistics(lr: Tensor, rgb_range: float = 255.0) -> Tensor:
    """Scale-aware statistics of LR patches ``[N, 3, h, w]`` (``[0, rgb_range]``) -> ``[N, 3]``.

    On the Y channel (:func:`lowbitsr.metrics.rgb_to_y`, 0–255 scale): ``log`` standard
    deviation, ``log`` mean absolute gradient (horizontal + vertical), both clamped at 1e-3
    before the log, and mean / 255. Unlike the GBC's GroupNorm'ed descriptor they keep how
    smooth and how bright a patch is.
    """
    y = rgb_to_y(lr * (255.0 / rgb_range))
    grad = (y[..., :, 1:] - y[..., :, :-1]).abs().mean(dim=(1, 2, 3)) + (
        y[..., 1:, :] - y[..., :-1, :]
    ).abs().mean(dim=(1, 2, 3))
    return torch.stack(
        [
            y.std(dim=(1, 2, 3)).clamp_min(1e-3).log(),
            grad.clamp_min(1e-3).log(),
            y.mean(dim=(1, 2, 3)) / 255.0,
        ],
        1,
    )


# --------------------------------------------------------------------------------------------
# E2B and ATC (§2.2)
# --------------------------------------------------------------------------------------------


def patch_entropy(lr: Tensor, *, official: bool = False) -> Tensor:
    """Soft-histogram grey-level entropy of each LR patch, docs/methods.md §2.2 (E2B).

    ::

        grey = 0.2989 R + 0.5870 G + 0.1140 B ; v = grey / 255
        k[p, j] = exp(-0.5 ((v_p - bins_j) / 0.0255)^2),  bins = linspace(0, 1, 32)
        pdf = mean_p k ; pdf = pdf / (sum(pdf) + 1e-40) + 1e-40 ; H = -sum pdf ln pdf

    Reference values: flat mid-grey 1.184, flat black/white 0.73, uniform grey noise 3.456, a
    horizontal grey ramp 3.459; the maximum is ``ln 32 = 3.466``. ``0 ln 0`` is taken as 0
    (``xlogy``), so the result does not depend on whether the device flushes the 1e-40
    denormal to zero. No gradient.

    Args:
        lr: ``[N, 3, H, W]`` RGB in ``[0, 255]`` (any float dtype, any device).
        official: score only the top-left ``min(H, W)`` square (the released code's window) and
            floor the kernel values at 1e-40 as it does.

    Returns:
        ``[N]`` entropies in nats, dtype of ``lr`` (float32 for integer input).
    """
    if lr.dim() != 4 or lr.shape[1] != 3:
        raise ValueError(f"patch_entropy: expected [N, 3, H, W] RGB, got {tuple(lr.shape)}")
    lr = lr.detach()
    if not lr.is_floating_point():
        lr = lr.float()
    if official:
        s = min(lr.shape[-2:])
        lr = lr[..., :s, :s]
    grey = 0.2989 * lr[:, 0] + 0.5870 * lr[:, 1] + 0.1140 * lr[:, 2]
    v = (grey / 255.0).flatten(1)
    bins = torch.linspace(0, 1, ENTROPY_BINS, device=lr.device, dtype=v.dtype)
    k = torch.exp(-0.5 * ((v[:, :, None] - bins) / ENTROPY_SIGMA) ** 2)
    if official:
        k = k.clamp_min(ENTROPY_EPS)
    pdf = k.mean(dim=1)
    pdf = pdf / (pdf.sum(dim=1, keepdim=True) + ENTROPY_EPS) + ENTROPY_EPS
    return -torch.special.xlogy(pdf, pdf).sum(dim=1)


def interp_quantile_curve(curve: Tensor, levels: Tensor) -> Tensor:
    """Quantile at ``levels`` from a curve sampled on the uniform grid ``linspace(0, 1, K)``.

    Linear interpolation between grid points; ``levels`` are clamped to ``[0, 1]``.

    Args:
        curve: ``[K]`` (``K >= 2``) non-decreasing quantile values.
        levels: any shape, quantile levels in ``[0, 1]``.

    Returns:
        Same shape as ``levels``, dtype of ``curve``.
    """
    k = curve.shape[0]
    pos = levels.to(curve.dtype).clamp(0, 1) * (k - 1)
    i0 = pos.floor().clamp(0, k - 2).long()
    frac = pos - i0.to(pos.dtype)
    return torch.lerp(curve[i0], curve[i0 + 1], frac)


def quantile_curve_cdf(curve: Tensor, values: Tensor) -> Tensor:
    """Inverse of :func:`interp_quantile_curve`: the level at which the curve reaches ``values``.

    Args:
        curve: ``[K]`` non-decreasing quantile values on ``linspace(0, 1, K)``.
        values: any shape.

    Returns:
        Levels in ``[0, 1]``, same shape as ``values`` (0 below the curve, 1 above it).
    """
    k = curve.shape[0]
    v = values.to(curve.dtype)
    idx = torch.searchsorted(curve.contiguous(), v.reshape(-1)).reshape(v.shape).clamp(1, k - 1)
    lo, hi = curve[idx - 1], curve[idx]
    span = hi - lo
    frac = torch.where(span > 0, (v - lo) / torch.where(span > 0, span, 1.0), 0.0).clamp(0, 1)
    return ((idx - 1).to(v.dtype) + frac) / (k - 1)


class EntropyToBit(nn.Module):
    """E2B with adaptive threshold calibration, docs/methods.md §2.2.

    A patch the GBC sent to its highest bit-width is re-assigned by its entropy ``H``:
    ``H <= H_t1 -> e2b_bits[0]``, ``H_t1 < H <= H_t2 -> e2b_bits[1]``, ``H > H_t2 ->
    e2b_bits[2]``. ``H_t`` is the ``t``-quantile of the entropies of the training LR patches,
    kept as a quantile curve (buffer ``curve``, on ``linspace(0, 1, K)``) so that ATC can move
    the levels ``t``.

    ATC (training, only while the caller enables it, i.e. the first epoch)::

        t <- gamma t + (1 - gamma) mean(Norm(H))          for t in (t1, t2)
        default: Norm = min-max over the batch's patches (all of them; a batch whose
                 entropies are all equal leaves t unchanged); thresholds = curve(t)
        official: Norm(H) = (H - 1.2) / 2.2, one update per GBC-8-bit patch in batch order
                 (the recurrence itself, in the levels' float32, as released), each patch
                 judged with the thresholds right after its own update, and thresholds =
                 curve(round_half_up(t, 0.1) clamped to [0.05, 1]), rounding the exact value
                 of the float32 t (0.45f = 0.4499999881 reads the 0.4 level). (The
                 released table stops at the 99.5 % level, so a level rounded to 1.0 crashes
                 there; here it reads the curve's top, the largest training entropy.)

    Buffers (all saved): ``thresholds`` ``[2]`` = ``(H_t1, H_t2)`` (NaN until set),
    ``levels`` ``[2]`` = ``(t1, t2)``, ``curve`` ``[K]`` (NaN until a table is set).

    Args:
        levels: initial quantile levels ``(t1, t2)``, e.g. ``(0.5, 0.9)``.
        thresholds: initial ``(H_t1, H_t2)`` or None (set later from a table).
        gamma: ATC decay.
        official: the released code's ATC and entropy window.
        curve_points: K, the resolution of the stored quantile curve.
    """

    thresholds: Tensor
    levels: Tensor
    curve: Tensor

    def __init__(
        self,
        levels: tuple[float, float] = (0.5, 0.9),
        thresholds: tuple[float, float] | None = None,
        gamma: float = 0.9997,
        official: bool = False,
        curve_points: int = 201,
    ) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.official = bool(official)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        self.register_buffer("thresholds", torch.full((2,), float("nan")))
        self.register_buffer("curve", torch.full((curve_points,), float("nan")))
        self._has_thresholds = False
        self._has_curve = False
        if thresholds is not None:
            self.set_thresholds(thresholds)

    # ---- state --------------------------------------------------------------------------
    @torch.no_grad()
    def set_thresholds(self, thresholds: Sequence[float] | Tensor) -> None:
        """Set ``(H_t1, H_t2)``; with a curve, ATC's levels move to the matching quantiles."""
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(2)
        if not bool(torch.isfinite(t).all()) or float(t[0]) > float(t[1]):
            raise ValueError(
                f"E2B thresholds must be finite with H_t1 <= H_t2, got {t.tolist()}; "
                "pass e.g. (2.80, 3.18)."
            )
        self.thresholds.copy_(t.to(self.thresholds.device))
        self._has_thresholds = True
        if self._has_curve:
            self.levels.copy_(quantile_curve_cdf(self.curve, self.thresholds))

    @torch.no_grad()
    def set_curve(self, curve: Sequence[float] | Tensor, *, keep_thresholds: bool) -> None:
        """Set the training entropy quantile curve (``[K]`` values on ``linspace(0, 1, K)``).

        With ``keep_thresholds`` (thresholds given by the user), ATC starts from the levels at
        which the curve reaches them; otherwise the thresholds become ``curve(levels)``.
        """
        c = torch.as_tensor(curve, dtype=torch.float32).flatten()
        if c.numel() < 2 or not bool(torch.isfinite(c).all()) or bool((c.diff() < 0).any()):
            raise ValueError(
                "E2B quantile curve must hold >= 2 finite non-decreasing values; build it with "
                "compute_entropy_table(...)."
            )
        if c.numel() != self.curve.numel():
            c = interp_quantile_curve(c, torch.linspace(0, 1, self.curve.numel()))
        self.curve.copy_(c.to(self.curve.device))
        self._has_curve = True
        if keep_thresholds and self._has_thresholds:
            self.levels.copy_(quantile_curve_cdf(self.curve, self.thresholds))
        else:
            self.thresholds.copy_(self._curve_at(self.levels))
            self._has_thresholds = True

    @property
    def ready(self) -> bool:
        """Whether thresholds are set (E2B can run)."""
        return self._has_thresholds

    @property
    def has_curve(self) -> bool:
        """Whether the quantile curve is set (ATC can run)."""
        return self._has_curve

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._has_thresholds = bool(torch.isfinite(self.thresholds).all())
        self._has_curve = bool(torch.isfinite(self.curve).all())

    def _curve_at(self, levels: Tensor) -> Tensor:
        """The thresholds at ``levels`` (any shape ``[..., 2]``), dtype of the curve.

        Official: the released look-up rounds the level's exact decimal value half up to one
        decimal (``Decimal(str(t))``; no ties occur for binary floats), clamps it to
        ``[0.05, 1]`` and reads the table there. For a float32 level this is exact in float64:
        ``t * 10`` is exact and ``t * 10 + 0.5`` is never within rounding of an integer. (In
        float32, ``t * 10 + 0.5`` rounds up for levels just below ``.x5``: 0.45f would read
        0.5 and 0.95f the top of the curve instead of 0.9.) The read is done in float64 as
        well, so a level ``k / 10`` hits its grid point exactly.
        """
        if self.official:
            lv = levels.to(torch.float64)
            lv = (torch.floor(lv * 10 + 0.5) / 10).clamp(0.05, 1.0)
            return interp_quantile_curve(self.curve.to(torch.float64), lv).to(self.curve.dtype)
        return interp_quantile_curve(self.curve, levels)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, lr255: Tensor, top: Tensor, atc: bool) -> Tensor:
        """Bucket of each patch: 0 (``H <= H_t1``), 1 (``H_t1 < H <= H_t2``) or 2 (``H > H_t2``).

        Args:
            lr255: ``[N, 3, H, W]`` LR patches, RGB in ``[0, 255]``.
            top: ``[N]`` bool, the patches the GBC sent to its highest bit-width (the ones
                official ATC updates on).
            atc: run one ATC step with this batch (training, first epoch).

        Returns:
            ``[N]`` int64 in ``{0, 1, 2}`` for every patch (the caller applies it to ``top``).
        """
        h = patch_entropy(lr255, official=self.official)
        if atc:
            if not self._has_curve:
                raise RuntimeError(
                    "ATC needs the training entropy quantile curve: set it with "
                    "model.set_entropy_table(compute_entropy_table(train_data)) or use "
                    "use_atc=False."
                )
            thr = self._atc_step(h, top)
        else:
            if not self._has_thresholds:
                raise RuntimeError(
                    "E2B thresholds are not set: pass entropy_thresholds=(H_t1, H_t2) in the "
                    "config, or call model.set_entropy_table(compute_entropy_table(train_data))."
                )
            thr = self.thresholds.expand(h.shape[0], 2)
        thr = thr.to(h.dtype)
        return (h > thr[:, 0]).long() + (h > thr[:, 1]).long()

    @torch.no_grad()
    def _atc_step(self, h: Tensor, top: Tensor) -> Tensor:
        """Update ``levels``/``thresholds`` in place; return the ``[N, 2]`` thresholds to use."""
        g = self.gamma
        t0 = self.levels
        hf = h.to(t0.dtype)
        if not self.official:
            lo, hi = hf.min(), hf.max()
            span = hi - lo
            norm = (hf - lo) / torch.where(span > 0, span, torch.ones_like(span))
            new = g * t0 + (1 - g) * norm.mean()
            self.levels.copy_(torch.where(span > 0, new, t0))
            self.thresholds.copy_(self._curve_at(self.levels))
            return self.thresholds.expand(h.shape[0], 2)
        # Official: the released recurrence t <- t g + (1 - g) x, one update per top patch in
        # batch order, in the levels' dtype with the same operations (a closed form drifts from
        # it: its rounding error is biased and grows with the number of updates). torch.where
        # keeps the loop free of host synchronisation.
        x = (hf - _OFFICIAL_ATC_SHIFT) / _OFFICIAL_ATC_SCALE
        t = t0.clone()
        rows = []
        for i in range(x.shape[0]):
            t = torch.where(top[i], t * g + (1 - g) * x[i], t)
            rows.append(t)
        self.levels.copy_(t)
        self.thresholds.copy_(self._curve_at(self.levels))
        if not rows:
            return self.thresholds.expand(0, 2)
        return self._curve_at(torch.stack(rows))  # [N, 2]: after each patch's own update

    def extra_repr(self) -> str:
        thr = (
            "thresholds=unset"
            if not self._has_thresholds
            else "thresholds=({:.4f}, {:.4f})".format(*self.thresholds.tolist())
        )
        lv = "levels=({:.4f}, {:.4f})".format(*self.levels.tolist())
        curve = "curve=set" if self._has_curve else "curve=unset"
        mode = "official" if self.official else "default"
        return f"{thr}, {lv}, {curve}, gamma={self.gamma:g}, compat={mode}"


# --------------------------------------------------------------------------------------------
# The whole per-patch decision (§2.1 + §2.2)
# --------------------------------------------------------------------------------------------


class GranularBitController(nn.Module):
    """Decides each patch's bit-width and writes it into the :class:`BitContext`.

    Gate (``gate``):

    * ``"learned"``: GBC logits -> hard Gumbel-softmax (training) / argmax (eval); official:
      Gumbel noise at eval too and the choice detached (integer labels: no gate gradient).
    * ``"random"``: bits drawn from ``random_probs`` over ``gbc_bits``, training and eval: the
      control for "random gate at matched average bits".

    Randomness: in training the Gumbel noise / random draws come from a generator seeded by the
    saved buffers ``(noise_seed, noise_step)`` (resumable); at eval from torch's global RNG.
    * ``"fixed"``: every patch at ``fixed_bits`` (no E2B).

    Then, if E2B is on (not for ``"fixed"``), patches at the highest GBC bit-width are re-assigned
    by :class:`EntropyToBit` among ``e2b_bits``. The final ``y`` over the sorted candidates is
    ``y_gbc @ M`` with the top column moved by E2B (``y + y_top * (r - e_top)``), so the
    gradient of the selected entry reaches the GBC logit of its GBC choice (docs/methods.md §2.1).

    Args:
        channels: head feature channels C.
        candidates: sorted union of all bit-widths.
        gbc_bits, e2b_bits: the two candidate lists.
        gate, tau, fixed_bits, random_probs: see :class:`~lowbitsr.quant.granular_dq.
            GranularDQConfig`.
        use_e2b: apply E2B.
        e2b: the :class:`EntropyToBit` module (None without E2B).
        official: released-code behaviour.
    """

    candidate_bits: Tensor
    gbc_map: Tensor
    e2b_cols: Tensor
    probs: Tensor

    def __init__(
        self,
        channels: int,
        candidates: Sequence[int],
        gbc_bits: Sequence[int],
        e2b_bits: Sequence[int],
        *,
        gate: str = "learned",
        tau: float = 1.0,
        fixed_bits: int | None = None,
        random_probs: Sequence[float] | None = None,
        e2b: EntropyToBit | None = None,
        official: bool = False,
        tile_stats: bool = False,
    ) -> None:
        super().__init__()
        cands = tuple(int(b) for b in candidates)
        self.tile_stats = bool(tile_stats)
        self.candidates = cands
        self.gbc_bits = tuple(int(b) for b in gbc_bits)
        self.e2b_bits = tuple(int(b) for b in e2b_bits)
        self.gate = gate
        self.tau = float(tau)
        self.official = bool(official)
        self.fixed_bits = fixed_bits
        self.register_buffer("candidate_bits", torch.tensor(cands), persistent=False)
        gmap = torch.zeros(len(self.gbc_bits), len(cands))
        for i, b in enumerate(self.gbc_bits):
            gmap[i, cands.index(b)] = 1.0
        self.register_buffer("gbc_map", gmap, persistent=False)
        self.register_buffer(
            "e2b_cols", torch.tensor([cands.index(b) for b in self.e2b_bits]), persistent=False
        )
        self.top_col = cands.index(max(self.gbc_bits))
        k = len(self.gbc_bits)
        probs = torch.full((k,), 1.0 / k) if random_probs is None else torch.tensor(random_probs)
        self.register_buffer("probs", probs.float(), persistent=False)
        self.gbc = (
            GranularityBitController(
                channels, len(self.gbc_bits), official, extra=3 if self.tile_stats else 0
            )
            if gate == "learned"
            else None
        )
        self.e2b = e2b
        #: ATC runs only while this is True (the recipe sets it during the first epoch).
        self.atc_active = False
        # Training-time gate noise comes from a generator seeded by (noise_seed, noise_step),
        # both saved: a resumed run draws the same noise as an uninterrupted one, whatever else
        # consumed torch's global RNG in between. Python mirrors avoid reading them in forward.
        seed = int(torch.randint(0, 2**31 - 1, ()))
        self.register_buffer("noise_seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long))
        self._noise_seed, self._noise_step = seed, 0

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._noise_seed, self._noise_step = int(self.noise_seed), int(self.noise_step)

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of this training forward's gate noise (None at eval: global RNG)."""
        if not self.training:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self._noise_seed * 1_000_003 + self._noise_step)
        self._noise_step += 1
        self.noise_step.fill_(self._noise_step)
        return gen

    def _one_hot(self, cols: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(cols, len(self.candidates)).to(like.dtype)

    def extra_inputs(self, ctx: BitContext) -> Tensor | None:
        """The GBC's extra inputs for the patches in ``ctx.lr`` (None without tile stats)."""
        if not self.tile_stats:
            return None
        if ctx.lr is None:
            raise RuntimeError("gbc_tile_stats needs the LR input in the bit context (ctx.lr)")
        return tile_statistics(ctx.lr, ctx.rgb_range)

    def gbc_logits(self, z1: Tensor, ctx: BitContext) -> Tensor:
        """The learned gate's logits ``[N, len(gbc_bits)]`` for head features ``z1``
        ``[N, C, H, W]`` (``ctx.lr`` holds the patches when the GBC reads tile statistics)."""
        if self.gbc is None:
            raise RuntimeError(f"the {self.gate!r} gate has no GBC logits")
        return self.gbc(z1, self.extra_inputs(ctx))

    def forward(self, z1: Tensor, ctx: BitContext) -> None:
        """Decide the bits of the ``N`` patches whose head features are ``z1`` ``[N, C, H, W]``."""
        n = z1.shape[0]
        cands = self.candidate_bits
        if ctx.forced is not None:
            forced = ctx.forced.to(z1.device)
            if forced.dim() == 0:
                forced = forced.expand(n)
            if forced.shape != (n,):
                raise ValueError(f"forced bits must have shape ({n},), got {tuple(forced.shape)}")
            cols = (forced[:, None] == cands[None, :]).long().argmax(dim=1)
            ctx.set_selection(self._one_hot(cols, z1), cands)
            return
        if self.gate == "fixed":
            cols = torch.full((n,), self.candidates.index(int(self.fixed_bits)), device=z1.device)
            ctx.set_selection(self._one_hot(cols, z1), cands)
            return
        if self.gate == "learned":
            logits = self.gbc_logits(z1, ctx)
            noise = self.training or self.official
            gen = self._noise_generator(logits.device) if noise else None
            y_gbc = hard_gumbel_softmax(logits, self.tau, noise, gen)
            if self.official:
                y_gbc = y_gbc.detach()  # integer labels in the released code: no gate gradient
        else:  # random
            gen = self._noise_generator(self.probs.device)
            idx = torch.multinomial(self.probs, n, replacement=True, generator=gen).to(z1.device)
            y_gbc = F.one_hot(idx, len(self.gbc_bits)).to(z1.dtype)
        y = y_gbc @ self.gbc_map.to(y_gbc.dtype)
        if self.e2b is not None:
            y_top = y[:, self.top_col : self.top_col + 1]
            top = y_top.detach()[:, 0] > 0.5
            lr = ctx.lr
            if lr is None:
                raise RuntimeError("E2B needs the LR input in the bit context (ctx.lr)")
            lr255 = lr * (255.0 / ctx.rgb_range) if ctx.rgb_range != 255.0 else lr
            bucket = self.e2b(lr255, top, atc=self.atc_active and self.training)
            r = self._one_hot(self.e2b_cols[bucket], y)
            e_top = self._one_hot(torch.full_like(bucket, self.top_col), y)
            # Exact forward: rows with y_top = 0 are unchanged, rows with y_top = 1 become r.
            y = y + y_top * (r - e_top)
        ctx.set_selection(y, cands)

    def extra_repr(self) -> str:
        parts = [f"gate={self.gate}", f"gbc_bits={self.gbc_bits}"]
        if self.gate == "learned":
            parts.append(f"tau={self.tau:g}")
            if self.tile_stats:
                parts.append("tile_stats=True")
        if self.gate == "fixed":
            parts.append(f"fixed_bits={self.fixed_bits}")
        if self.gate == "random":
            parts.append("probs=(" + ", ".join(f"{p:.3g}" for p in self.probs.tolist()) + ")")
        if self.e2b is not None:
            parts.append(f"e2b_bits={self.e2b_bits}")
        parts.append(f"candidates={self.candidates}")
        parts.append("compat=official" if self.official else "compat=default")
        return ", ".join(parts)
