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

    python bench/gdq_rd_fit.py runs/campaign/gdq_s0 --objective mse
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
from lowbitsr.quant.granular_dq.rd import calibrate_lambda, fab_shift, fit_linear


def _shifted(logits: torch.Tensor, bits: torch.Tensor, target: float) -> torch.Tensor:
    """Choices ``argmax(logits - d * bits)`` with the smallest ``d`` meeting the target."""
    return (logits - fab_shift(logits, bits, target) * bits).argmax(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a Granular-DQ run folder with rd_tiles_*.safetensors")
    p.add_argument("--objective", choices=("mse", "psnr"), default="mse")
    p.add_argument("--target-fab", type=float, default=5.0)
    p.add_argument("--candidates", default="4,5,6,8", help="bit-widths of the q columns")
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
    for loss in ("cost", "labels"):
        for l2 in (1e-3, 1e-2, 1e-1):
            target = total if loss == "cost" else total.argmin(1)
            wt, bs = fit_linear(m["s"], target, loss=loss, l2=l2)
            logits = m["s"].double() @ wt.T + bs
            out[f"linear {loss} l2={l2:g}"] = summary(_shifted(logits, bits, args.target_fab))
    record = {"source": str(path), "objective": args.objective, "tiles": len(cost), "rules": out}
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
