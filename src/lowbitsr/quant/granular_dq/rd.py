"""A rate–distortion bit controller for a trained Granular-DQ model (docs/methods.md §2.6).

The paper's controller (GBC + E2B) is trained end to end with a bit penalty; at small budgets it
does not learn where bits matter (RESULTS.md §0: it gives the most bits to textured photos,
where more bits change nothing, and the fewest to smooth ones, where 4-bit activations band).
This module refits the GBC's last linear layer instead, from what each tile's bits actually
cost and buy, with the rest of the model frozen:

1. every LR tile of a set of images (the inference tile grid) runs at every candidate
   bit-width; ``q_b`` is the tile's mean squared Y difference between its output at ``b`` bits
   and at the highest candidate (the quantization error as it reaches the output;
   :func:`measure_images`). With ``objective="psnr"`` a tile's cost is ``q_b`` over its
   image's MSE against HR (the first-order PSNR change, so bits go where they buy the most dB
   of *mean* PSNR); with ``"mse"`` plain ``q_b``, which needs no HR image;
2. one ``lambda`` for all tiles, the smallest whose choice ``argmin_b cost_b + lambda * b`` has
   mean bits at most ``target_fab`` (the Lagrangian form of "least total cost for this many
   bits", :func:`calibrate_lambda`);
3. a linear layer from the GBC's multi-granularity descriptor ``S`` that minimises the expected
   ``cost_b + lambda * b`` under its softmax (``loss="cost"``; ``"labels"``: a classifier of the
   argmin) becomes the GBC's linear layer, with a bias along the bits that puts the fitted
   controller's own mean bits on the fit tiles at ``target_fab`` (:func:`fit_rd_controller`).

With ``tile_stats`` the GBC's linear layer also reads three un-normalised statistics of the LR
tile (:func:`~lowbitsr.quant.gdq_layers.tile_statistics`): the GroupNorm'ed descriptor alone
does not tell a smooth tile, where a fixed quantization step shows, from a textured one.

E2B is switched off (the fitted controller already sees the tile) and the GBC chooses among all
the model's candidate bit-widths, so every quantizer's parameters are reused as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...metrics import rgb_to_y
from ..gdq_layers import tile_statistics
from .model import GranularDQModel, quantize_granular_dq
from .rate import bisect_decreasing, fab_shift
from .tiling import gdq_tile_starts


def tile_boxes(height: int, width: int, tile: int, step: int) -> list[tuple[int, int, int, int]]:
    """The full LR tiles of the inference grid as ``(y0, y1, x0, x1)``, row-major."""
    th, tw = min(tile, height), min(tile, width)
    ys, xs = gdq_tile_starts(height, tile, step), gdq_tile_starts(width, tile, step)
    return [(y, y + th, x, x + tw) for y in ys for x in xs]


def image_tiles(lr: Tensor, tile: int, step: int) -> Tensor:
    """The full LR tiles of one ``[3, H, W]`` image on the inference grid -> ``[T, 3, t, t]``."""
    boxes = tile_boxes(lr.shape[1], lr.shape[2], tile, step)
    return torch.stack([lr[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])


def images_tile_statistics(model: GranularDQModel, images: Iterable[Tensor]) -> Tensor:
    """:func:`~lowbitsr.quant.gdq_layers.tile_statistics` of every tile of LR ``images``
    (``[3, H, W]`` in ``[0, rgb_range]``) on ``model``'s inference grid -> ``[T, 3]``, in the
    order :func:`measure_images` measures the tiles."""
    cfg = model.config
    return torch.cat(
        [
            tile_statistics(image_tiles(lr, cfg.tile, cfg.tile_step), model.rgb_range)
            for lr in images
        ]
    )


@dataclass
class TileMeasurements:
    """What :func:`measure_images` found on ``T`` tiles (``K`` candidate bit-widths).

    ``s``: ``[T, 3C]`` GBC descriptors; ``q``: ``[T, K]`` mean squared Y difference (0-255
    scale) between each tile's output at ``candidates[k]`` and at the highest candidate;
    ``image``: ``[T]`` index of the image each tile comes from; ``weight``: ``[T]`` the tile's
    weight in the objective (1, or for ``objective="psnr"`` the inverse of its image's MSE
    against HR at the highest candidate, normalised to mean 1).
    """

    s: Tensor
    q: Tensor
    image: Tensor
    weight: Tensor

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors, e.g. for ``safetensors.torch.save_file``."""
        return {k: v.contiguous() for k, v in dataclasses.asdict(self).items()}


