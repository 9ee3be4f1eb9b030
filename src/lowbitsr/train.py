"""Iteration-based training loop for float SR models and (through a recipe) quantization-aware
training, with validation on a held-out split, atomic resumable checkpoints and progress bars.

Run layout (``<output_root>/<name>/``)::

    config.yaml              the full experiment config
    checkpoint.safetensors   last resumable state (model, optimizer, scheduler, RNG, step)
    best.safetensors/.json   weights with the best validation PSNR (a loadable saved model)
    model.safetensors/.json  final weights (a loadable saved model; == best when validating)
    log.jsonl                one JSON line per validation / logging event

Determinism: sample ``p`` of the run (``p = step·batch + i``) always gets the same image and the
same crop/augmentation, whatever happened before, so a resumed run sees exactly the data of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import (
    load_training_state,
    peek_training_state,
    save_model,
    save_training_state,
)
from .config import ExperimentConfig, config_to_dict, save_config
from .errors import LowbitsrError

__all__ = ["FloatRecipe", "Recipe", "ResumableSampler", "TrainResult", "build_model", "train"]


class ResumableSampler(Sampler[int]):
    """Infinite shuffled stream of dataset keys that can start at any global sample position.

    Position ``p`` maps to epoch ``e = p // L`` and slot ``p % L`` of a permutation seeded by
    ``(seed, e)``; the yielded key is ``perm[p % L] + e·L`` so that every position has a unique
    key. Datasets take ``key % len`` as the item and seed their crop/augmentation RNG with the
    key, so augmentations differ across epochs yet are reproducible.
    """

    def __init__(self, length: int, seed: int, start: int = 0) -> None:
        self.length, self.seed, self.start = length, seed, start

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[int]:
        p = self.start
        epoch, perm = -1, None
        while True:
            e = p // self.length
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[p % self.length]) + e * self.length
            p += 1


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The float model of ``cfg.model`` with its ``init`` weights loaded (if any)."""
    from .models import create_model, load_weights
    from .pretrained import load_pretrained

    m = cfg.model
    init = m.init
    if init and init.startswith("pretrained:"):
        model = load_pretrained(init.split(":", 1)[1])
        if model.model_config.get("scale") != m.scale:
            raise LowbitsrError(f"model.init {init} is for another scale than {m.scale}")
        return model.train()
    model = create_model(m.name, scale=m.scale, **m.overrides)
    if init:
        from .checkpoint import model_paths

        # a run folder (or saved-model stem) means its model.safetensors
        weights = model_paths(init)[0] if Path(init).is_dir() else init
        load_weights(model, weights)
    return model


class Recipe:
    """What a training method adds to the loop: the trained model, its losses and parameter groups.

    Subclasses (float training here; DDTB/PAMS/Granular-DQ in :mod:`lowbitsr.quant`) override the
    hooks; the loop itself (data, optimizer, checkpoints, validation, logging) is shared.
    """

    #: whether some parameters may go unused in a training step (DistributedDataParallel must
    #: then search the graph every step), e.g. Granular-DQ's quantizers of the bits not drawn
    ddp_find_unused_parameters: bool = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def prepare(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, Any]],
        resume_state: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Return the model to train (e.g. the quantized student).

        Args:
            model: the float model (``init`` weights loaded), on the training device.
            batches: an endless stream of training batches (``{"lr", "hr", "name"}``, on CPU)
                reserved for calibration; consuming it does not shift the training data.
            resume_state: on resume, the dict :meth:`state` returned when the checkpoint was
                written. The recipe must rebuild the same module structure (e.g. which layers
                carry gates) without calibrating; the checkpoint's tensors are loaded afterwards.
        """
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (default: every trainable parameter at ``train.lr``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch and scalars to log."""
        sr = model(batch["lr"])
        loss = F.l1_loss(sr, batch["hr"])
        return loss, {"l1": float(loss.detach())}

    def state(self) -> dict[str, Any]:
        """JSON-able recipe state saved in checkpoints (e.g. calibration done)."""
        return {}

    def selectable(self, step: int) -> bool:
        """Whether the model after ``step`` may be kept as the best one (e.g. not mid-schedule)."""
        return True

    def quant_dict(self) -> dict[str, Any] | None:
        """Plain-dict quantization config saved beside the weights (None for float models)."""
        return None


class FloatRecipe(Recipe):
    """Plain L1 training of a float model."""


@dataclass
class TrainResult:
    """Where a run's outputs are and how it ended (``model``: the trained module in memory)."""

    run_dir: Path
    step: int
    best_psnr: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None


def _recipe_for(cfg: ExperimentConfig) -> Recipe:
    if not cfg.quant:
        return FloatRecipe(cfg)
    from .quant import recipe_for

    return recipe_for(cfg)


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


