"""Validation PSNR of training runs at every validation step, from their ``log.jsonl``.

    python bench/val_curves.py runs/edsr_tiny_x4_pams_w2a2 runs/edsr_tiny_x4_ddtb_w2a2

Prints a JSON object and a Markdown table (one row per run, one column per step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbitsr.evaluate import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    curves: dict[str, dict[int, float]] = {}
    for run in args.runs:
        lines = (run / "log.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        curves[run.name] = {r["step"]: r["val_psnr"] for r in recs if "val_psnr" in r}
    steps = sorted({s for c in curves.values() for s in c})
    print(json.dumps(curves))
    rows = [
        {"run": n, **{str(s): c.get(s, float("nan")) for s in steps}} for n, c in curves.items()
    ]
    print(format_table(rows))


if __name__ == "__main__":
    main()
