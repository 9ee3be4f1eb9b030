"""Benchmark: cost of a DDTB / PAMS QAT training step and of quantized inference vs full precision.

Not a test. Builds a float model with random weights, its DDTB student (``DDTBConfig(bits)``,
calibrated on one batch, gates applied: the second training stage, docs/methods.md §1.6) and its
PAMS student (``PAMSConfig(bits)``, calibrated), and times, as the median over ``--repeats`` runs
after warm-up:

- ``fp_step``: float model, forward + L1 + backward + Adam step;
- ``ddtb_step``: DDTB student alone, the same;
- ``ddtb_recipe_step``: a DDTB QAT step whose float teacher runs its whole ``forward_features``
  (tail included) under ``no_grad`` + L1 + ``1000 * attention_transfer`` + backward + Adam;
- ``ddtb_recipe_feat_step``: the step as :class:`lowbitsr.quant.recipes.QATRecipe` runs it: the
  teacher computes only the feature the loss uses (``model.features``: head + body + skip, not
  the upsampling tail);
- ``pams_step``: PAMS student alone, forward + L1 + backward + Adam step;
- ``*_infer``: eval-mode, ``no_grad`` inference of one ``1×3×--infer-size²`` LR image.

The cases are timed round-robin (one run of each per round), so that load from other processes
on a shared machine spreads over all of them alike; each ratio to the float counterpart is the
median over rounds of the ratio within a round. Wall-clock and process CPU time (all threads) are
both reported. Prints one JSON record, then a Markdown table.

On a machine whose cores are busy with other jobs, also run ``--threads 1``: with more threads
than free cores, every parallel op waits for a descheduled thread, which charges each op a
scheduling delay and inflates the ratios by op count rather than work; with one thread, the CPU
time is close to the work itself.

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


def _teacher_feature(teacher: nn.Module, lr: Tensor) -> Tensor:
    """The EDSR pre-tail feature (body output + head output) without running the tail."""
    x = teacher.head(teacher.sub_mean(lr))
    return teacher.body(x) + x


def _train_step(
    model: nn.Module,
    lr: Tensor,
    hr: Tensor,
    teacher: nn.Module | None = None,
    teacher_tail: bool = True,
) -> Callable[[], None]:
    """One optimisation step; with a teacher, the recipe's L1 + 1000·AT distillation loss."""
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sr, feat = model.forward_features(lr)
        loss = F.l1_loss(sr, hr)
        if teacher is not None:
            with torch.no_grad():
                if teacher_tail:
                    _, feat_t = teacher.forward_features(lr)
                else:
                    feat_t = _teacher_feature(teacher, lr)
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
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU times (s) of every run; each round runs every case once, in order.

    Returns:
        ``{"wall": {case: [t per round]}, "cpu": {...}}``.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def _summary(times: dict[str, dict[str, list[float]]], base: str) -> dict[str, dict[str, float]]:
    """Per case: median wall and CPU seconds, and the median over rounds of the ratio to
    ``base`` measured in the same round (robust to load that drifts between rounds)."""
    out: dict[str, dict[str, float]] = {}
    for name in times["wall"]:
        row: dict[str, float] = {}
        for clock in ("wall", "cpu"):
            t, b = times[clock][name], times[clock][base]
            row[f"{clock}_s"] = statistics.median(t)
            row[f"{clock}_ratio"] = statistics.median(x / y for x, y in zip(t, b, strict=True))
        out[name] = row
    return out


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
    ddtb_kd2 = quantize(fp, DDTBConfig(bits=args.bits))
    calibrate(ddtb_kd2, [lr])
    set_gates_applied(ddtb_kd2, True)
    ddtb_kd2.train()
    pams = quantize(fp, PAMSConfig(bits=args.bits))
    calibrate(pams, [lr])
    pams.train()

    train_cases = {
        "fp_step": _train_step(fp, lr, hr),
        "ddtb_step": _train_step(ddtb, lr, hr),
        "ddtb_recipe_step": _train_step(ddtb_kd, lr, hr, teacher),
        "ddtb_recipe_feat_step": _train_step(ddtb_kd2, lr, hr, teacher, teacher_tail=False),
        "pams_step": _train_step(pams, lr, hr),
    }
    t_train = _summary(_time_round_robin(train_cases, args.repeats, args.warmup), "fp_step")

    # Inference with the same (now trained a few steps) models; eval mode uses the weight cache.
    infer_models = {"fp": fp, "ddtb": ddtb, "pams": pams}
    for m in infer_models.values():
        m.eval()
    infer_cases = {f"{k}_infer": _infer(m, lr_inf) for k, m in infer_models.items()}
    t_infer = _summary(_time_round_robin(infer_cases, args.repeats, args.warmup), "fp_infer")

    results = {**t_train, **t_infer}
    record = {
        "arch": args.arch,
        "scale": args.scale,
        "bits": args.bits,
        "batch": args.batch,
        "patch": args.patch,
        "infer_size": args.infer_size,
        "results": results,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(record))
    train_shape = f"{args.batch}×3×{args.patch}²"
    labels = {
        "fp_step": f"FP train step ({train_shape})",
        "ddtb_step": "DDTB QAT step (student)",
        "ddtb_recipe_step": "DDTB QAT step + full teacher forward, AT",
        "ddtb_recipe_feat_step": "DDTB QAT step as the recipe runs it (teacher features, AT)",
        "pams_step": "PAMS QAT step (student)",
        "fp_infer": f"FP inference (1×3×{args.infer_size}²)",
        "ddtb_infer": "DDTB inference",
        "pams_infer": "PAMS inference",
    }
    rows = [
        {
            "case": label,
            "wall s": results[key]["wall_s"],
            "ratio (wall)": results[key]["wall_ratio"],
            "CPU s": results[key]["cpu_s"],
            "ratio (CPU)": results[key]["cpu_ratio"],
        }
        for key, label in labels.items()
    ]
    print(format_table(rows))


if __name__ == "__main__":
    main()
