"""Granular-DQ: how good is the bit allocation? Learned vs shuffled vs entropy vs oracle.

Not a test. For one Granular-DQ model and a test folder, every tile of every image is run at
every candidate bit-width (tiles do not interact: each fills its own region of the output), so
the error of any per-tile allocation is a sum of per-tile errors. Then, at the *same bits as the
model's own decisions* (per image: same total, hence same FAB):

- ``learned``: the controller's decisions (GBC + E2B), i.e. what ``lowbitsr eval`` measures;
- ``shuffled``: the same bits dealt to the tiles at random (mean over ``--draws`` draws): a
  random gate at exactly the learned frequencies, on the same weights;
- ``entropy``: the same bits dealt by tile entropy (highest entropy gets the most bits);
- ``oracle``: the allocation with the least error for the same total bits (greedy upgrades by
  error removed per bit, from every tile at the lowest candidate; it knows the HR image, so it
  is an upper bound no controller reaches);
- ``oracle_pooled``: the oracle with one budget for all images (same total bits over the set,
  greedy on mean PSNR per bit): it may move bits between images;
- ``all_<b>``: every tile at ``b`` bits (the model's weights at one fixed bit-width).

PSNR is the standard protocol (Y, ``scale`` border pixels cropped, output rounded to 8 bits),
mean over the images. ``captured`` is ``(learned - shuffled) / (oracle - shuffled)``: the share of
what allocation can win at this FAB that the controller wins.

    python bench/gdq_allocation.py runs/campaign/gdq_s0 --data folder:data/photos/test
    python bench/gdq_allocation.py edsr_baseline_x4_gdq --data bundled:test --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbitsr.evaluate import format_table
from lowbitsr.metrics import rgb_to_y
from lowbitsr.quant.gdq_layers import patch_entropy
from lowbitsr.quant.granular_dq import gdq_super_resolve, gdq_tile_regions


def tile_errors(
    model: Any, lr: torch.Tensor, hr8: np.ndarray, scale: int, candidates: list[int]
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Squared Y error of every tile at every candidate bit-width.

    Args:
        model: a Granular-DQ model in eval mode.
        lr: ``[1, 3, h, w]`` in [0, 255]; hr8: ``sh x sw x 3`` uint8.
    Returns:
        ``(sse [tiles, candidates], learned bits [tiles], pixel count, entropy [tiles])``; the
        pixel count is that of the Y image after the ``scale`` border crop.
    """
    cfg = model.config
    _, _, h, w = lr.shape
    regions = gdq_tile_regions(h, w, cfg.tile, cfg.tile_step)
    _, learned = gdq_super_resolve(model, lr, scale, cfg.tile, cfg.tile_step)
    hr_y = rgb_to_y(hr8.astype(np.float64))
    mask = np.zeros(hr_y.shape, dtype=bool)
    mask[scale:-scale, scale:-scale] = True
    sse = np.zeros((len(regions), len(candidates)))
    for c, b in enumerate(candidates):
        sr, _ = gdq_super_resolve(model, lr, scale, cfg.tile, cfg.tile_step, bits=b)
        sr8 = (sr[0] * (255.0 / model.rgb_range)).round().clamp(0, 255).to(torch.uint8)
        err = (rgb_to_y(sr8.permute(1, 2, 0).numpy().astype(np.float64)) - hr_y) ** 2
        err[~mask] = 0.0
        for k, (y0, y1, x0, x1) in enumerate(regions):
            sse[k, c] = err[y0 * scale : y1 * scale, x0 * scale : x1 * scale].sum()
    tiles = torch.stack([lr[0, :, y0:y1, x0:x1] for (y0, y1, x0, x1) in _tile_boxes(h, w, cfg)])
    entropy = patch_entropy(tiles).numpy()
    return sse, learned.flatten().numpy(), int(mask.sum()), entropy


def _tile_boxes(h: int, w: int, cfg: Any) -> list[tuple[int, int, int, int]]:
    """The full LR tile boxes (the controller's input), row-major like the regions."""
    from lowbitsr.quant.granular_dq import gdq_tile_starts

    th, tw = min(cfg.tile, h), min(cfg.tile, w)
    ys, xs = (
        gdq_tile_starts(h, cfg.tile, cfg.tile_step),
        gdq_tile_starts(w, cfg.tile, cfg.tile_step),
    )
    return [(y, y + th, x, x + tw) for y in ys for x in xs]


def oracle(sse: np.ndarray, candidates: list[int], budget: int) -> np.ndarray:
    """Index into ``candidates`` per tile: greedy least error at ``sum(bits) <= budget``."""
    idx = np.zeros(len(sse), dtype=int)
    spent = len(sse) * candidates[0]
    while True:
        best, pick = 0.0, -1
        for k in range(len(sse)):
            i = idx[k]
            if i + 1 >= len(candidates):
                continue
            cost = candidates[i + 1] - candidates[i]
            if spent + cost > budget:
                continue
            gain = (sse[k, i] - sse[k, i + 1]) / cost
            if gain > best:
                best, pick = gain, k
        if pick < 0:
            return idx
        spent += candidates[idx[pick] + 1] - candidates[idx[pick]]
        idx[pick] += 1


