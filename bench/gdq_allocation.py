"""Granular-DQ: how good is the bit allocation? Learned vs shuffled vs entropy vs oracle.

Not a test. For one Granular-DQ model and a test folder, every tile of every image is run at
every candidate bit-width (tiles do not interact: each fills its own region of the output), so
the error of any per-tile allocation is a sum of per-tile errors. Then, at the *same bits as the
model's own decisions* (per image: same total, hence same FAB):

- ``learned``: the controller's decisions (GBC + E2B), i.e. what ``lowbitsr eval`` measures;
- ``shuffled``: the same bits dealt to the tiles at random (mean over ``--draws`` draws): a
  random gate at exactly the learned frequencies, on the same weights;
- ``entropy``: the same bits dealt by tile entropy (highest entropy gets the most bits);
- ``qerr``: the same total bits by least *quantization error*: each tile's squared difference
  from its own output at the highest candidate (no HR image needed: what a controller could
  learn to predict from the LR tile);
- ``oracle``: the allocation with the least error for the same total bits (greedy upgrades by
  error removed per bit, from every tile at the lowest candidate; it knows the HR image, so it
  is an upper bound no controller reaches);
- ``qerr_pooled`` / ``oracle_pooled``: the same with one budget for the whole set (the learned
  bits' total over all images), so bits may move between images (``oracle_pooled``: greedy on
  mean PSNR per bit);
- ``all_<b>``: every tile at ``b`` bits (the model's weights at one fixed bit-width).

PSNR is the standard protocol (Y, ``scale`` border pixels cropped, output rounded to 8 bits),
mean over the images. ``captured`` is ``(learned - shuffled) / (oracle - shuffled)``: the share of
what allocation can win at this FAB that the controller wins.

    python bench/gdq_allocation.py runs/campaign/gdq_s0 --data folder:data/photos/test
    python bench/gdq_allocation.py edsr_baseline_x4_gdq --data bundled:test --json out.json

``--summary A.json B.json ...`` (records of several seeds of one row, e.g. ``gdq_s0``..``gdq_s2``)
prints each allocation's paired difference from ``shuffled`` (the random gate at the learned
frequencies on the same weights) with a 95 % t-interval over seeds (each seed's mean over images)
and over (seed, image) pairs, and a one-sided sign test over the pairs whose bits differ
(``--base all_5``: against every tile at 5 bits instead)::

    python bench/gdq_allocation.py --summary results/gdq_allocation/gdq_s{0,1,2}.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbitsr.evaluate import format_table
from lowbitsr.metrics import rgb_to_y
from lowbitsr.quant.gdq_layers import patch_entropy
from lowbitsr.quant.granular_dq import gdq_super_resolve, gdq_tile_regions
from lowbitsr.quant.granular_dq.rd import image_tiles


@dataclass
class ImageTiles:
    """Per-tile errors of one image (``T`` tiles, ``C`` candidate bit-widths, ascending).

    ``sse``: ``[T, C]`` squared Y error against HR; ``qerr``: ``[T, C]`` squared Y difference
    from the output at the highest candidate (the quantization error as far as it shows at the
    output; needs no HR); ``learned``: ``[T]`` the controller's bits; ``entropy``: ``[T]`` E2B
    entropy of each tile; ``pixels``: Y pixels after the border crop.
    """

    sse: np.ndarray
    qerr: np.ndarray
    learned: np.ndarray
    entropy: np.ndarray
    pixels: int


def tile_errors(
    model: Any, lr: torch.Tensor, hr8: np.ndarray, scale: int, candidates: list[int]
) -> ImageTiles:
    """Run every tile of ``lr`` (``[1, 3, h, w]`` in [0, 255]) at every candidate bit-width and
    measure each tile's own region against ``hr8`` (``sh x sw x 3`` uint8). ``model``: a
    Granular-DQ model in eval mode."""
    cfg = model.config
    _, _, h, w = lr.shape
    regions = gdq_tile_regions(h, w, cfg.tile, cfg.tile_step)
    _, learned = gdq_super_resolve(model, lr, scale, cfg.tile, cfg.tile_step)
    hr_y = rgb_to_y(hr8.astype(np.float64))
    mask = np.zeros(hr_y.shape, dtype=bool)
    mask[scale:-scale, scale:-scale] = True
    ys = []
    for b in candidates:
        sr, _ = gdq_super_resolve(model, lr, scale, cfg.tile, cfg.tile_step, bits=b)
        sr8 = (sr[0] * (255.0 / model.rgb_range)).round().clamp(0, 255).to(torch.uint8)
        ys.append(rgb_to_y(sr8.permute(1, 2, 0).numpy().astype(np.float64)))

    def per_tile(sq: np.ndarray) -> list[float]:
        sq[~mask] = 0.0
        return [
            sq[y0 * scale : y1 * scale, x0 * scale : x1 * scale].sum() for y0, y1, x0, x1 in regions
        ]

    sse = np.array([per_tile((y - hr_y) ** 2) for y in ys]).T
    qerr = np.array([per_tile((y - ys[-1]) ** 2) for y in ys]).T
    entropy = patch_entropy(image_tiles(lr[0], cfg.tile, cfg.tile_step)).numpy()
    return ImageTiles(sse, qerr, learned.flatten().numpy(), entropy, int(mask.sum()))


def greedy(
    errors: list[np.ndarray],
    candidates: list[int],
    budget: int,
    totals: list[float] | None = None,
) -> list[np.ndarray]:
    """Bits for the tiles of several images under one budget, by greedy upgrades.

    Every tile starts at the lowest candidate; the upgrade with the largest gain per extra bit
    is taken while ``sum(bits) <= budget``. Gain: the drop of ``errors`` (``[T, C]`` per image)
    or, with ``totals`` (each image's total squared error at the start), the PSNR gained by that
    image (``10 log10(total / (total - drop))``), so that the *mean PSNR* over images rises
    fastest. For one image both orders agree. Optimal when the errors are convex in bits.

    Returns one ``[T]`` array of candidate indices per image.
    """
    idx = [np.zeros(len(e), dtype=int) for e in errors]
    total = None if totals is None else list(totals)
    spent = sum(len(e) for e in errors) * candidates[0]
    while True:
        best, pick = 0.0, (-1, -1)
        for n, e in enumerate(errors):
            for k in range(len(e)):
                i = idx[n][k]
                if i + 1 >= len(candidates):
                    continue
                cost = candidates[i + 1] - candidates[i]
                drop = e[k, i] - e[k, i + 1]
                if spent + cost > budget or drop <= 0:
                    continue
                if total is not None:
                    if total[n] - drop <= 0:
                        continue
                    drop = 10.0 * math.log10(total[n] / (total[n] - drop))
                if drop / cost > best:
                    best, pick = drop / cost, (n, k)
        n, k = pick
        if n < 0:
            return idx
        i = idx[n][k]
        spent += candidates[i + 1] - candidates[i]
        if total is not None:
            total[n] -= errors[n][k, i] - errors[n][k, i + 1]
        idx[n][k] += 1


def _psnr(total_sse: float, pixels: int) -> float:
    mse = total_sse / pixels
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _score(t: ImageTiles, idx: np.ndarray, candidates: list[int]) -> dict[str, float]:
    chosen = t.sse[np.arange(len(idx)), idx].sum()
    return {"psnr": _psnr(chosen, t.pixels), "fab": float(np.mean([candidates[i] for i in idx]))}


def allocations(t: ImageTiles, candidates: list[int], draws: int) -> dict[str, dict[str, float]]:
    """Per-image policies (the learned bits' total kept) -> ``{"psnr", "fab"}`` of the image."""
    pos = {b: i for i, b in enumerate(candidates)}
    li = np.array([pos[int(b)] for b in t.learned])
    budget = int(t.learned.sum())
    out = {"learned": _score(t, li, candidates)}
    rng = np.random.default_rng(0)
    deals = [_score(t, rng.permutation(li), candidates) for _ in range(draws)]
    out["shuffled"] = {k: float(np.mean([d[k] for d in deals])) for k in ("psnr", "fab")}
    by_entropy = np.empty_like(li)
    by_entropy[np.argsort(t.entropy, kind="stable")] = np.sort(li)
    out["entropy"] = _score(t, by_entropy, candidates)
    out["qerr"] = _score(t, greedy([t.qerr], candidates, budget)[0], candidates)
    out["oracle"] = _score(t, greedy([t.sse], candidates, budget)[0], candidates)
    for c, b in enumerate(candidates):
        out[f"all_{b}"] = _score(t, np.full(len(li), c), candidates)
    return out


def pooled(images: list[ImageTiles], candidates: list[int]) -> dict[str, list[dict[str, float]]]:
    """Set-wide policies (one budget: the learned bits' total over all images) -> per image."""
    budget = sum(int(t.learned.sum()) for t in images)
    totals = [float(t.sse[:, 0].sum()) for t in images]
    plans = {
        "qerr_pooled": greedy([t.qerr for t in images], candidates, budget),
        "oracle_pooled": greedy([t.sse for t in images], candidates, budget, totals),
    }
    return {
        k: [_score(t, i, candidates) for t, i in zip(images, plan, strict=True)]
        for k, plan in plans.items()
    }


def _interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval; nan for fewer than 2 values)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def summarize(records: list[dict[str, Any]], base: str = "shuffled") -> list[dict[str, Any]]:
    """Paired differences ``policy - base`` over the records (seeds) of :func:`main`.

    Per policy: the mean and 95 % half-width over seeds and over (seed, image) pairs, and for
    the pairs where the two differ by more than 1e-9 dB how many favour the policy, with the
    one-sided sign-test p-value (binomial, 1/2).
    """
    from scipy.stats import binomtest

    policies = [k for k in records[0]["mean_psnr"] if k != base]
    out = []
    for k in policies:
        seeds = [r["mean_psnr"][k] - r["mean_psnr"][base] for r in records]
        pairs = [im[k]["psnr"] - im[base]["psnr"] for r in records for im in r["per_image"]]
        moved = [d for d in pairs if abs(d) > 1e-9]
        wins = sum(d > 0 for d in moved)
        m_s, h_s = _interval(seeds)
        m_p, h_p = _interval(pairs)
        out.append(
            {
                "difference": f"{k} - {base}",
                "mean": m_s,
                "ci95_seed": h_s,
                "n_seeds": len(seeds),
                "mean_pairs": m_p,
                "ci95_pairs": h_p,
                "n_pairs": len(pairs),
                "wins": wins,
                "moved": len(moved),
                "sign_p": binomtest(wins, len(moved), 0.5, "greater").pvalue if moved else None,
                "fab": float(np.mean([r["mean_fab"][k] for r in records])),
            }
        )
    return out


def _summary_main(paths: list[str], json_out: str | None, base: str = "shuffled") -> int:
    try:
        records = [json.loads(Path(p).read_text()) for p in paths]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p, r in zip(paths, records, strict=True):
        if not isinstance(r, dict) or "per_image" not in r or "shuffled" not in r["mean_psnr"]:
            print(
                f"error: {p}: not a gdq_allocation record (no per_image/shuffled)", file=sys.stderr
            )
            return 2
        if base not in r["mean_psnr"]:
            have = ", ".join(r["mean_psnr"])
            print(f"error: {p}: no allocation {base!r} to compare with ({have})", file=sys.stderr)
            return 2
    rows = summarize(records, base)
    if json_out:
        Path(json_out).write_text(
            json.dumps(
                {"models": [r["model"] for r in records], "base": base, "rows": rows}, indent=1
            )
        )
    print(json.dumps(rows))

    def f(m: float, h: float) -> str:
        return f"{m:+.3f}" + ("" if math.isnan(h) else f" ± {h:.3f}")

    table = [
        {
            "difference (dB)": r["difference"],
            "seeds": f(r["mean"], r["ci95_seed"]),
            "n": str(r["n_seeds"]),
            "seed x image": f(r["mean_pairs"], r["ci95_pairs"]),
            "pairs": str(r["n_pairs"]),
            "ahead/moved": f"{r['wins']}/{r['moved']}",
            "sign p": "-" if r["sign_p"] is None else f"{r['sign_p']:.3g}",
            "FAB": f"{r['fab']:.2f}",
        }
        for r in rows
    ]
    print(format_table(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--summary":
        q = argparse.ArgumentParser(description="paired differences over allocation records")
        q.add_argument("--summary", nargs="+", required=True, metavar="JSON")
        q.add_argument("--json", default=None, help="also write the summary JSON here")
        q.add_argument(
            "--base",
            default="shuffled",
            help="the allocation every other one is compared with (default: shuffled; e.g. all_5)",
        )
        a = q.parse_args(argv)
        return _summary_main(a.summary, a.json, a.base)
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
    images: list[ImageTiles] = []
    for i in range(len(ds)):
        item = ds[i]
        hr8 = item["hr"].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        t = tile_errors(model, item["lr"][None], hr8, scale, candidates)
        row: dict[str, Any] = {"image": item["name"], "tiles": len(t.sse)}
        row.update(allocations(t, candidates, args.draws))
        gain = t.sse[:, 0] - t.sse[:, -1]
        ok = t.learned.std() > 0 and gain.std() > 0
        row["corr_bits_gain"] = float(np.corrcoef(t.learned, gain)[0, 1]) if ok else 0.0
        per_image.append(row)
        images.append(t)
        print(
            f"{item['name']}: {len(t.sse)} tiles, learned FAB {t.learned.mean():.2f}",
            file=sys.stderr,
        )
    for key, scores in pooled(images, candidates).items():
        for row, sc in zip(per_image, scores, strict=True):
            row[key] = sc
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
