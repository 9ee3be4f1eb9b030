"""Iteration-based training loop for float SR models and (through a recipe) quantization-aware
training, with validation on a held-out split, atomic resumable checkpoints and progress bars.

Run layout (``<output_root>/<name>/``)::

    config.yaml              the full experiment config
    checkpoint.safetensors   last resumable state (model, optimizer, scheduler, RNG, step,
                             the config it was trained with)
    checkpoint.prev.*        the checkpoint before it, kept only until the newest one's weights
                             have given a finite loss
    checkpoint.nonfinite.*   a newest checkpoint whose weights gave non-finite outputs, moved
                             aside by the stop on non-finite losses (never resumed)
    best.safetensors/.json   weights with the best validation PSNR (a loadable saved model)
    model.safetensors/.json  final weights (a loadable saved model; == best when validating)
    log.jsonl                one JSON line per validation / logging / resume event

An existing run is never replaced silently: ``train`` refuses a folder holding one unless told
to continue it (``resume``) or replace it (``overwrite``, which removes :data:`RUN_FILES` only).

Determinism: sample ``p`` of the run (``p = step·batch + i``) always gets the same image and the
same crop/augmentation, whatever happened before, so a resumed run sees exactly the data of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import (
    atomic_write,
    load_training_state,
    peek_training_state,
    save_model,
    save_training_state,
)
from .config import ExperimentConfig, config_to_dict, from_dict, save_config
from .errors import ConfigError, LowbitsrError
from .recipe import FloatRecipe, Recipe

__all__ = [
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "FloatRecipe",
    "Recipe",
    "ResumableSampler",
    "TrainResult",
    "build_model",
    "check_model_config",
    "train",
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


def check_model_config(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` naming ``model.name`` / ``model.scale`` when the registry has
    no such model or it does not support the scale (a ``pretrained:`` init brings its own)."""
    from .models import list_models, supported_scales

    m = cfg.model
    if m.init and m.init.startswith("pretrained:"):
        return  # build_model checks the pretrained model's scale
    names = list_models()
    if m.name not in names:
        raise ConfigError(
            f"config key 'model.name': unknown model {m.name!r}; available: {', '.join(names)}"
        )
    scales = supported_scales(m.name)
    if m.scale not in scales:
        raise ConfigError(
            f"config key 'model.scale': {m.name} does not support scale {m.scale}; "
            f"allowed: {', '.join(map(str, scales))}"
        )


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The float model of ``cfg.model`` with its ``init`` weights loaded (if any).

    Raises:
        ConfigError: unknown model name, unsupported scale or override (the key named).
    """
    from .models import create_model, load_weights
    from .pretrained import load_pretrained

    m = cfg.model
    init = m.init
    if init and init.startswith("pretrained:"):
        model = load_pretrained(init.split(":", 1)[1])
        if model.model_config.get("scale") != m.scale:
            raise LowbitsrError(f"model.init {init} is for another scale than {m.scale}")
        return model.train()
    check_model_config(cfg)
    try:
        model = create_model(m.name, scale=m.scale, **m.overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'model.overrides': {exc}") from None
    if init:
        from .checkpoint import model_paths

        # a run folder (or saved-model stem) means its model.safetensors
        weights = model_paths(init)[0] if Path(init).is_dir() else init
        load_weights(model, weights)
    return model


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


# ------------------------------------------------------------------ the run folder and resuming
def _earlier_run(run_dir: Path) -> list[str]:
    """The files an earlier run left in ``run_dir`` (``config.yaml`` alone is not a run)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if any((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    return found


def _clear_run(run_dir: Path) -> None:
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


def _resume_changes(
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


def _claim_run_dir(
    cfg: ExperimentConfig, resume: bool, overwrite: bool, info: Mapping[str, Any] | None
) -> tuple[str | None, dict[str, tuple[Any, Any]], list[str]]:
    """Check (rank 0, before anything is written) that the run may use its folder, and create
    it. Returns ``(problem, config changes of a resume, files of an earlier run)``."""
    run_dir = cfg.run_dir
    if info is not None:
        problem, changes = _resume_changes(cfg, info)
        return problem, changes, []
    earlier = _earlier_run(run_dir)
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


def _apply_optimizer_settings(
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
def _keep_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the file system allows)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _outputs_finite(model: nn.Module, lr: torch.Tensor, amp: str, device: torch.device) -> bool:
    """Whether ``model``'s parameters are finite and it gives finite outputs on ``lr`` (eval
    mode; buffers are not checked directly, some hold infinities by design)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(amp, device):
            out = model(lr)
    except Exception:  # a model that cannot run on a training batch: the parameters decide
        return True
    finally:
        model.train(was_training)
    out = out[0] if isinstance(out, tuple | list) else out
    return bool(torch.isfinite(out).all())


def _settle_checkpoints(run_dir: Path, broken: bool) -> tuple[int | None, int | None]:
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


def _nonfinite_message(
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


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
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

    Nothing is written before the model, the data, the run folder and (on resume) the checkpoint
    are known to fit: a refused run leaves no trace.

    Args:
        cfg: the experiment; ``cfg.quant`` selects a quantization recipe, None = float training.
        resume: continue from ``<run_dir>/checkpoint.safetensors``. The config may differ from
            the run's only in :data:`RESUMABLE_KEYS`; those apply from the resume step on
            (learning rate, betas, weight decay and StepLR as if used from step 0) and are
            recorded in ``config.yaml`` and as a ``resume`` event in ``log.jsonl``. Any other
            difference is refused. Without a checkpoint the run starts over (said on stderr).
        overwrite: replace the earlier run in the folder (its :data:`RUN_FILES`; other files are
            kept). Without ``resume`` or ``overwrite``, a folder holding a run is refused.
        device: torch device for model and batches (``cuda`` means ``cuda:LOCAL_RANK`` under
            torchrun).
        progress: show a tqdm progress bar (rate, ETA, loss) on rank 0.
        recipe: override the recipe chosen from ``cfg`` (for tests and custom methods).
        stop_after: stop (with a checkpoint) after this many steps of *this* call — used to
            test resumption; the run can be continued with ``resume=True``.
        max_nonfinite: overrides ``train.max_nonfinite``: a non-finite loss (on any rank) skips
            the step on every rank; after this many such steps the run stops with
            :class:`LowbitsrError`, leaving as ``checkpoint.safetensors`` the newest checkpoint
            whose weights give finite outputs (or none), and saying which.
    Returns:
        :class:`TrainResult`.
    Raises:
        ConfigError: an unknown model, an unsupported scale, a bad recipe section.
        LowbitsrError: the folder holds a run (neither ``resume`` nor ``overwrite``), a resume
            with other settings, an unwritable ``output_root``, the stop on non-finite losses.
        CheckpointError: the checkpoint does not match the configured model.
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
    run_dir = cfg.run_dir
    tc = cfg.train
    if resume and overwrite:
        raise LowbitsrError(
            f"{run_dir}: resume and overwrite exclude each other; --resume (resume=True) "
            "continues the run, --overwrite (overwrite=True) replaces it"
        )
    torch.manual_seed(cfg.seed)
    limit = tc.max_nonfinite if max_nonfinite is None else max_nonfinite
    _autocast(tc.amp, device)  # validate the option before any work
    scale = cfg.model.scale
    check_model_config(cfg)
    recipe = recipe or _recipe_for(cfg)

    train_set: Dataset = build_dataset({"seed": cfg.seed, **cfg.data.train}, scale, "train")
    val_set = build_dataset(cfg.data.val, scale, "eval") if cfg.data.val else None

    ckpt = run_dir / CHECKPOINT
    prev = run_dir / PREV_CHECKPOINT
    start = 0
    resuming = resume and ckpt.is_file()
    info = peek_training_state(ckpt) if resuming else None

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
    # the run folder: rank 0 decides (and creates it), every rank learns the verdict
    claim = _claim_run_dir(cfg, resume, overwrite, info) if main else None
    problem, changes, earlier = broadcast_object(claim)
    if problem:
        raise LowbitsrError(problem)
    if main and not resuming:
        if earlier:  # overwrite=True, or resume=True without a checkpoint to resume
            if resume:
                print(
                    f"lowbitsr: note: {run_dir} has no checkpoint to resume; starting over "
                    f"(replacing {', '.join(earlier)})",
                    file=sys.stderr,
                )
            _clear_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    if main:
        for stale in run_dir.glob(".*.tmp"):  # a temp file of a write that a kill interrupted
            stale.unlink()

    resume_state = info["extra"].get("recipe", {}) if info is not None else None
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
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    best = -math.inf
    history: list[dict[str, Any]] = []
    if resuming:
        st = load_training_state(ckpt, model=model, optimizer=opt, scheduler=sched)
        start = st["step"]
        best = st["extra"].get("best_psnr", -math.inf)
        if any(k in OPTIMIZER_KEYS for k in changes):
            _apply_optimizer_settings(opt, sched, fresh, tc, start)
        if main:  # the record says what runs from here on
            save_config(cfg, run_dir / "config.yaml")
            event: dict[str, Any] = {"step": start, "event": "resume"}
            if changes:
                event["changed"] = {k: list(v) for k, v in changes.items()}
            _log(run_dir, event)
    if ctx.enabled and ctx.rank > 0:
        # ranks draw their own random numbers (e.g. Gumbel noise) from rank-specific streams
        torch.manual_seed(cfg.seed + 7919 * ctx.rank + start)
    stepper: Any = model
    if ctx.enabled:
        stepper = DDPModel(model, device, recipe.ddp_find_unused_parameters)
    tb = _Scalars(run_dir, tc.tensorboard and main, start)
    # True while the newest checkpoint holds the current weights and no finite loss has come
    # from them yet; until one has, the checkpoint before it is kept as checkpoint.prev
    unverified = resuming

    def checkpoint(step: int) -> None:
        nonlocal unverified
        if main:
            if not unverified and ckpt.exists():
                _keep_copy(ckpt, prev)
            save_training_state(
                ckpt,
                model=model,
                optimizer=opt,
                scheduler=sched,
                step=step,
                extra={"best_psnr": best, "recipe": recipe.state(), "config": config_to_dict(cfg)},
            )
        unverified = True

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
        if main:
            prev.unlink(missing_ok=True)
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
                # the weights are those of the newest checkpoint if it is unverified
                broken = unverified and any_true(
                    not _outputs_finite(model, batch["lr"], tc.amp, device), device
                )
                message = None
                if main:
                    good, moved = _settle_checkpoints(run_dir, broken)
                    message = _nonfinite_message(cfg, nonfinite, step, good, moved)
                raise LowbitsrError(broadcast_object(message))
            step += 1  # skip this batch: the data stream stays aligned with the step count
            continue
        if unverified:  # the newest checkpoint's weights gave a finite loss: it is a good one
            unverified = False
            if main:
                prev.unlink(missing_ok=True)
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
