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
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..checkpoint import (
    load_training_state,
    peek_training_state,
    save_model,
    save_training_state,
)
from ..config import ExperimentConfig, config_to_dict, save_config
from ..errors import ConfigError, LowbitsrError
from ..recipe import FloatRecipe, Recipe
from .rundir import (
    CHECKPOINT,
    OPTIMIZER_KEYS,
    PREV_CHECKPOINT,
    RESUMABLE_KEYS,
    RUN_FILES,
    apply_optimizer_settings,
    claim_run_dir,
    clear_run,
    keep_copy,
    nonfinite_message,
    settle_checkpoints,
)

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
    from ..models import list_models, supported_scales

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
    from ..models import create_model, load_weights
    from ..pretrained import load_pretrained

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
        from ..checkpoint import model_paths

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
    from ..quant import recipe_for

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


# --------------------------------------------------------------------- non-finite losses
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


class _Run:
    """One call of :func:`train`, in named steps (run in this order by :func:`train`):

    1. :meth:`__init__` (setup): options checked, the recipe chosen, the datasets built and the
       resume checkpoint peeked at; nothing is written yet;
    2. :meth:`claim_folder`: rank 0 claims (or refuses) the run folder, every rank learns why;
    3. :meth:`prepare_model`: the recipe prepares (e.g. quantizes and calibrates) the model;
    4. :meth:`make_optimizer`: Adam and the optional StepLR;
    5. :meth:`restore`: on resume, the checkpoint's state and the resume event;
    6. :meth:`distribute`: per-rank RNG streams, the DDP wrapper, TensorBoard;
    7. :meth:`loop`: the training steps, with validation and checkpoints;
    8. :meth:`save_final` and :meth:`finish`.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        resume: bool,
        overwrite: bool,
        device: str | torch.device,
        recipe: Recipe | None,
        max_nonfinite: int | None,
    ) -> None:
        from ..data import build_dataset
        from ..distributed import init_from_env, resolve_device

        self.ctx = init_from_env(device)  # joins torchrun's group if launched by it
        self.main = self.ctx.is_main
        self.device = resolve_device(device, self.ctx)
        self.cfg, self.tc, self.run_dir = cfg, cfg.train, cfg.run_dir
        self.resume, self.overwrite = resume, overwrite
        if resume and overwrite:
            raise LowbitsrError(
                f"{self.run_dir}: resume and overwrite exclude each other; --resume "
                "(resume=True) continues the run, --overwrite (overwrite=True) replaces it"
            )
        torch.manual_seed(cfg.seed)
        self.limit = self.tc.max_nonfinite if max_nonfinite is None else max_nonfinite
        _autocast(self.tc.amp, self.device)  # validate the option before any work
        self.scale = cfg.model.scale
        check_model_config(cfg)
        self.recipe = recipe or _recipe_for(cfg)

        self.train_set: Dataset = build_dataset(
            {"seed": cfg.seed, **cfg.data.train}, self.scale, "train"
        )
        self.val_set = build_dataset(cfg.data.val, self.scale, "eval") if cfg.data.val else None

        self.ckpt = self.run_dir / CHECKPOINT
        self.prev = self.run_dir / PREV_CHECKPOINT
        self.start = 0
        self.resuming = resume and self.ckpt.is_file()
        self.info = peek_training_state(self.ckpt) if self.resuming else None
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.best = -math.inf
        self.history: list[dict[str, Any]] = []
        self.last_val: float | None = None
        # True while the newest checkpoint holds the current weights and no finite loss has come
        # from them yet; until one has, the checkpoint before it is kept as checkpoint.prev
        self.unverified = self.resuming

    def loader(self, start_step: int, sharded: bool = True) -> Iterator[dict[str, Any]]:
        """The endless batch stream from global step ``start_step`` (this rank's share)."""
        from ..distributed import DistributedStepSampler

        tc = self.tc
        stream = ResumableSampler(len(self.train_set), self.cfg.seed, start_step * tc.batch_size)
        rank, world = (self.ctx.rank, self.ctx.world_size) if sharded else (0, 1)
        loader = DataLoader(
            self.train_set,
            batch_sampler=DistributedStepSampler(stream, tc.batch_size, rank, world),
            num_workers=tc.num_workers,
            persistent_workers=tc.num_workers > 0,
        )
        return iter(loader)

    def claim_folder(self) -> None:
        """Rank 0 decides (and creates) the run folder, every rank learns the verdict; a fresh
        run clears an earlier one it may replace and writes ``config.yaml``."""
        from ..distributed import broadcast_object

        cfg, run_dir, main = self.cfg, self.run_dir, self.main
        claim = claim_run_dir(cfg, self.resume, self.overwrite, self.info) if main else None
        problem, self.changes, earlier = broadcast_object(claim)
        if problem:
            raise LowbitsrError(problem)
        if main and not self.resuming:
            if earlier:  # overwrite=True, or resume=True without a checkpoint to resume
                if self.resume:
                    print(
                        f"lowbitsr: note: {run_dir} has no checkpoint to resume; starting over "
                        f"(replacing {', '.join(earlier)})",
                        file=sys.stderr,
                    )
                clear_run(run_dir)
            save_config(cfg, run_dir / "config.yaml")
        if main:
            for stale in run_dir.glob(".*.tmp"):  # a temp file of a write a kill interrupted
                stale.unlink()

    def prepare_model(self, model: nn.Module) -> None:
        """The recipe's model (calibrated on rank 0 and broadcast in a distributed job), on the
        device in training mode, identical on every rank."""
        from ..distributed import (
            assert_same_state,
            broadcast_object,
            broadcast_state,
            convert_sync_batchnorm,
        )

        recipe, main, ctx = self.recipe, self.main, self.ctx
        resume_state = self.info["extra"].get("recipe", {}) if self.info is not None else None
        # calibration batches come from their own (unsharded) stream so they never shift the
        # training data; in a distributed job only rank 0 calibrates and the others copy it
        calib = self.loader(10_000_000, sharded=False)
        if ctx.enabled and resume_state is None:
            if main:
                model = recipe.prepare(model, calib, None)
            state = broadcast_object(recipe.state() if main else None)
            if not main:
                model = recipe.prepare(model, calib, state)
        else:
            model = recipe.prepare(model, calib, resume_state)
        model = model.to(self.device).train()
        if self.tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if ctx.enabled:
            broadcast_state(model)
            assert_same_state(model, f"{self.cfg.name}: model after calibration")
            if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                model = convert_sync_batchnorm(model, self.device)
        self.model = model

    def make_optimizer(self) -> None:
        """Adam over the recipe's parameter groups and StepLR (when ``train.lr_step > 0``)."""
        tc = self.tc
        groups = self.recipe.param_groups(self.model)
        self.opt = torch.optim.Adam(groups, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.sched = (
            torch.optim.lr_scheduler.StepLR(self.opt, step_size=tc.lr_step, gamma=tc.lr_gamma)
            if tc.lr_step > 0
            else None
        )
        self.fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]

    def restore(self) -> None:
        """On resume: the checkpoint's model/optimizer/scheduler state, the changed optimizer
        settings, and (rank 0) the updated ``config.yaml`` and the ``resume`` event."""
        if not self.resuming:
            return
        st = load_training_state(
            self.ckpt, model=self.model, optimizer=self.opt, scheduler=self.sched
        )
        self.start = st["step"]
        self.best = st["extra"].get("best_psnr", -math.inf)
        if any(k in OPTIMIZER_KEYS for k in self.changes):
            apply_optimizer_settings(self.opt, self.sched, self.fresh, self.tc, self.start)
        if self.main:  # the record says what runs from here on
            save_config(self.cfg, self.run_dir / "config.yaml")
            event: dict[str, Any] = {"step": self.start, "event": "resume"}
            if self.changes:
                event["changed"] = {k: list(v) for k, v in self.changes.items()}
            _log(self.run_dir, event)

    def distribute(self) -> None:
        """Rank-specific random streams, the model the steps run (DDP in a distributed job) and
        the TensorBoard writer."""
        from ..distributed import DDPModel

        ctx = self.ctx
        if ctx.enabled and ctx.rank > 0:
            # ranks draw their own random numbers (e.g. Gumbel noise) from rank-specific streams
            torch.manual_seed(self.cfg.seed + 7919 * ctx.rank + self.start)
        self.stepper: Any = self.model
        if ctx.enabled:
            self.stepper = DDPModel(self.model, self.device, self.recipe.ddp_find_unused_parameters)
        self.tb = _Scalars(self.run_dir, self.tc.tensorboard and self.main, self.start)

    def checkpoint(self, step: int) -> None:
        """Write the resumable checkpoint (rank 0), keeping the previous one while unverified."""
        if self.main:
            if not self.unverified and self.ckpt.exists():
                keep_copy(self.ckpt, self.prev)
            save_training_state(
                self.ckpt,
                model=self.model,
                optimizer=self.opt,
                scheduler=self.sched,
                step=step,
                extra={
                    "best_psnr": self.best,
                    "recipe": self.recipe.state(),
                    "config": config_to_dict(self.cfg),
                },
            )
        self.unverified = True

    def validate(self, step: int) -> float | None:
        """Validation PSNR at ``step`` (None without a validation split); keeps the best model."""
        from ..evaluate import evaluate

        if self.val_set is None:
            return None
        res = evaluate(
            self.model,
            self.val_set,
            self.scale,
            tile=self.tc.val_tile,
            device=self.device,
            progress=False,
        )
        rec = {"step": step, "val_psnr": res.psnr, "val_ssim": res.ssim}
        self.history.append(rec)
        self.tb.add("val", {"psnr": res.psnr, "ssim": res.ssim, "fab": res.fab}, step)
        if self.main:
            _log(self.run_dir, rec)
        if res.psnr > self.best and self.recipe.selectable(step):
            self.best = res.psnr
            if self.main:
                save_model(
                    self.model, self.run_dir / "best", quant=self.recipe.quant_dict(), meta=rec
                )
        return res.psnr

    def _batch(self, data: Iterator[dict[str, Any]]) -> dict[str, Any]:
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in next(data).items()}
        if self.tc.channels_last:
            batch = {
                k: (v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) else v)
                for k, v in batch.items()
            }
        return batch

    def _stop_nonfinite(self, batch: dict[str, Any], count: int, step: int) -> LowbitsrError:
        """The stop on non-finite losses: settle the checkpoints, return the error to raise."""
        from ..distributed import any_true, broadcast_object

        self.bar.close()
        self.tb.close()
        # the weights are those of the newest checkpoint if it is unverified
        broken = self.unverified and any_true(
            not _outputs_finite(self.model, batch["lr"], self.tc.amp, self.device), self.device
        )
        message = None
        if self.main:
            good, moved = settle_checkpoints(self.run_dir, broken)
            message = nonfinite_message(self.cfg, count, step, good, moved)
        return LowbitsrError(broadcast_object(message))

    def _log_step(self, logs: dict[str, float], step: int) -> None:
        from ..distributed import mean_across_ranks

        logs = mean_across_ranks(logs, self.device)
        post = {k: f"{v:.3g}" for k, v in logs.items()}
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.2f}"
        self.bar.set_postfix(post)
        lr_now = self.opt.param_groups[0]["lr"]
        if self.main:
            _log(self.run_dir, {"step": step, **logs, "lr": lr_now})
        self.tb.add("train", {**logs, "lr": lr_now}, step)
        if self.tb.writer is not None:
            from ..quant.apply import quant_scalars

            self.tb.add("quant", quant_scalars(self.model), step)

    def loop(
        self, progress: bool, stop_after: int | None, on_step: Callable[[int], None] | None
    ) -> tuple[int, bool]:
        """Train from :attr:`start` to ``train.iterations`` (or ``stop_after`` steps).

        Returns:
            ``(step reached, whether stop_after ended it)``.
        Raises:
            LowbitsrError: the stop on non-finite losses.
        """
        from ..distributed import any_true

        tc, recipe, device, opt = self.tc, self.recipe, self.device, self.opt
        data = self.loader(self.start)
        self.bar = tqdm(
            total=tc.iterations,
            initial=self.start,
            desc=self.cfg.name,
            disable=not (progress and self.main),
            dynamic_ncols=True,
        )
        nonfinite = 0
        step = self.start
        self.t0 = time.time()
        while step < tc.iterations:
            batch = self._batch(data)
            with _autocast(tc.amp, device):
                loss, logs = recipe.loss(self.stepper, batch, step)
            opt.zero_grad(set_to_none=True)
            if any_true(not bool(torch.isfinite(loss)), device):
                nonfinite += 1
                if self.main:
                    event = {"step": step, "event": "nonfinite_loss", "count": nonfinite}
                    _log(self.run_dir, event)
                if nonfinite >= self.limit:
                    raise self._stop_nonfinite(batch, nonfinite, step)
                step += 1  # skip this batch: the data stream stays aligned with the step count
                continue
            if self.unverified:  # the newest checkpoint's weights gave a finite loss: a good one
                self.unverified = False
                if self.main:
                    self.prev.unlink(missing_ok=True)
            loss.backward()
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            opt.step()
            if self.sched is not None:
                self.sched.step()
            step += 1
            self.bar.update(1)
            if step % tc.log_every == 0 or step == tc.iterations:
                self._log_step(logs, step)
            if on_step is not None:
                on_step(step)
            if tc.val_every > 0 and step % tc.val_every == 0 and step < tc.iterations:
                self.last_val = self.validate(step)
            if step % tc.checkpoint_every == 0 or step == tc.iterations:
                self.checkpoint(step)
            if stop_after is not None and step - self.start >= stop_after:
                self.checkpoint(step)
                return step, True
        return step, False

    def save_final(self, step: int) -> None:
        """Write ``model.safetensors/.json`` (rank 0): the validation-selected weights when a
        validation split exists, else the last ones."""
        if not self.main:
            return
        meta = {
            "step": step,
            "seconds": round(time.time() - self.t0, 1),
            "config": config_to_dict(self.cfg),
            "best_val_psnr": self.best if self.best > -math.inf else None,
            "processes": self.ctx.world_size,
        }
        quant = self.recipe.quant_dict()
        if self.val_set is not None and (self.run_dir / "best.safetensors").exists():
            from ..checkpoint import load_model

            best_model = load_model(self.run_dir / "best")
            save_model(best_model, self.run_dir / "model", quant=quant, meta=meta)
        else:
            save_model(self.model, self.run_dir / "model", quant=quant, meta=meta)

    def finish(self, step: int) -> TrainResult:
        """Close the progress bar and TensorBoard, drop the kept previous checkpoint, wait for
        every rank; the result."""
        from ..distributed import barrier

        self.bar.close()
        self.tb.close()
        if self.main:
            self.prev.unlink(missing_ok=True)
        barrier()
        best = self.best if self.best > -math.inf else None
        return TrainResult(self.run_dir, step, best, self.history, self.model)


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
    run = _Run(
        cfg,
        resume=resume,
        overwrite=overwrite,
        device=device,
        recipe=recipe,
        max_nonfinite=max_nonfinite,
    )
    model = build_model(cfg).to(run.device)
    run.claim_folder()
    run.prepare_model(model)
    run.make_optimizer()
    run.restore()
    run.distribute()
    step, stopped = run.loop(progress, stop_after, on_step)
    if not stopped:
        run.validate(step)
        run.save_final(step)
    return run.finish(step)
