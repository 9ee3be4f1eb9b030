"""How close a 2-process DDP run (gloo, CPU) is to a single process on the same global batch.

Runs the scenarios of ``tests/dist_worker.py`` (float EDSR, SRResNet with synchronised
BatchNorm, DDTB QAT with rank-0 calibration, Granular-DQ) once under
``torchrun --nproc_per_node=2`` and once in this process, then prints, per scenario, the largest
absolute and relative differences of the last step's gradients and of the final weights and
buffers, and whether the two ranks ended bit-identical. JSON on stdout, then a table.

    python bench/ddp_parity.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import dist_worker  # noqa: E402

SCENARIOS = ["float", "bn", "ddtb", "gdq"]


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> dict:
    abs_max, rel_max, worst = 0.0, 0.0, ""
    for k in a:
        if not k.startswith(prefix) or not a[k].is_floating_point():
            continue
        d = (a[k].double() - b[k].double()).abs()
        scale = b[k].double().abs().max().clamp_min(1e-12)
        if float(d.max()) > abs_max:
            abs_max, worst = float(d.max()), k[len(prefix) :]
        rel_max = max(rel_max, float(d.max() / scale))
    return {"max_abs": abs_max, "max_rel_to_tensor_max": rel_max, "worst": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ddp_parity_"))
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    t0 = time.time()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TESTS / "dist_worker.py"),
        str(out),
        *SCENARIOS,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    t_ddp = time.time() - t0
    rows = []
    for name in SCENARIOS:
        r0 = load_file(str(out / name / "rank0_w2.safetensors"))
        r1 = load_file(str(out / name / "rank1_w2.safetensors"))
        row = {
            "scenario": name,
            "ranks_identical": all(torch.equal(r0[k], r1[k]) for k in r0),
        }
        if name != "gdq":  # Granular-DQ draws per-rank Gumbel noise: no single-process twin
            dist_worker.run_scenario(name, out)
            single = load_file(str(out / name / "rank0_w1.safetensors"))
            row["grad"] = _diff(r0, single, "g.")
            row["weights"] = _diff(r0, single, "w.")
        rows.append(row)
    print(json.dumps({"torchrun_seconds": round(t_ddp, 1), "scenarios": rows}, indent=2))
    print("\n| scenario | ranks bit-identical | grad max abs (rel) | weights max abs (rel) |")
    print("|---|---|---|---|")
    for r in rows:
        g, w = r.get("grad"), r.get("weights")
        gs = f"{g['max_abs']:.2e} ({g['max_rel_to_tensor_max']:.1e})" if g else "-"
        ws = f"{w['max_abs']:.2e} ({w['max_rel_to_tensor_max']:.1e})" if w else "-"
        print(f"| {r['scenario']} | {r['ranks_identical']} | {gs} | {ws} |")


if __name__ == "__main__":
    main()