class _Scalars:
    """TensorBoard scalar writer of rank 0 (no-op when off or on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LowbitsrError(
                "train.tensorboard is on but TensorBoard is not installed; "
                'pip install "lowbitsr[tensorboard]" or set train.tensorboard=false'
            ) from None
        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step or None)

    def add(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _autocast(amp: str, device: torch.device) -> Any:
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise LowbitsrError(f"train.amp must be 'none' or 'bf16', got {amp!r}")


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    recipe: Recipe | None = None,
    stop_after: int | None = None,
    max_nonfinite: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or fine-tune / QAT) the model described by ``cfg``.

    In a ``torch.distributed`` job (``torchrun``; see :mod:`lowbitsr.distributed`) every rank
    calls this: the model runs under DistributedDataParallel, ``train.batch_size`` is the global
    batch split over the ranks, calibration happens on rank 0 and is broadcast, validation is
    sharded, and only rank 0 writes files.

    Args:
        cfg: the experiment; ``cfg.quant`` selects a quantization recipe, None = float training.
        resume: continue from ``<run_dir>/checkpoint.safetensors`` if it exists.
        device: torch device for model and batches (``cuda`` means ``cuda:LOCAL_RANK`` under
            torchrun).
        progress: show a tqdm progress bar (rate, ETA, loss) on rank 0.
        recipe: override the recipe chosen from ``cfg`` (for tests and custom methods).
        stop_after: stop (with a checkpoint) after this many steps of *this* call — used to
            test resumption; the run can be continued with ``resume=True``.
        max_nonfinite: overrides ``train.max_nonfinite``: a non-finite loss (on any rank) skips
            the step on every rank; after this many such steps the run stops with
            :class:`LowbitsrError` (the last good checkpoint is kept).
    Returns:
        :class:`TrainResult`.
    """
    from .data import build_dataset
    from .distributed import (
        DDPModel,
        DistributedStepSampler,
        any_true,
        assert_same_state,
        barrier,
        broadcast_object,
        broadcast_state,
        convert_sync_batchnorm,
        init_from_env,
        mean_across_ranks,
        resolve_device,
    )
    from .evaluate import evaluate

    ctx = init_from_env(device)  # joins torchrun's group if launched by it and not yet joined
    main = ctx.is_main
    device = resolve_device(device, ctx)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    tc = cfg.train
    limit = tc.max_nonfinite if max_nonfinite is None else max_nonfinite
    _autocast(tc.amp, device)  # validate the option before any work
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # a temp file of a write that a kill interrupted
            stale.unlink()
        save_config(cfg, run_dir / "config.yaml")
    scale = cfg.model.scale
    recipe = recipe or _recipe_for(cfg)

    train_set: Dataset = build_dataset({"seed": cfg.seed, **cfg.data.train}, scale, "train")
    val_set = build_dataset(cfg.data.val, scale, "eval") if cfg.data.val else None

    ckpt = run_dir / "checkpoint.safetensors"
    start = 0
    resuming = resume and ckpt.is_file()

    def make_loader(start_step: int, sharded: bool = True) -> Iterator[dict[str, Any]]:
        stream = ResumableSampler(len(train_set), cfg.seed, start_step * tc.batch_size)
        rank, world = (ctx.rank, ctx.world_size) if sharded else (0, 1)
        loader = DataLoader(
            train_set,
            batch_sampler=DistributedStepSampler(stream, tc.batch_size, rank, world),
            num_workers=tc.num_workers,
            persistent_workers=tc.num_workers > 0,
        )
        return iter(loader)

    model = build_model(cfg).to(device)
    resume_state = peek_training_state(ckpt)["extra"].get("recipe", {}) if resuming else None
    # calibration batches come from their own (unsharded) stream so they never shift the
    # training data; in a distributed job only rank 0 calibrates and the others copy its result
    calib = make_loader(10_000_000, sharded=False)
    if ctx.enabled and resume_state is None:
        if main:
            model = recipe.prepare(model, calib, None)
        state = broadcast_object(recipe.state() if main else None)
        if not main:
            model = recipe.prepare(model, calib, state)
    else:
        model = recipe.prepare(model, calib, resume_state)
    model = model.to(device).train()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.enabled:
        broadcast_state(model)
        assert_same_state(model, f"{cfg.name}: model after calibration")
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            model = convert_sync_batchnorm(model, device)
    groups = recipe.param_groups(model)
    opt = torch.optim.Adam(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    sched = (
        torch.optim.lr_scheduler.StepLR(opt, step_size=tc.lr_step, gamma=tc.lr_gamma)
        if tc.lr_step > 0
        else None
    )
    best = -math.inf
    history: list[dict[str, Any]] = []
    if resuming:
        st = load_training_state(ckpt, model=model, optimizer=opt, scheduler=sched)
        start = st["step"]
        best = st["extra"].get("best_psnr", -math.inf)
    elif main and ckpt.exists():
        ckpt.unlink()  # a fresh run must not later resume a stale state
    if main and start == 0 and (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()
    if ctx.enabled and ctx.rank > 0:
        # ranks draw their own random numbers (e.g. Gumbel noise) from rank-specific streams
        torch.manual_seed(cfg.seed + 7919 * ctx.rank + start)
    stepper: Any = model
    if ctx.enabled:
        stepper = DDPModel(model, device, recipe.ddp_find_unused_parameters)
    tb = _Scalars(run_dir, tc.tensorboard and main, start)

    def checkpoint(step: int) -> None:
        if main:
            save_training_state(
                ckpt,
                model=model,
                optimizer=opt,
                scheduler=sched,
                step=step,
                extra={"best_psnr": best, "recipe": recipe.state()},
            )

    def validate(step: int) -> float | None:
        nonlocal best
        if val_set is None:
            return None
        res = evaluate(model, val_set, scale, tile=tc.val_tile, device=device, progress=False)
        rec = {"step": step, "val_psnr": res.psnr, "val_ssim": res.ssim}
        history.append(rec)
        tb.add("val", {"psnr": res.psnr, "ssim": res.ssim, "fab": res.fab}, step)
        if main:
            _log(run_dir, rec)
        if res.psnr > best and recipe.selectable(step):
            best = res.psnr
            if main:
                save_model(model, run_dir / "best", quant=recipe.quant_dict(), meta=rec)
        return res.psnr

    def finish(step: int) -> TrainResult:
        bar.close()
        tb.close()
        barrier()
        return TrainResult(run_dir, step, best if best > -math.inf else None, history, model)

    data = make_loader(start)
    bar = tqdm(
        total=tc.iterations,
        initial=start,
        desc=cfg.name,
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    nonfinite = 0
    step = start
    t0 = time.time()
    last_val: float | None = None
    while step < tc.iterations:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(data).items()}
        if tc.channels_last:
            batch = {
                k: (v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) else v)
                for k, v in batch.items()
            }
        with _autocast(tc.amp, device):
            loss, logs = recipe.loss(stepper, batch, step)
        opt.zero_grad(set_to_none=True)
        if any_true(not bool(torch.isfinite(loss)), device):
            nonfinite += 1
            if main:
                _log(run_dir, {"step": step, "event": "nonfinite_loss", "count": nonfinite})
            if nonfinite >= limit:
                bar.close()
                tb.close()
                raise LowbitsrError(
                    f"{cfg.name}: loss was not finite in {nonfinite} steps (last at step {step}); "
                    f"stopped. The last good checkpoint is {ckpt}; "
                    "lower train.lr or check the data."
                )
            step += 1  # skip this batch: the data stream stays aligned with the step count
            continue
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.iterations:
            logs = mean_across_ranks(logs, device)
            post = {k: f"{v:.3g}" for k, v in logs.items()}
            if last_val is not None:
                post["val"] = f"{last_val:.2f}"
            bar.set_postfix(post)
            lr_now = opt.param_groups[0]["lr"]
            if main:
                _log(run_dir, {"step": step, **logs, "lr": lr_now})
            tb.add("train", {**logs, "lr": lr_now}, step)
            if tb.writer is not None:
                from .quant.apply import quant_scalars

                tb.add("quant", quant_scalars(model), step)
        if on_step is not None:
            on_step(step)
        if tc.val_every > 0 and step % tc.val_every == 0 and step < tc.iterations:
            last_val = validate(step)
        if step % tc.checkpoint_every == 0 or step == tc.iterations:
            checkpoint(step)
        if stop_after is not None and step - start >= stop_after:
            checkpoint(step)
            return finish(step)
    validate(step)
    if main:
        meta = {
            "step": step,
            "seconds": round(time.time() - t0, 1),
            "config": config_to_dict(cfg),
            "best_val_psnr": best if best > -math.inf else None,
            "processes": ctx.world_size,
        }
        # the shipped/final model is the validation-selected one when a validation split exists
        if val_set is not None and (run_dir / "best.safetensors").exists():
            from .checkpoint import load_model

            best_model = load_model(run_dir / "best")
            save_model(best_model, run_dir / "model", quant=recipe.quant_dict(), meta=meta)
        else:
            save_model(model, run_dir / "model", quant=recipe.quant_dict(), meta=meta)
    return finish(step)
