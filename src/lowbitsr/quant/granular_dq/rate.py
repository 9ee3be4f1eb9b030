"""Rate control of a learned bit controller: one bias along the bits that meets a mean
bit-width (:func:`fab_shift`, :func:`rate_controlled_choice`).

A controller's logits ``[T, K]`` over the bit-widths ``bits`` ``[K]`` choose ``argmax_k``; the
choice ``argmax_k logits[:, k] - d * bits[k]`` moves every tile towards fewer bits as ``d``
grows, and its mean bits never increase with ``d``, so a bisection finds the smallest ``d``
whose mean bits are at most a target. Used to fit the rate–distortion controller (one ``d`` for
the training tiles, :mod:`.rd`) and by per-image rate control (one ``d`` per image at
inference, ``GranularDQConfig.image_fab``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def bisect_decreasing(
    mean_bits: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 60
) -> float:
    """The smallest ``x`` in ``[lo, hi]`` with ``mean_bits(x) <= target`` (``mean_bits`` not
    increasing in ``x``; ``hi`` when even ``mean_bits(hi)`` misses by a rounding)."""
    if mean_bits(lo) <= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mean_bits(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def fab_shift(logits: Tensor, bits: Tensor, target_fab: float) -> float:
    """The smallest ``d`` with mean bits of ``argmax_k logits[:, k] - d * bits[k]`` at most
    ``target_fab`` (``logits`` ``[T, K]``, ``bits`` ``[K]``): a bias along the bits."""
    bd = bits.double()
    lg = logits.double()
    # at |d| = span the bias outweighs any logit difference: every tile at the fewest bits
    span = 2.0 * float(lg.abs().max()) / max(float(bd.diff().min()), 1e-9) + 1.0

    def mean_bits(shift: float) -> float:
        return float(bd[(lg - shift * bd).argmax(1)].mean())

    return bisect_decreasing(mean_bits, target_fab, -span, span)


def rate_controlled_choice(logits: Tensor, bits: Tensor, target_fab: float) -> Tensor:
    """Indices ``[T]`` into ``bits``: the controller's choice shifted so that the tiles' mean
    bits is at most ``target_fab`` (at least ``min(bits)``), as close to it as one shared bias
    allows. ``logits`` ``[T, K]`` (any real numbers), ``bits`` ``[K]`` increasing."""
    if logits.dim() != 2 or logits.shape[1] != bits.numel():
        raise ValueError(
            f"rate_controlled_choice: logits must be [T, {bits.numel()}], got {tuple(logits.shape)}"
        )
    bd, lg = bits.double().to(logits.device), logits.double()
    if not float(bd.min()) <= target_fab:
        raise ValueError(f"target_fab {target_fab} is below the lowest bit-width {int(bd.min())}")
    return (lg - fab_shift(lg, bd, target_fab) * bd).argmax(1)