@torch.no_grad()
def measure_tiles(
    model: GranularDQModel, tiles: Tensor, batch: int = 8, hr: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GBC descriptors and quantization errors of ``tiles`` ``[T, 3, t, t]`` (``[0, rgb_range]``).

    Returns:
        ``(S [T, 3C(+3)], q [T, K], e [T] or None)``: ``S`` what the GBC's linear layer reads
        for each tile (the descriptor of its head features, plus its tile statistics when the
        model has ``gbc_tile_stats``), ``q[:, k]`` the mean squared Y difference (0-255 scale)
        between the tile's output at ``candidates[k]`` and at the highest candidate (so
        ``q[:, -1] == 0``); with ``hr`` (``[T, 3, s t, s t]``, same range), ``e`` the mean
        squared Y error of the output at the highest candidate against it.
    """
    gbc = model.controller.gbc
    if gbc is None:
        raise ValueError("measure_tiles: the model has no GBC (gate must be 'learned')")
    cands = model.ctx.candidates
    feats: list[Tensor] = []
    hook = model.controller.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
    to255 = 255.0 / model.rgb_range
    s_all, q_all, e_all = [], [], []
    try:
        for n0 in range(0, len(tiles), batch):
            chunk = tiles[n0 : n0 + batch]
            ys = []
            for b in reversed(cands):  # the top first: its pass also gives the head features
                feats.clear()
                with model.force_bits(b):
                    out = model(chunk)
                if b == cands[-1]:
                    extra = tile_statistics(chunk, model.rgb_range) if gbc.extra else None
                    s_all.append(gbc.inputs(feats[0], extra))
                ys.append(rgb_to_y((out * to255).clamp(0, 255)))
            ys.reverse()
            q_all.append(torch.stack([((y - ys[-1]) ** 2).mean(dim=(1, 2, 3)) for y in ys], 1))
            if hr is not None:
                ref = rgb_to_y(hr[n0 : n0 + batch] * to255)
                e_all.append(((ys[-1] - ref) ** 2).mean(dim=(1, 2, 3)))
    finally:
        hook.remove()
    return torch.cat(s_all), torch.cat(q_all), torch.cat(e_all) if hr is not None else None


def measure_images(
    model: GranularDQModel,
    images: Iterable[Tensor | tuple[Tensor, Tensor]],
    *,
    objective: str = "psnr",
    batch: int = 8,
) -> TileMeasurements:
    """Cut every image into the model's inference tiles and :func:`measure_tiles` them.

    Args:
        images: LR ``[3, H, W]`` in ``[0, rgb_range]``, or ``(lr, hr)`` pairs (``hr``
            ``[3, sH, sW]``, needed for ``objective="psnr"``).
        objective: ``"mse"``: every tile weighs the same (least total squared error);
            ``"psnr"``: a tile weighs ``1 / MSE`` of its image (the first-order change of the
            image's PSNR), so the *mean PSNR over images* is what the bits buy.
    """
    if objective not in ("mse", "psnr"):
        raise ValueError(f"objective must be 'mse' or 'psnr', got {objective!r}")
    cfg = model.config
    scale = int(model.scale)
    s_l, q_l, img_l, w_l = [], [], [], []
    for i, item in enumerate(images):
        lr, hr = item if isinstance(item, tuple) else (item, None)
        if objective == "psnr" and hr is None:
            raise ValueError("objective='psnr' needs (lr, hr) pairs")
        boxes = tile_boxes(lr.shape[1], lr.shape[2], cfg.tile, cfg.tile_step)
        tiles = torch.stack([lr[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
        hr_tiles = None
        if objective == "psnr":
            hr_tiles = torch.stack(
                [
                    hr[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale]
                    for y0, y1, x0, x1 in boxes
                ]
            )
        s, q, e = measure_tiles(model, tiles, batch, hr_tiles)
        s_l.append(s)
        q_l.append(q)
        img_l.append(torch.full((len(s),), i, dtype=torch.long))
        w = torch.ones(len(s)) if e is None else torch.full((len(s),), 1.0 / float(e.mean()))
        w_l.append(w)
    weight = torch.cat(w_l).double()
    return TileMeasurements(
        torch.cat(s_l), torch.cat(q_l), torch.cat(img_l), (weight / weight.mean()).float()
    )


def rd_choice(q: Tensor, bits: Tensor, lam: float) -> Tensor:
    """``argmin_k q[:, k] + lam * bits[k]`` per row -> ``[T]`` candidate indices."""
    return (q + lam * bits.to(q.dtype)[None, :]).argmin(dim=1)


def calibrate_lambda(q: Tensor, bits: Tensor, target_fab: float) -> float:
    """The smallest ``lambda`` whose rate–distortion choice has mean bits ``<= target_fab``."""
    b = bits.double()
    if not float(b.min()) <= target_fab:
        raise ValueError(f"target_fab {target_fab} is below the lowest bit-width {int(b.min())}")
    qd = q.double()
    hi = float(qd.max()) + 1.0  # at this lambda every tile takes the lowest bits
    return bisect_decreasing(
        lambda lam: float(b[rd_choice(qd, bits, lam)].mean()), target_fab, 0.0, hi
    )


def fit_linear(
    s: Tensor,
    target: Tensor,
    *,
    loss: str = "cost",
    l2: float = 1e-2,
    iters: int = 200,
    classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A linear layer ``s`` ``[T, D]`` -> ``K`` logits, fitted on standardised ``s``.

    ``loss="labels"``: multinomial logistic regression on class indices ``target`` ``[T]``
    (``K`` = ``classes``, or ``target.max() + 1`` when None; a class no tile carries gets a
    low bias); ``loss="cost"``:
    ``target`` is a cost matrix ``[T, K]`` and the fit minimises the expected cost under the
    softmax, ``mean_t sum_k softmax(z_t)_k target[t, k]`` (cost-sensitive: a tile where the
    wrong choice costs a lot weighs a lot). Both with ``l2 * |W|^2``. Returns the weight
    ``[K, D]`` and bias ``[K]`` of the equivalent layer on raw ``s``.
    """
    s = s.double()
    mu, sd = s.mean(0), s.std(0).clamp_min(1e-6)
    z = (s - mu) / sd
    if loss == "labels":
        k = int(target.max()) + 1 if classes is None else int(classes)
        if k <= int(target.max()):
            raise ValueError(f"fit_linear: label {int(target.max())} needs classes > {k}")
    elif loss == "cost":
        k = target.shape[1]
        cost = target.double() / target.double().abs().mean().clamp_min(1e-12)
    else:
        raise ValueError(f"loss must be 'labels' or 'cost', got {loss!r}")
    w = torch.zeros(k, s.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        if loss == "labels":
            fit = F.cross_entropy(logits, target)
        else:
            fit = (logits.softmax(1) * cost).sum(1).mean()
        out = fit + l2 * (w**2).sum()
        out.backward()
        return out

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, (b - w_raw @ mu).detach()


def rd_model(model: GranularDQModel, tile_stats: bool = False) -> GranularDQModel:
    """A copy of ``model`` with a fresh GBC over all its candidates, E2B and ATC off.

    Every weight and quantizer parameter is copied; the GBC's linear layer is left at its
    initialisation (``fit_rd_controller`` sets it). ``tile_stats``: the new GBC also reads the
    tiles' :func:`~lowbitsr.quant.gdq_layers.tile_statistics` (``gbc_tile_stats``).
    """
    from ...models import create_model

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
        gbc_tile_stats=bool(tile_stats),
    )
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
        raise ValueError(f"rd_model: state mismatch {sorted(left)} {unexpected}")
    return new.eval()


def fit_rd_controller(
    model: GranularDQModel,
    m: TileMeasurements,
    target_fab: float = 5.0,
    *,
    loss: str = "cost",
    l2: float = 1e-2,
) -> dict[str, Any]:
    """Fit the GBC's linear layer of ``model`` (from :func:`rd_model`) in place.

    Cost of bit-width ``b`` for a tile: ``weight * q_b``; ``lambda`` is the smallest with mean
    bits of ``argmin_b cost_b + lambda * b`` at most ``target_fab`` over the tiles. ``loss``:
    ``"cost"`` (default) fits the expected Lagrangian cost, ``"labels"`` a classifier of the
    argmin labels. A bias ``-delta * b`` then sets the fitted mean bits on these tiles to at
    most ``target_fab``. Returns JSON-able statistics.
    """
    bits = torch.tensor(model.config.candidates)
    if tuple(model.config.gbc_bits) != tuple(model.config.candidates) or m.q.shape[1] != len(bits):
        raise ValueError("fit_rd_controller: build the model with rd_model() first")
    width = model.controller.gbc.fc.in_features
    if m.s.shape[1] != width:
        raise ValueError(
            f"fit_rd_controller: the measurements have {m.s.shape[1]} inputs per tile, the GBC "
            f"reads {width}; measure with the same rd_model(..., tile_stats=...)"
        )
    cost = m.q.double() * m.weight.double()[:, None]
    lam = calibrate_lambda(cost, bits, target_fab)
    total = cost + lam * bits.double()[None, :]
    labels = total.argmin(1)
    target = labels if loss == "labels" else total
    w, b = fit_linear(m.s, target, loss=loss, l2=l2, classes=len(bits))
    logits = m.s.double() @ w.T + b
    bd = bits.double()
    shift = fab_shift(logits, bd, target_fab)
    with torch.no_grad():
        model.controller.gbc.fc.weight.copy_(w.float())
        model.controller.gbc.fc.bias.copy_((b - shift * bd).float())
    chosen = (logits - shift * bd).argmax(1)
    rows = torch.arange(len(chosen))
    freq = torch.bincount(labels, minlength=len(bits)).double() / len(labels)
    stats = {
        "target_fab": float(target_fab),
        "loss": loss,
        "tiles": len(chosen),
        "images": int(m.image.max()) + 1 if len(m.image) else 0,
        "lambda": lam,
        "label_bits": {int(k): round(float(f), 4) for k, f in zip(bits, freq, strict=True)},
        "label_fab": float(bd[labels].mean()),
        "fit_agreement": float((chosen == labels).double().mean()),
        "fit_fab": float(bd[chosen].mean()),
        # the objective on the fit tiles: the labels' (best reachable) and the fitted choice's
        "label_cost": float(cost[rows, labels].mean()),
        "fit_cost": float(cost[rows, chosen].mean()),
        "bias_shift": shift,
        "l2": l2,
        "mean_q": {int(k): float(v) for k, v in zip(bits, m.q.mean(0), strict=True)},
    }
    if not math.isfinite(stats["fit_fab"]):
        raise ValueError("fit_rd_controller: the fit did not converge")
    return stats


def with_rd_controller(
    model: GranularDQModel,
    images: Iterable[Tensor | tuple[Tensor, Tensor]],
    target_fab: float = 5.0,
    *,
    objective: str = "psnr",
    loss: str = "cost",
    l2: float = 1e-2,
    batch: int = 8,
    tile_stats: bool = False,
) -> tuple[GranularDQModel, dict[str, Any]]:
    """A copy of ``model`` whose bits come from a fitted rate–distortion controller.

    :func:`rd_model` + :func:`measure_images` + :func:`fit_rd_controller`.

    Args:
        model: a trained :class:`GranularDQModel` (any gate; its weights and quantizers are
            reused unchanged).
        images: images to fit on (e.g. the training split; never the test split): LR
            ``[3, H, W]`` in ``[0, rgb_range]``, or ``(lr, hr)`` pairs for ``objective="psnr"``.
        target_fab: mean bits on the fit tiles (the FAB the controller aims at).
        objective, loss, l2: see :func:`measure_images` and :func:`fit_rd_controller`.
        tile_stats: the controller also reads each tile's statistics (:func:`rd_model`).
    Returns:
        ``(new_model, stats)``: the model in eval mode (config: ``gate="learned"``,
        ``gbc_bits`` = all candidates, E2B off) and the fit statistics.
    """
    new = rd_model(model, tile_stats)
    m = measure_images(new, images, objective=objective, batch=batch)
    stats = fit_rd_controller(new, m, target_fab, loss=loss, l2=l2)
    stats["objective"] = objective
    return new, stats
