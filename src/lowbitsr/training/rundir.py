"""The run folder of a training run: which files a run writes, claiming the folder (refusing to
replace an earlier run unless told to), what a resume may change, and which checkpoint is left
after the stop on non-finite losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import peek_training_state
from ..config import ExperimentConfig, config_to_dict, from_dict
from ..errors import ConfigError
from ..fileio import atomic_write

__all__ = [
    "BROKEN_CHECKPOINT",
    "CHECKPOINT",
    "OPTIMIZER_KEYS",
    "PREV_CHECKPOINT",
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "apply_optimizer_settings",
    "claim_run_dir",
    "clear_run",
    "earlier_run",
    "keep_copy",
    "nonfinite_message",
    "resume_changes",
    "settle_checkpoints",
]

CHECKPOINT = "checkpoint.safetensors"
#: the checkpoint before the newest, until the newest is known to give finite outputs
PREV_CHECKPOINT = "checkpoint.prev.safetensors"
#: where the stop on non-finite losses moves a newest checkpoint with broken weights
BROKEN_CHECKPOINT = "checkpoint.nonfinite.safetensors"
#: files a run writes into its folder besides ``config.yaml``: any of them marks an earlier run,
#: and ``overwrite=True`` removes exactly these (and TensorBoard event files), nothing else
RUN_FILES = (
    CHECKPOINT,
    PREV_CHECKPOINT,
    BROKEN_CHECKPOINT,
    "log.jsonl",
    "best.safetensors",
    "best.json",
    "model.safetensors",
    "model.json",
    "entropy_table.json",
)
#: config keys a resumed run may change: they apply from the resume step on (and are recorded);
#: a change of any other key is refused, since the checkpoint was trained with the old value
RESUMABLE_KEYS = frozenset(
    f"train.{k}"
    for k in (
        "iterations",
        "lr",
        "betas",
        "weight_decay",
        "lr_step",
        "lr_gamma",
        "grad_clip",
        "val_every",
        "checkpoint_every",
        "log_every",
        "num_workers",
        "val_tile",
        "max_nonfinite",
        "amp",
        "channels_last",
        "tensorboard",
    )
)
#: those of :data:`RESUMABLE_KEYS` the restored optimizer/scheduler state would otherwise override
OPTIMIZER_KEYS = frozenset(
    f"train.{k}" for k in ("lr", "betas", "weight_decay", "lr_step", "lr_gamma")
)


# ------------------------------------------------------------------ the run folder and resuming
def earlier_run(run_dir: Path) -> list[str]:
    """The files an earlier run left in ``run_dir`` (``config.yaml`` alone is not a run)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if any((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    return found


def clear_run(run_dir: Path) -> None:
    """Remove the files of :data:`RUN_FILES` and TensorBoard event files; nothing else."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    events = run_dir / "tensorboard"
    for f in events.glob("events.out.tfevents.*"):
        f.unlink()
    with contextlib.suppress(OSError):
        events.rmdir()  # only if nothing else is in it


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; an empty mapping counts as unset (left out)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recorded_config(run_dir: Path, info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config a run was trained with: the checkpoint's copy, else the run's config.yaml
    (None when neither is readable; then only the checkpoint's tensors are checked)."""
    raw = info["extra"].get("config")
    if raw is None:
        try:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
    try:
        return config_to_dict(from_dict(ExperimentConfig, raw or {}))
    except ConfigError:
        return None


def _show(value: Any) -> str:
    return json.dumps(value) if value is not None else "unset"


def resume_changes(
    cfg: ExperimentConfig, info: Mapping[str, Any]
) -> tuple[str | None, dict[str, tuple[Any, Any]]]:
    """``(problem, changes)`` of resuming the run of ``info`` with ``cfg``: every key whose
    value differs from the run's (``{key: (run's, now)}``) and, if one of them is not in
    :data:`RESUMABLE_KEYS`, the one-line refusal."""
    run_dir = cfg.run_dir
    old = _recorded_config(run_dir, info)
    if old is None:
        return None, {}
    before, now = _flatten(old), _flatten(config_to_dict(cfg))
    keys = [*before, *(k for k in now if k not in before)]
    changes = {
        k: (before.get(k), now.get(k))
        for k in keys
        if k not in ("name", "output_root") and before.get(k) != now.get(k)
    }
    fixed = [k for k in changes if k not in RESUMABLE_KEYS]
    if not fixed:
        return None, changes
    shown = "; ".join(
        f"{k}: {_show(changes[k][0])} in the run, {_show(changes[k][1])} now" for k in fixed[:3]
    )
    more = f" (and {len(fixed) - 3} more)" if len(fixed) > 3 else ""
    problem = (
        f"{run_dir}: cannot resume with a different {shown}{more}; the checkpoint was trained "
        f"with the run's values. Resume with the run's config ({run_dir / 'config.yaml'}), or "
        "start a new run under another name or with --overwrite (overwrite=True)"
    )
    return problem, changes


def claim_run_dir(
    cfg: ExperimentConfig, resume: bool, overwrite: bool, info: Mapping[str, Any] | None
) -> tuple[str | None, dict[str, tuple[Any, Any]], list[str]]:
    """Check (rank 0, before anything is written) that the run may use its folder, and create
    it. Returns ``(problem, config changes of a resume, files of an earlier run)``."""
    run_dir = cfg.run_dir
    if info is not None:
        problem, changes = resume_changes(cfg, info)
        return problem, changes, []
    earlier = earlier_run(run_dir)
    if earlier and not (resume or overwrite):
        return (
            f"{run_dir} already holds a run ({', '.join(earlier)}); continue it with --resume "
            "(resume=True) or replace it with --overwrite (overwrite=True)",
            {},
            earlier,
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (
            f"output_root {cfg.output_root}: cannot create the run folder {run_dir} "
            f"({exc.strerror or exc})",
            {},
            earlier,
        )
    return None, {}, earlier


def apply_optimizer_settings(
    opt: torch.optim.Optimizer,
    sched: Any,
    fresh: list[dict[str, Any]],
    tc: Any,
    start: int,
) -> None:
    """Give the restored optimizer (and StepLR) the hyperparameters of the current config, as if
    they had been in force from step 0: each group gets the learning rate, betas and weight decay
    it was built with (``fresh``), the rate decayed by the ``start // lr_step`` StepLR periods
    already done."""
    decay = tc.lr_gamma ** (start // tc.lr_step) if sched is not None else 1.0
    for group, new in zip(opt.param_groups, fresh, strict=True):
        group["betas"], group["weight_decay"] = new["betas"], new["weight_decay"]
        group["lr"] = new["lr"] * decay
        if sched is not None:
            group["initial_lr"] = new["lr"]
    if sched is not None:
        sched.step_size, sched.gamma = tc.lr_step, tc.lr_gamma
        sched.base_lrs = [new["lr"] for new in fresh]
        sched.last_epoch = start
        sched._last_lr = [group["lr"] for group in opt.param_groups]


# --------------------------------------------------------------------- non-finite losses
def keep_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the file system allows)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def settle_checkpoints(run_dir: Path, broken: bool) -> tuple[int | None, int | None]:
    """After the stop on non-finite losses (rank 0): leave in ``checkpoint.safetensors`` the
    newest checkpoint whose weights give finite outputs, or none. A broken newest checkpoint is
    moved to :data:`BROKEN_CHECKPOINT` (so ``--resume`` cannot pick it) and the previous one,
    kept until the newest was known to be good, takes its place.

    Returns:
        ``(step of the checkpoint left, step of the one moved aside)``, each None if there is none.
    """
    ckpt, prev = run_dir / CHECKPOINT, run_dir / PREV_CHECKPOINT
    moved = None
    if broken and ckpt.exists():
        moved = int(peek_training_state(ckpt)["step"])
        os.replace(ckpt, run_dir / BROKEN_CHECKPOINT)
        if prev.exists():
            os.replace(prev, ckpt)
    else:
        prev.unlink(missing_ok=True)
    good = int(peek_training_state(ckpt)["step"]) if ckpt.exists() else None
    return good, moved


def nonfinite_message(
    cfg: ExperimentConfig, count: int, step: int, good: int | None, moved: int | None
) -> str:
    """The one-line stop message: which checkpoint to resume, or that there is none."""
    ckpt = cfg.run_dir / CHECKPOINT
    lower = f"{cfg.train.lr / 10:.3g}"
    head = f"{cfg.name}: loss was not finite in {count} steps (last at step {step}); stopped."
    aside = ""
    if moved is not None:
        aside = (
            f" (the checkpoint of step {moved}, written after the update that broke the weights, "
            f"is now {BROKEN_CHECKPOINT})"
        )
    if good is not None:
        return (
            f"{head} {ckpt} holds step {good}, the last checkpoint whose weights give finite "
            f"outputs{aside}; resume it with a lower learning rate (--resume --set "
            f"train.lr={lower}; resume=True in Python) or check the data."
        )
    why = (
        "none with finite outputs exists"
        if moved is not None
        else f"none was written yet (train.checkpoint_every={cfg.train.checkpoint_every})"
    )
    return (
        f"{head} There is no checkpoint to resume: {why}{aside}; start over with a lower learning "
        f"rate (--overwrite --set train.lr={lower}; overwrite=True in Python) or check the data."
    )
