"""A rate–distortion bit controller for a trained Granular-DQ model (docs/methods.md §2.6).

The paper's controller (GBC + E2B) is trained end to end with a bit penalty; at small budgets it
does not learn where bits matter (RESULTS.md §0: it gives the most bits to textured photos,
where more bits change nothing, and the fewest to smooth ones, where 4-bit activations band).
This module refits the GBC's last linear layer instead, from what each tile's bits actually
cost and buy, with the rest of the model frozen:

1. every LR tile of a set of images (the inference tile grid) runs at every candidate
   bit-width; ``q_b`` is the tile's mean squared Y difference between its output at ``b`` bits
   and at the highest candidate (the quantization error as it reaches the output; no HR image
   is needed, so any unlabelled images serve);
2. the rate–distortion label of a tile is ``argmin_b q_b + lambda * b``, with one ``lambda`` for
   all tiles set so that the mean bits equal ``target_fab`` (the Lagrangian form of "least
   total error for this many bits");
3. a multinomial logistic regression from the GBC's multi-granularity descriptor ``S`` to the
   labels becomes the GBC's linear layer (a bias along the bits then puts the fitted
   controller's own mean bits on the fit tiles at ``target_fab``).

E2B is switched off (the fitted controller already sees the tile) and the GBC chooses among all
the model's candidate bit-widths, so every quantizer's parameters are reused as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...metrics import rgb_to_y
from .model import GranularDQModel, quantize_granular_dq
from .tiling import gdq_tile_starts


def image_tiles(lr: Tensor, tile: int, step: int) -> Tensor:
    """The full LR tiles of one ``[3, H, W]`` image on the inference grid -> ``[T, 3, t, t]``."""
    _, h, w = lr.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = gdq_tile_starts(h, tile, step), gdq_tile_starts(w, tile, step)
    return torch.stack([lr[:, y : y + th, x : x + tw] for y in ys for x in xs])


@torch.no_grad()
def measure_tiles(model: GranularDQModel, tiles: Tensor, batch: int = 8) -> tuple[Tensor, Tensor]:
    """GBC descriptors and quantization errors of ``tiles`` ``[T, 3, t, t]`` (``[0, rgb_range]``).

    Returns:
        ``(S [T, 3C], q [T, K])``: ``S`` the model's GBC descriptor of each tile's head features,
        ``q[:, k]`` the mean squared Y difference (0-255 scale) between the tile's output at
        ``candidates[k]`` and at the highest candidate (so ``q[:, -1] == 0``).
    """
    gbc = model.controller.gbc
    if gbc is None:
        raise ValueError("measure_tiles: the model has no GBC (gate must be 'learned')")
    cands = model.ctx.candidates
    feats: list[Tensor] = []
    hook = model.controller.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
    to255 = 255.0 / model.rgb_range
    s_all, q_all = [], []
    try:
        for chunk in tiles.split(batch):
            ys = []
            for b in reversed(cands):  # the top first: its pass also gives the head features
                feats.clear()
                with model.force_bits(b):
                    out = model(chunk)
                if b == cands[-1]:
                    s_all.append(gbc.descriptor(feats[0]))
                ys.append(rgb_to_y((out * to255).clamp(0, 255)))
            ys.reverse()
            q_all.append(torch.stack([((y - ys[-1]) ** 2).mean(dim=(1, 2, 3)) for y in ys], 1))
    finally:
        hook.remove()
    return torch.cat(s_all), torch.cat(q_all)


def rd_choice(q: Tensor, bits: Tensor, lam: float) -> Tensor:
    """``argmin_k q[:, k] + lam * bits[k]`` per row -> ``[T]`` candidate indices."""
    return (q + lam * bits.to(q.dtype)[None, :]).argmin(dim=1)


def _bisect(mean_bits: Any, target: float, lo: float, hi: float, steps: int = 60) -> float:
    """The smallest ``x`` in ``[lo, hi]`` with ``mean_bits(x) <= target`` (decreasing in x)."""
    if mean_bits(lo) <= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mean_bits(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_lambda(q: Tensor, bits: Tensor, target_fab: float) -> float:
    """The smallest ``lambda`` whose rate–distortion choice has mean bits ``<= target_fab``."""
    b = bits.double()
    if not float(b.min()) <= target_fab:
        raise ValueError(f"target_fab {target_fab} is below the lowest bit-width {int(b.min())}")
    qd = q.double()
    hi = float(qd.max()) + 1.0  # at this lambda every tile takes the lowest bits
    return _bisect(lambda lam: float(b[rd_choice(qd, bits, lam)].mean()), target_fab, 0.0, hi)


def fit_logistic(
    s: Tensor, labels: Tensor, classes: int, l2: float = 1e-2, iters: int = 200
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on standardised ``s`` ``[T, D]``; returns the weight
    ``[classes, D]`` and bias ``[classes]`` of the equivalent linear layer on raw ``s``."""
    s = s.double()
    mu, sd = s.mean(0), s.std(0).clamp_min(1e-6)
    z = (s - mu) / sd
    w = torch.zeros(classes, s.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, (b - w_raw @ mu).detach()


def with_rd_controller(
    model: GranularDQModel,
    images: Iterable[Tensor],
    target_fab: float = 5.0,
    *,
    l2: float = 1e-2,
    batch: int = 8,
) -> tuple[GranularDQModel, dict[str, Any]]:
    """A copy of ``model`` whose bits come from a fitted rate–distortion controller.

    Args:
        model: a trained :class:`GranularDQModel` (any gate; its weights and quantizers are
            reused unchanged).
        images: LR images ``[3, H, W]`` in ``[0, rgb_range]`` to fit on (e.g. the training
            split; never the test split). Each is cut into the model's inference tiles.
        target_fab: mean bits on the fit tiles (the FAB the controller aims at).
        l2: L2 weight of the logistic regression on standardised descriptors.
    Returns:
        ``(new_model, stats)``: the model in eval mode (config: ``gate="learned"``,
        ``gbc_bits`` = all candidates, E2B off) and a JSON-able dict with ``lambda``, the
        number of fit tiles, the label frequencies, the fitted controller's agreement with the
        labels and its mean bits on the fit tiles.
    """
    src = model.config
    cfg = dataclasses.replace(
        src,
        gate="learned",
        gbc_bits=tuple(src.candidates),
        use_e2b=False,
        use_atc=False,
        entropy_thresholds=None,
        fixed_bits=None,
        random_probs=None,
    )
    from ...models import create_model

    new = quantize_granular_dq(create_model(**model.model_config), cfg, inplace=True)
    keep = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("controller.e2b.", "controller.gbc.fc."))
        and not (src.gate != "learned" and k.startswith("controller.gbc."))
    }
    missing, unexpected = new.load_state_dict(keep, strict=False)
    left = {k for k in missing if not k.startswith("controller.gbc.")}
    if left or unexpected:
        raise ValueError(f"with_rd_controller: state mismatch {sorted(left)} {unexpected}")
    new.eval()
    tiles = torch.cat([image_tiles(im, cfg.tile, cfg.tile_step) for im in images])
    s, q = measure_tiles(new, tiles, batch)
    bits = torch.tensor(cfg.candidates)
    lam = calibrate_lambda(q, bits, target_fab)
    labels = rd_choice(q.double(), bits, lam)
    w, b = fit_logistic(s, labels, len(bits), l2)
    logits = s.double() @ w.T + b
    # a shift along the bits puts the controller's own mean bits on the fit tiles at the target
    span = float(logits.abs().max()) + 1.0
    bd = bits.double()

    def fitted_mean(shift: float) -> float:
        return float(bd[(logits - shift * bd).argmax(1)].mean())

    shift = _bisect(fitted_mean, target_fab, -span, span)
    with torch.no_grad():
        new.controller.gbc.fc.weight.copy_(w.float())
        new.controller.gbc.fc.bias.copy_((b - shift * bd).float())
    chosen = (logits - shift * bd).argmax(1)
    freq = torch.bincount(labels, minlength=len(bits)).double() / len(labels)
    stats = {
        "target_fab": float(target_fab),
        "tiles": len(tiles),
        "lambda": lam,
        "label_bits": {int(k): round(float(f), 4) for k, f in zip(bits, freq, strict=True)},
        "label_fab": float(bd[labels].mean()),
        "fit_agreement": float((chosen == labels).double().mean()),
        "fit_fab": float(bd[chosen].mean()),
        "bias_shift": shift,
        "l2": l2,
        "mean_q": {int(k): float(v) for k, v in zip(bits, q.mean(0), strict=True)},
    }
    if not math.isfinite(stats["fit_fab"]):
        raise ValueError("with_rd_controller: the fit did not converge")
    return new, stats
