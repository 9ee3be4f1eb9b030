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
    """Where a run's outputs are and how it ended."""

    run_dir: Path
    step: int
    best_psnr: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def _recipe_for(cfg: ExperimentConfig) -> Recipe:
    if not cfg.quant:
        return FloatRecipe(cfg)
    from .quant import recipe_for

    return recipe_for(cfg)


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    recipe: Recipe | None = None,
    stop_after: int | None = None,
    max_nonfinite: int = 10,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or fine-tune / QAT) the model described by ``cfg``.

    Args:
        cfg: the experiment; ``cfg.quant`` selects a quantization recipe, None = float training.
        resume: continue from ``<run_dir>/checkpoint.safetensors`` if it exists.
        device: torch device for model and batches.
        progress: show a tqdm progress bar (rate, ETA, loss).
        recipe: override the recipe chosen from ``cfg`` (for tests and custom methods).
        stop_after: stop (with a checkpoint) after this many steps of *this* call — used to
            test resumption; the run can be continued with ``resume=True``.
        max_nonfinite: a non-finite loss skips the step; after this many such steps the run
            stops with :class:`LowbitsrError` (the last good checkpoint is kept).
    Returns:
        :class:`TrainResult`.
    """
    from .data import build_dataset
    from .evaluate import evaluate

    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # a temp file of a write that a kill interrupted
        stale.unlink()
    save_config(cfg, run_dir / "config.yaml")
    tc = cfg.train
    scale = cfg.model.scale
    recipe = recipe or _recipe_for(cfg)

    train_set: Dataset = build_dataset({"seed": cfg.seed, **cfg.data.train}, scale, "train")
    val_set = build_dataset(cfg.data.val, scale, "eval") if cfg.data.val else None

    ckpt = run_dir / "checkpoint.safetensors"
    start = 0
    resuming = resume and ckpt.is_file()

    def make_loader(start_step: int) -> Iterator[dict[str, Any]]:
        sampler = ResumableSampler(len(train_set), cfg.seed, start_step * tc.batch_size)
        loader = DataLoader(
            train_set,
            batch_size=tc.batch_size,
            sampler=sampler,
            num_workers=tc.num_workers,
            drop_last=True,
            persistent_workers=tc.num_workers > 0,
        )
        return iter(loader)

    model = build_model(cfg).to(device)
    resume_state = peek_training_state(ckpt)["extra"].get("recipe", {}) if resuming else None
    # calibration batches come from their own stream so they never shift the training data
    model = recipe.prepare(model, make_loader(10_000_000), resume_state)
    model = model.to(device).train()
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
    elif ckpt.exists():
        ckpt.unlink()  # a fresh run must not later resume a stale state
    if start == 0 and (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()

    def checkpoint(step: int) -> None:
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
        _log(run_dir, rec)
        if res.psnr > best and recipe.selectable(step):
            best = res.psnr
            save_model(model, run_dir / "best", quant=recipe.quant_dict(), meta=rec)
        return res.psnr

    data = make_loader(start)
    bar = tqdm(
        total=tc.iterations, initial=start, desc=cfg.name, disable=not progress, dynamic_ncols=True
    )
    nonfinite = 0
    step = start
    t0 = time.time()
    last_val: float | None = None
    while step < tc.iterations:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(data).items()}
        loss, logs = recipe.loss(model, batch, step)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            nonfinite += 1
            _log(run_dir, {"step": step, "event": "nonfinite_loss", "count": nonfinite})
            if nonfinite >= max_nonfinite:
                bar.close()
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
            post = {k: f"{v:.3g}" for k, v in logs.items()}
            if last_val is not None:
                post["val"] = f"{last_val:.2f}"
            bar.set_postfix(post)
            _log(run_dir, {"step": step, **logs, "lr": opt.param_groups[0]["lr"]})
        if on_step is not None:
            on_step(step)
        if tc.val_every > 0 and step % tc.val_every == 0 and step < tc.iterations:
            last_val = validate(step)
        if step % tc.checkpoint_every == 0 or step == tc.iterations:
            checkpoint(step)
        if stop_after is not None and step - start >= stop_after:
            checkpoint(step)
            bar.close()
            return TrainResult(run_dir, step, best if best > -math.inf else None, history)
    bar.close()
    validate(step)
    meta = {
        "step": step,
        "seconds": round(time.time() - t0, 1),
        "config": config_to_dict(cfg),
        "best_val_psnr": best if best > -math.inf else None,
    }
    # the shipped/final model is the validation-selected one when a validation split exists
    if val_set is not None and (run_dir / "best.safetensors").exists():
        from .checkpoint import load_model

        best_model = load_model(run_dir / "best")
        save_model(best_model, run_dir / "model", quant=recipe.quant_dict(), meta=meta)
    else:
        save_model(model, run_dir / "model", quant=recipe.quant_dict(), meta=meta)
    return TrainResult(run_dir, step, best if best > -math.inf else None, history)
