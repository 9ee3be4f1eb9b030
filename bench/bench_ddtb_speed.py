"""Benchmark: cost of a DDTB / PAMS QAT training step and of quantized inference vs full precision.

Not a test. Builds a float model with random weights, its DDTB student (``DDTBConfig(bits)``,
calibrated on one batch, gates applied: the second training stage, METHODS §1.6) and its PAMS
student (``PAMSConfig(bits)``, calibrated), and times, as the median over ``--repeats`` runs after
warm-up:

- ``fp_step``: float model, forward + L1 + backward + Adam step;
- ``ddtb_step``: DDTB student alone, the same;
- ``ddtb_recipe_step``: the full DDTB QAT step as :class:`lowbitsr.quant.recipes.QATRecipe` runs it:
  student ``forward_features`` + float teacher ``forward_features`` under ``no_grad`` + L1 +
  ``1000 * attention_transfer`` + backward + Adam step;
- ``pams_step``: PAMS student alone, forward + L1 + backward + Adam step;
- ``*_infer``: eval-mode, ``no_grad`` inference of one ``1×3×--infer-size²`` LR image.

The cases are timed round-robin (one run of each per round), so that load from other processes
on a shared machine spreads over all of them alike. Prints one JSON record, then a Markdown table
with the ratios to the float counterpart.

    python bench/bench_ddtb_speed.py --arch edsr_tiny
    python bench/bench_ddtb_speed.py --arch edsr_baseline --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbitsr.evaluate import format_table
from lowbitsr.losses import attention_transfer
from lowbitsr.models import create_model
from lowbitsr.quant import (
    DDTBConfig,
    PAMSConfig,
    bound_parameters,
    calibrate,
    quantize,
    set_gates_applied,
)

ARCHS = ("edsr_tiny", "edsr_baseline")


def synthetic_pair(n: int, patch: int, scale: int, seed: int) -> tuple[Tensor, Tensor]:
    """A batch of smooth-plus-noise HR patches in [0, 255] and their box-downsampled LR.

    Returns:
        ``(lr, hr)``: ``[n, 3, patch, patch]`` and ``[n, 3, patch*scale, patch*scale]``, float32.
    """
    g = torch.Generator().manual_seed(seed)
    size = patch * scale
    smooth = F.interpolate(
        torch.rand(n, 3, max(2, size // 16), max(2, size // 16), generator=g),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )
    hr = ((0.8 * smooth + 0.2 * torch.rand(n, 3, size, size, generator=g)) * 255).clamp(0, 255)
    lr = F.avg_pool2d(hr, scale)
    return lr, hr


def _adam(model: nn.Module) -> torch.optim.Adam:
    # The recipe's groups (§1.6): weights and gates at 1e-4, clipping bounds at 1e-2.
    bounds = bound_parameters(model)
    ids = {id(p) for p in bounds}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest}]
    if bounds:
        groups.append({"params": bounds, "lr": 1e-2})
    return torch.optim.Adam(groups, lr=1e-4, betas=(0.9, 0.999))


def _train_step(
    model: nn.Module, lr: Tensor, hr: Tensor, teacher: nn.Module | None = None
) -> Callable[[], None]:
    """One optimisation step; with a teacher, the recipe's L1 + 1000·AT distillation loss."""
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sr, feat = model.forward_features(lr)
        loss = F.l1_loss(sr, hr)
        if teacher is not None:
            with torch.no_grad():
                _, feat_t = teacher.forward_features(lr)
            loss = loss + 1000.0 * attention_transfer(feat, feat_t)
        loss.backward()
        opt.step()

    return step


def _infer(model: nn.Module, lr: Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(lr)

    return run


def _time_round_robin(
    cases: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median wall time (s) per case; each round runs every case once, in order."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="edsr_tiny", choices=ARCHS)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--bits", type=int, default=2, help="DDTB/PAMS bit-width (2-4)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32, help="LR training patch size")
    p.add_argument("--infer-size", type=int, default=128, help="LR inference image size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    lr, hr = synthetic_pair(args.batch, args.patch, args.scale, args.seed)
    lr_inf, _ = synthetic_pair(1, args.infer_size, 1, args.seed + 1)

    fp = create_model(args.arch, scale=args.scale).train()
    teacher = create_model(args.arch, scale=args.scale).eval()
    teacher.load_state_dict(fp.state_dict())
    for prm in teacher.parameters():
        prm.requires_grad_(False)

    ddtb = quantize(fp, DDTBConfig(bits=args.bits))
    calibrate(ddtb, [lr])
    set_gates_applied(ddtb, True)
    ddtb.train()
    ddtb_kd = quantize(fp, DDTBConfig(bits=args.bits))
    calibrate(ddtb_kd, [lr])
    set_gates_applied(ddtb_kd, True)
    ddtb_kd.train()
    pams = quantize(fp, PAMSConfig(bits=args.bits))
    calibrate(pams, [lr])
    pams.train()

    train_cases = {
        "fp_step": _train_step(fp, lr, hr),
        "ddtb_step": _train_step(ddtb, lr, hr),
        "ddtb_recipe_step": _train_step(ddtb_kd, lr, hr, teacher),
        "pams_step": _train_step(pams, lr, hr),
    }
    t_train = _time_round_robin(train_cases, args.repeats, args.warmup)

    # Separate eval copies, so the training cases above keep their train-mode modules.
    infer_models = {"fp": fp, "ddtb": ddtb, "pams": pams}
    for m in infer_models.values():
        m.eval()
    infer_cases = {f"{k}_infer": _infer(m, lr_inf) for k, m in infer_models.items()}
    t_infer = _time_round_robin(infer_cases, args.repeats, args.warmup)

    seconds = {**t_train, **t_infer}
    ratios = {
        "ddtb_step": t_train["ddtb_step"] / t_train["fp_step"],
        "ddtb_recipe_step": t_train["ddtb_recipe_step"] / t_train["fp_step"],
        "pams_step": t_train["pams_step"] / t_train["fp_step"],
        "ddtb_infer": t_infer["ddtb_infer"] / t_infer["fp_infer"],
        "pams_infer": t_infer["pams_infer"] / t_infer["fp_infer"],
    }
    record = {
        "arch": args.arch,
        "scale": args.scale,
        "bits": args.bits,
        "batch": args.batch,
        "patch": args.patch,
        "infer_size": args.infer_size,
        "seconds": seconds,
        "ratio_to_fp": ratios,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(record))
    train_shape = f"{args.batch}×3×{args.patch}²"
    rows = [
        {"case": f"FP train step ({train_shape})", "seconds": seconds["fp_step"], "ratio": 1.0},
        {"case": "DDTB QAT step (student)", "seconds": seconds["ddtb_step"],
         "ratio": ratios["ddtb_step"]},
        {"case": "DDTB QAT step (recipe: + teacher, AT)", "seconds": seconds["ddtb_recipe_step"],
         "ratio": ratios["ddtb_recipe_step"]},
        {"case": "PAMS QAT step (student)", "seconds": seconds["pams_step"],
         "ratio": ratios["pams_step"]},
        {"case": f"FP inference (1×3×{args.infer_size}²)", "seconds": seconds["fp_infer"],
         "ratio": 1.0},
        {"case": "DDTB inference", "seconds": seconds["ddtb_infer"], "ratio": ratios["ddtb_infer"]},
        {"case": "PAMS inference", "seconds": seconds["pams_infer"], "ratio": ratios["pams_infer"]},
    ]  # fmt: skip
    print(format_table(rows))


if __name__ == "__main__":
    main()
