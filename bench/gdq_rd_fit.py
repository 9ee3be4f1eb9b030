"""How well can a linear rule on the GBC descriptor allocate bits? Fits on measured tiles.

Not a test. Reads the tile measurements that ``bench/campaign.py`` keeps beside a Granular-DQ run
when it fits a rate–distortion controller (``<run>/rd_tiles_<objective>.safetensors``: the GBC
descriptor ``S`` of every training-split tile and its quantization error at every bit-width;
docs/methods.md §2.6) and reports, on those same tiles at mean bits ``<= --target-fab``, the
mean cost (``weight * q_b``; ``--objective mse``: weight 1) of:

- ``per-tile optimum``: the Lagrangian choice itself (what a perfect controller would pick);
- ``constant <b>``: every tile at one bit-width ``<= target``;
- ``linear <loss> l2=<x>``: :func:`lowbitsr.quant.granular_dq.rd.fit_linear` on ``S`` (cost-
  sensitive or a classifier of the labels), shifted along the bits to the target, as
  :func:`~lowbitsr.quant.granular_dq.rd.fit_rd_controller` does.

A linear rule that cannot beat the best constant even on the tiles it was fitted to says the
descriptor does not carry what decides where bits pay.

``--features``: what the linear rules see: ``gbc`` (the descriptor ``S``), ``tile``
(:func:`~lowbitsr.quant.gdq_layers.tile_statistics`, un-normalised LR statistics recomputed
from ``--data``, the split the tiles were measured on, with the run's tile grid) or ``both``.
``--cv``: score each image's tiles with rules fitted on the *other* images (leave one image out;
the shift to the target FAB is set once on all held-out logits), i.e. how a rule generalises.

    python bench/gdq_rd_fit.py runs/campaign/gdq_s0 --objective mse
    python bench/gdq_rd_fit.py runs/campaign/gdq_random_s0 --objective psnr --features both --cv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lowbitsr.evaluate import format_table
from lowbitsr.quant.granular_dq.rate import rate_controlled_choice
from lowbitsr.quant.granular_dq.rd import calibrate_lambda, fit_linear, images_tile_statistics


def tile_features(run: Path, data: str) -> torch.Tensor:
    """The tile statistics of every tile of ``data`` on the run's inference tile grid, in the
    order :func:`~lowbitsr.quant.granular_dq.rd.measure_images` measured them."""
    from lowbitsr.checkpoint import load_model
    from lowbitsr.data import build_dataset
    from lowbitsr.specs import parse_dataset_spec

    model = load_model(run / "model" if (run / "model").is_dir() else run)
    ds = build_dataset(parse_dataset_spec(data), int(model.scale), "eval")
    k = model.rgb_range / 255.0
    return images_tile_statistics(model, (ds[i]["lr"] * k for i in range(len(ds))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a Granular-DQ run folder with rd_tiles_*.safetensors")
    p.add_argument("--objective", choices=("mse", "psnr"), default="mse")
    p.add_argument("--target-fab", type=float, default=5.0)
    p.add_argument("--candidates", default="4,5,6,8", help="bit-widths of the q columns")
    p.add_argument("--features", choices=("gbc", "tile", "both"), default="gbc")
    p.add_argument("--data", default="folder:data/photos/train", help="the split measured")
    p.add_argument("--cv", action="store_true", help="leave one image out")
    args = p.parse_args(argv)
    found = sorted(args.run.glob("rd_tiles_*.safetensors"))
    name = args.run / f"rd_tiles_{args.objective}.safetensors"
    path = name if name.is_file() else (found[0] if found else None)
    if path is None:
        print(f"error: {args.run}: no rd_tiles_*.safetensors (run a gdq_rd row)", file=sys.stderr)
        return 2
    if args.objective == "psnr" and path.name != "rd_tiles_psnr.safetensors":
        print(f"error: {path}: measured without HR weights; use --objective mse", file=sys.stderr)
        return 2
    m = load_file(str(path))
    bits_i = torch.tensor([int(b) for b in args.candidates.split(",")])
    bits = bits_i.double()
    w = m["weight"].double() if args.objective == "psnr" else torch.ones(len(m["q"]))
    cost = m["q"].double() * w.double()[:, None]
    rows = torch.arange(len(cost))
    lam = calibrate_lambda(cost, bits_i, args.target_fab)
    total = cost + lam * bits

    def summary(ch: torch.Tensor) -> dict[str, Any]:
        hist = torch.bincount(ch, minlength=len(bits)).tolist()
        return {
            "cost": float(cost[rows, ch].mean()),
            "fab": float(bits[ch].mean()),
            "tiles_per_bits": dict(zip(bits_i.tolist(), hist, strict=True)),
        }

    out: dict[str, dict[str, Any]] = {"per-tile optimum": summary(total.argmin(1))}
    for k, b in enumerate(bits_i.tolist()):
        if b <= args.target_fab:
            out[f"constant {b}"] = summary(torch.full((len(cost),), k))
    feats = [m["s"]] if args.features != "tile" else []
    if args.features != "gbc":
        from lowbitsr.errors import LowbitsrError

        try:
            extra = tile_features(args.run, args.data)
        except (LowbitsrError, OSError) as exc:
            print(f"error: {args.run}: cannot compute tile statistics: {exc}", file=sys.stderr)
            return 2
        if len(extra) != len(cost):
            print(
                f"error: {args.data}: {len(extra)} tiles, the measurements have {len(cost)}; "
                "pass the split they were measured on",
                file=sys.stderr,
            )
            return 2
        feats.append(extra)
    x = torch.cat([f.double() for f in feats], 1)
    image = m["image"]
    folds = [image == i for i in image.unique()] if args.cv else [None]
    for loss in ("cost", "labels"):
        for l2 in (1e-3, 1e-2, 1e-1):
            logits = torch.zeros(len(cost), len(bits), dtype=torch.float64)
            for held in folds:
                fit = ~held if held is not None else torch.ones(len(cost), dtype=torch.bool)
                use = held if held is not None else fit
                sub = cost[fit] + calibrate_lambda(cost[fit], bits_i, args.target_fab) * bits
                target = sub if loss == "cost" else sub.argmin(1)
                wt, bs = fit_linear(x[fit], target, loss=loss, l2=l2, classes=len(bits))
                logits[use] = x[use] @ wt.T + bs
            chosen = rate_controlled_choice(logits, bits, args.target_fab)
            out[f"linear {loss} l2={l2:g}"] = summary(chosen)
    record = {
        "source": str(path),
        "objective": args.objective,
        "features": args.features,
        "cv": "leave one image out" if args.cv else None,
        "tiles": len(cost),
        "rules": out,
    }
    print(json.dumps(record))
    table = [
        {
            "rule": k,
            "mean cost": f"{v['cost']:.4f}",
            "FAB": f"{v['fab']:.2f}",
            "tiles at " + "/".join(map(str, bits_i.tolist())): "/".join(
                str(n) for n in v["tiles_per_bits"].values()
            ),
        }
        for k, v in out.items()
    ]
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
