"""Benchmark: Granular-DQ tiled inference, tiles batched by bit-width vs one tile at a time.

Not a test. Builds a Granular-DQ model from a float architecture with random weights, runs
:func:`lowbitsr.quant.granular_dq.gdq_super_resolve` on one synthetic LR image both ways
(``batched=True``: bits decided for all tiles, then one forward per bit-width group of at most
``--max-batch`` tiles; ``batched=False``: one forward per tile, as the released code does) and
prints a JSON record and a small table with the ratio.

So that several bit-widths occur with random weights, the GBC is biased to send every tile to 8
bits and the E2B thresholds are set to the 1/3 and 2/3 quantiles of this image's tile entropies:
E2B then splits the tiles into 4/5/8-bit groups of similar size (``--no-mix`` keeps the random
GBC as it is, which often picks one bit-width everywhere).

    python bench/bench_gdq_tiles.py --arch edsr_tiny --size 256 --scale 4
    python bench/bench_gdq_tiles.py --arch edsr_baseline --size 192x320 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from lowbitsr.evaluate import format_table
from lowbitsr.models import create_model
from lowbitsr.quant.bitops import fab
from lowbitsr.quant.gdq_layers import patch_entropy
from lowbitsr.quant.granular_dq import (
    GranularDQConfig,
    calibrate_granular_dq,
    gdq_super_resolve,
    gdq_tile_starts,
    quantize_granular_dq,
)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def synthetic_lr(h: int, w: int, seed: int) -> torch.Tensor:
    """A ``[1, 3, h, w]`` image in [0, 255] with flat, smooth and noisy regions."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(
        torch.rand(1, 3, max(2, h // 24), max(2, w // 24), generator=g),
        size=(h, w),
        mode="bicubic",
        align_corners=False,
    )
    noise = torch.rand(1, 3, h, w, generator=g)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    mix = ((xx + yy) / 2).clamp(0, 1)  # flat-ish top-left to noisy bottom-right
    img = 0.6 * smooth + 0.4 * mix * noise
    img[..., : h // 3, : w // 3] = 0.5  # a flat corner
    return (img * 255).clamp(0, 255)


def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up (allocator, kernels)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="edsr_tiny", help="registered model name")
    p.add_argument("--overrides", default="{}", help="JSON, e.g. '{\"n_resblocks\": 4}'")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--size", type=_size, default=(192, 256), help="LR size, e.g. 256 or 192x256")
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--step", type=int, default=90)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--compat", default="default", choices=("default", "official"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mix", action="store_true", help="keep the random GBC's choices")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    float_model = create_model(args.arch, scale=args.scale, **json.loads(args.overrides))
    cfg = GranularDQConfig(
        entropy_thresholds=(2.8, 3.18), compat=args.compat, tile=args.tile, tile_step=args.step
    )
    model = quantize_granular_dq(float_model, cfg).to(device)
    h, w = args.size
    lr = synthetic_lr(h, w, args.seed).to(device)
    calib = torch.cat([synthetic_lr(48, 48, args.seed + i) for i in range(1, 9)]).to(device)
    calibrate_granular_dq(model, calib)
    model.eval()

    if not args.no_mix:
        ys, xs = gdq_tile_starts(h, args.tile, args.step), gdq_tile_starts(w, args.tile, args.step)
        th, tw = min(args.tile, h), min(args.tile, w)
        tiles = torch.cat([lr[..., y : y + th, x : x + tw] for y in ys for x in xs])
        ent = patch_entropy(tiles).double().cpu()
        q = torch.quantile(ent, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
        if model.controller.gbc is not None:
            with torch.no_grad():
                bias = torch.zeros(len(cfg.gbc_bits), device=device)
                bias[-1] = 100.0
                model.controller.gbc.fc.bias.copy_(bias)
        if model.e2b is not None:
            model.e2b.set_thresholds(q)

    def run(batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(args.seed)  # official mode draws gate noise at eval
        out = gdq_super_resolve(
            model, lr, args.scale, args.tile, args.step, batched=batched, max_batch=args.max_batch
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    t_batched, (sr_b, bits_b) = _time(lambda: run(True), args.repeats)
    t_single, (sr_1, bits_1) = _time(lambda: run(False), args.repeats)
    hist = {int(b): int((bits_b == b).sum()) for b in torch.unique(bits_b)}
    record = {
        "arch": args.arch,
        "overrides": json.loads(args.overrides),
        "scale": args.scale,
        "lr_size": [h, w],
        "tile": args.tile,
        "step": args.step,
        "max_batch": args.max_batch,
        "tiles": int(bits_b.numel()),
        "bits_histogram": hist,
        "fab": fab(bits_b),
        "batched_s": t_batched,
        "one_by_one_s": t_single,
        "speedup": t_single / t_batched,
        "bit_maps_equal": bool(torch.equal(bits_b, bits_1)),
        "max_abs_diff": float((sr_b - sr_1).abs().max()),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "compat": args.compat,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(record))
    rows = [
        {"mode": "one tile at a time", "seconds": t_single, "ratio": 1.0},
        {"mode": f"batched by bit-width (<= {args.max_batch})", "seconds": t_batched,
         "ratio": t_single / t_batched},
    ]  # fmt: skip
    print(format_table(rows))


if __name__ == "__main__":
    main()
