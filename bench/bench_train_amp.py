"""Training step time of float EDSR-baseline x4: float32 vs bf16 autocast, channels-last.

    python bench/bench_train_amp.py --threads 1 --steps 4

One Adam step on a batch of 16 LR patches of 32x32 (the photo-corpus recipe); the four variants
run side by side in one process and each reports the median of ``--steps`` steps after a warm-up
step. On CPUs with AMX (bf16 matrix units) bf16 + channels-last is several times faster. Prints
JSON and a table. Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lowbitsr
from lowbitsr.evaluate import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr-patch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = args.lr_patch
    x = torch.rand(args.batch, 3, s, s) * 255
    y = torch.rand(args.batch, 3, 4 * s, 4 * s) * 255
    rows = []
    for amp in ("none", "bf16"):
        for cl in (False, True):
            model = lowbitsr.create_model("edsr_baseline", scale=4)
            inp = x
            if cl:
                model = model.to(memory_format=torch.channels_last)
                inp = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters(), 1e-4)
            times = []
            for _ in range(args.steps + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                    out = model(inp)
                loss = (out.float() - y).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
            rows.append(
                {"amp": amp, "channels_last": cl, "s_per_step": statistics.median(times[1:])}
            )
    base = rows[0]["s_per_step"]
    for r in rows:
        r["speedup"] = base / r["s_per_step"]
    print(json.dumps({"threads": args.threads, "batch": args.batch, "lr_patch": s, "rows": rows}))
    print(
        format_table(
            [
                {**r, "s_per_step": f"{r['s_per_step']:.3f}", "speedup": f"{r['speedup']:.2f}"}
                for r in rows
            ]
        )
    )


if __name__ == "__main__":
    main()
