"""Quality table of the trained runs: PSNR/SSIM of every model of one scale on one dataset.

    python bench/quality_table.py --runs runs --scale 4 --dataset bundled:test

Evaluates bicubic, the float model and every quantized run ``<arch>_x<scale>_*`` found under
``--runs`` (a folder of training runs, each with ``model.json``) with the standard protocol
(Y channel, border = scale), and prints a JSON object and a Markdown table with the PSNR gap to
the float model. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbitsr.checkpoint import load_model
from lowbitsr.data import build_dataset
from lowbitsr.evaluate import Bicubic, evaluate, format_table
from lowbitsr.specs import parse_dataset_spec


def _label(header: dict) -> tuple[str, str]:
    q = header.get("quant")
    if not q:
        return "fp", "32/32"
    method = q["method"]
    if method == "ddtb" and q.get("dynamic_ratio") == 0.0:
        method = "ddtb (no gates)"
    if method == "granular_dq":
        gate = q.get("gate", "learned")
        if gate == "fixed":
            return "fixed-bit (gdq quantizers)", f"{q['weight_bits']}/{q['fixed_bits']}"
        return ("granular-dq" if gate == "learned" else "random gate + E2B"), "8/patch"
    return method, f"{q['bits']}/{q['bits']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", type=Path)
    p.add_argument("--arch", default="edsr_tiny")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--dataset", default="bundled:test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ds = build_dataset(parse_dataset_spec(args.dataset), args.scale, "eval")
    runs = sorted(
        d for d in args.runs.glob(f"{args.arch}_x{args.scale}_*") if (d / "model.json").is_file()
    )
    rows = []
    res = evaluate(Bicubic(args.scale), ds, args.scale, progress=False)
    rows.append(
        {
            "model": "bicubic",
            "method": "-",
            "bits": "-",
            "PSNR": res.psnr,
            "SSIM": res.ssim,
            "FAB": "-",
            "GBitOPs": "-",
        }
    )
    for d in runs:
        header = json.loads((d / "model.json").read_text())
        method, bits = _label(header)
        torch.manual_seed(0)  # the random-gate control draws its bits: same draw every run
        res = evaluate(load_model(d), ds, args.scale, model_name=d.name, progress=False)
        rows.append(
            {
                "model": d.name,
                "method": method,
                "bits": bits,
                "PSNR": res.psnr,
                "SSIM": res.ssim,
                "FAB": res.fab,
                "GBitOPs": res.info["gbitops"],
                "iters": header["meta"].get("step"),
            }
        )
    fp = next((r["PSNR"] for r in rows if r["method"] == "fp"), None)
    for r in rows:
        r["dPSNR_vs_fp"] = (r["PSNR"] - fp) if fp is not None else float("nan")
    order = {"-": 0, "fp": 1}
    rows.sort(key=lambda r: (order.get(r["method"], 2), r["method"], r["bits"]))
    out = {"dataset": args.dataset, "scale": args.scale, "rows": rows}
    print(json.dumps(out, indent=2))
    print()
    cols = ["model", "method", "bits", "PSNR", "SSIM", "dPSNR_vs_fp", "FAB", "GBitOPs", "iters"]
    print(format_table(rows, cols))
    print("bits = W/A; FAB = feature average bit-width; GBitOPs per 64x64 LR input")
    print("(sum over convs of MACs x w_bits x a_bits / 64, float layers 32 x 32).")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