def pooled_oracle(
    sses: list[np.ndarray], pixels: list[int], candidates: list[int], budget: int
) -> list[np.ndarray]:
    """Like :func:`oracle` but one bit budget for all images, greedy on mean PSNR gained per bit.

    Returns one candidate-index array per image.
    """
    idx = [np.zeros(len(s), dtype=int) for s in sses]
    total = [float(s[:, 0].sum()) for s in sses]
    spent = sum(len(s) for s in sses) * candidates[0]
    while True:
        best, pick = 0.0, (-1, -1)
        for n, s in enumerate(sses):
            for k in range(len(s)):
                i = idx[n][k]
                if i + 1 >= len(candidates):
                    continue
                cost = candidates[i + 1] - candidates[i]
                drop = s[k, i] - s[k, i + 1]
                if spent + cost > budget or drop <= 0 or total[n] - drop <= 0:
                    continue
                gain = 10.0 * math.log10(total[n] / (total[n] - drop)) / cost
                if gain > best:
                    best, pick = gain, (n, k)
        n, k = pick
        if n < 0:
            return idx
        i = idx[n][k]
        spent += candidates[i + 1] - candidates[i]
        total[n] -= sses[n][k, i] - sses[n][k, i + 1]
        idx[n][k] += 1


def _psnr(total_sse: float, pixels: int) -> float:
    mse = total_sse / pixels
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def allocations(
    sse: np.ndarray, learned: np.ndarray, entropy: np.ndarray, candidates: list[int], draws: int
) -> dict[str, tuple[float, float]]:
    """Policy -> (summed squared error, FAB) for one image."""
    pos = {b: i for i, b in enumerate(candidates)}
    rows = np.arange(len(sse))
    li = np.array([pos[int(b)] for b in learned])
    out: dict[str, tuple[float, float]] = {"learned": (sse[rows, li].sum(), learned.mean())}
    rng = np.random.default_rng(0)
    shuffled = [sse[rows, rng.permutation(li)].sum() for _ in range(draws)]
    out["shuffled"] = (float(np.mean(shuffled)), learned.mean())
    by_entropy = np.empty_like(li)
    by_entropy[np.argsort(entropy, kind="stable")] = np.sort(li)
    out["entropy"] = (sse[rows, by_entropy].sum(), learned.mean())
    oi = oracle(sse, candidates, int(learned.sum()))
    out["oracle"] = (sse[rows, oi].sum(), float(np.mean([candidates[i] for i in oi])))
    for c, b in enumerate(candidates):
        out[f"all_{b}"] = (sse[:, c].sum(), float(b))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="Granular-DQ model: run folder, saved model or pretrained name")
    p.add_argument(
        "--data",
        default="folder:data/photos/test",
        help="dataset spec: folder:DIR, bundled:test, benchmark:DIR/NAME",
    )
    p.add_argument("--draws", type=int, default=200, help="random deals for 'shuffled'")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the JSON record here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lowbitsr.data import build_dataset
    from lowbitsr.errors import LowbitsrError
    from lowbitsr.evaluate import is_dynamic_bits
    from lowbitsr.specs import load_any_model, parse_dataset_spec

    try:
        model, name = load_any_model(args.model)
        if not is_dynamic_bits(model):
            raise LowbitsrError(f"{args.model}: not a Granular-DQ model")
        spec = parse_dataset_spec(args.data)
        scale = int(model.scale)
        ds = build_dataset(spec, scale, "eval")
    except LowbitsrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    candidates = sorted(int(b) for b in model.ctx.candidates)
    per_image: list[dict[str, Any]] = []
    kept: list[tuple[np.ndarray, int, int]] = []  # (sse, pixels, learned bit sum) per image
    for i in range(len(ds)):
        item = ds[i]
        hr8 = item["hr"].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        sse, learned, pixels, entropy = tile_errors(model, item["lr"][None], hr8, scale, candidates)
        pol = allocations(sse, learned, entropy, candidates, args.draws)
        row = {"image": item["name"], "tiles": len(sse)}
        row.update({k: {"psnr": _psnr(e, pixels), "fab": f} for k, (e, f) in pol.items()})
        corr = np.corrcoef(learned, sse[:, 0] - sse[:, -1])[0, 1] if learned.std() > 0 else 0.0
        row["corr_bits_gain"] = float(corr)
        kept.append((sse, pixels, int(learned.sum())))
        per_image.append(row)
        print(
            f"{item['name']}: {len(sse)} tiles, learned {pol['learned'][1]:.2f} bits",
            file=sys.stderr,
        )

    sses, pix = [k[0] for k in kept], [k[1] for k in kept]
    pooled = pooled_oracle(sses, pix, candidates, sum(k[2] for k in kept))
    for row, s, px, oi in zip(per_image, sses, pix, pooled, strict=True):
        chosen = s[np.arange(len(s)), oi].sum()
        row["oracle_pooled"] = {
            "psnr": _psnr(chosen, px),
            "fab": float(np.mean([candidates[i] for i in oi])),
        }
    policies = [k for k in per_image[0] if isinstance(per_image[0][k], dict)]
    mean = {k: float(np.mean([r[k]["psnr"] for r in per_image])) for k in policies}
    fabs = {k: float(np.mean([r[k]["fab"] for r in per_image])) for k in policies}
    span = mean["oracle"] - mean["shuffled"]
    record = {
        "model": name,
        "data": str(args.data),
        "candidates": candidates,
        "mean_psnr": mean,
        "mean_fab": fabs,
        "captured": (mean["learned"] - mean["shuffled"]) / span if span > 0 else None,
        "per_image": per_image,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "per_image"}))
    rows = [
        {
            "allocation": k,
            "PSNR": f"{mean[k]:.3f}",
            "vs learned": f"{mean[k] - mean['learned']:+.3f}",
            "FAB": f"{fabs[k]:.2f}",
        }
        for k in policies
    ]
    print(format_table(rows))
    print(
        f"captured = {record['captured']}; corr(learned bits, 4->8 gain) per image: "
        + ", ".join(f"{r['corr_bits_gain']:+.2f}" for r in per_image)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
