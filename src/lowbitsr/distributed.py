"""Multi-process training and evaluation on PyTorch's own engine (``torch.distributed``).

Launch any ``lowbitsr`` command with ``torchrun --nproc_per_node=N -m lowbitsr ...``: torchrun
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``, :func:`init_from_env` joins the
process group (``nccl`` when training on CUDA, ``gloo`` on CPU) and the training loop, the
calibration and the evaluation adapt:

- **Data**: ``train.batch_size`` is the *global* batch. Step ``s`` consumes the global sample
  positions ``[s·B, (s+1)·B)`` of the run's deterministic stream; rank ``r`` takes the contiguous
  slice ``[r·B/N, (r+1)·B/N)`` (:class:`DistributedStepSampler`). The union over ranks is exactly
  the single-process batch, so one DDP step equals one single-process step on the same global
  batch, and resuming stays exact.
- **Calibration** (DDTB dynamic intensity and bounds, PAMS ``alpha``, Granular-DQ's entropy table
  and LSQ init) runs once, on rank 0, on the same batches a single process would use; its summary
  is broadcast, the other ranks rebuild the same module structure (e.g. which layers carry a
  gate), every parameter and buffer is broadcast from rank 0 and then checked to be bit-identical
  on every rank (:func:`assert_same_state`).
- **BatchNorm** becomes synchronised (:func:`convert_sync_batchnorm`): PyTorch's
  :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`SyncBatchNorm2d` (same statistics, computed
  with differentiable all-reduces) on CPU, where PyTorch's own does not run.
- **Rank 0** alone writes logs, TensorBoard events and checkpoints and shows progress bars;
  the non-finite-loss decision is agreed by all ranks so a NaN on one rank never hangs the others.
- **Evaluation** is sharded by image (rank ``r`` evaluates images ``r, r+N, ...``) and the
  per-image rows are gathered in dataset order, so the merged metrics equal single-process ones.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from .errors import LowbitsrError

__all__ = [
    "DistContext",
    "DistributedStepSampler",
    "SyncBatchNorm2d",
    "all_gather_objects",
    "any_true",
    "assert_same_state",
    "barrier",
    "broadcast_object",
    "broadcast_state",
    "context",
    "convert_sync_batchnorm",
    "init_from_env",
    "mean_across_ranks",
    "resolve_device",
    "shard",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0


def context() -> DistContext:
    """The current job's :class:`DistContext` (single process unless a group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
    )


def init_from_env(device: str | torch.device = "cpu") -> DistContext:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        device: the device the command was asked to use; ``cuda`` selects the ``nccl`` backend
            and pins this process to ``cuda:LOCAL_RANK``; anything else uses ``gloo``.
    Returns:
        The :class:`DistContext` (single process when ``WORLD_SIZE`` is unset or 1).
    Raises:
        LowbitsrError: the environment is incomplete or the backend is unavailable.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    if not dist.is_available():
        raise LowbitsrError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LowbitsrError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node=N -m lowbitsr ...`"
        )
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise LowbitsrError("--device cuda was asked for but no CUDA device is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return context()


def resolve_device(device: str | torch.device, ctx: DistContext) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed job; other devices are unchanged."""
    d = torch.device(device)
    if d.type == "cuda" and ctx.enabled and d.index is None:
        return torch.device("cuda", ctx.local_rank)
    return d


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if context().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if not context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective: all ranks must call)."""
    if not context().enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(values: dict[str, float], device: str | torch.device = "cpu") -> dict:
    """Average each scalar over ranks (same keys on every rank; a collective)."""
    ctx = context()
    if not ctx.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _state_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t) for n, t in named if t is not None]


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer (persistent or not) with rank ``src``'s values.

    The receiving ranks then reload their own state dict so that modules re-derive whatever
    they compute on loading (e.g. Granular-DQ's "entropy curve set" and "LSQ initialised" flags).
    """
    ctx = context()
    if not ctx.enabled:
        return
    with torch.no_grad():
        for _, t in _state_tensors(model):
            dist.broadcast(t.data, src=src)
    if ctx.rank != src:
        model.load_state_dict(model.state_dict())


def _digest(model: nn.Module) -> dict[str, str]:
    out = {}
    for name, t in _state_tensors(model):
        data = t.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        out[name] = f"{tuple(data.shape)}:{data.dtype}:{h.hexdigest()}"
    return out


def assert_same_state(model: nn.Module, what: str = "model") -> None:
    """Check that every parameter and buffer is bit-identical on all ranks.

    Raises:
        LowbitsrError: naming the first tensor (and rank) that differs from rank 0.
    """
    ctx = context()
    if not ctx.enabled:
        return
    digests = all_gather_objects(_digest(model))
    ref = digests[0]
    for rank, d in enumerate(digests[1:], start=1):
        if d.keys() != ref.keys():
            diff = sorted(set(d) ^ set(ref))
            raise LowbitsrError(
                f"{what}: rank {rank} has a different structure than rank 0 (e.g. {diff[0]!r})"
            )
        for name in ref:
            if d[name] != ref[name]:
                raise LowbitsrError(f"{what}: {name!r} differs between rank 0 and rank {rank}")


class DistributedStepSampler(Sampler[list[int]]):
    """Batches of a global deterministic key stream, sharded contiguously over ranks.

    Args:
        stream: an (infinite) sampler of dataset keys, e.g.
            :class:`lowbitsr.training.ResumableSampler` started at ``step · batch_size``.
        batch_size: the *global* batch ``B``; must be divisible by ``world_size``.
        rank, world_size: this process's slot.
    Yields:
        Lists of ``B / world_size`` keys: rank ``r``'s slice ``[r·B/N, (r+1)·B/N)`` of each
        consecutive block of ``B`` keys of ``stream``.
    """

    def __init__(self, stream: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise LowbitsrError(
                f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                f"number of processes ({world_size})"
            )
        self.stream, self.batch_size = stream, batch_size
        self.per_rank = batch_size // world_size
        self.lo = rank * self.per_rank

    def __iter__(self):  # type: ignore[override]
        it = iter(self.stream)
        while True:
            block = [next(it) for _ in range(self.batch_size)]
            yield block[self.lo : self.lo + self.per_rank]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over the whole distributed batch.

    Works on every backend (PyTorch's :class:`torch.nn.SyncBatchNorm` needs CUDA): per-channel
    ``sum``, ``sum of squares`` and count are all-reduced with a differentiable all-reduce, so the
    normalisation and its gradient equal single-process BatchNorm on the concatenated batch.
    Running statistics use the unbiased variance, like :class:`torch.nn.BatchNorm2d`. In eval
    mode, or without a process group, it is plain BatchNorm2d.

    Input/output: N×C×H×W.
    """

    def forward(self, x: Tensor) -> Tensor:
        ctx = context()
        if not (self.training and ctx.enabled):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // c), device=x.device, dtype=torch.float64)
        stats = torch.cat([xf.sum((0, 2, 3)).double(), (xf * xf).sum((0, 2, 3)).double(), count])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, c, 1, 1)
        y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` (in place) by a synchronised one.

    CUDA uses :class:`torch.nn.SyncBatchNorm`; other devices :class:`SyncBatchNorm2d`. Weights,
    buffers and training flags are kept; state-dict keys are unchanged. Returns ``model``.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                new = SyncBatchNorm2d(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                    device=child.weight.device if child.affine else None,
                )
                new.load_state_dict(child.state_dict())
                new.train(child.training)
                setattr(parent, name, new)
            else:
                swap(child)

    swap(model)
    return model


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share ``indices[rank::world]`` (all of them in a single process)."""
    ctx = context()
    return list(indices)[ctx.rank :: ctx.world_size]


class _Entry(nn.Module):
    """One module whose ``forward`` can run any of the wrapped model's entry points, so that
    DistributedDataParallel sees (and synchronises) calls to ``forward_features`` too.

    It also returns the tensors that losses read from the model besides its output (DDTB gate
    logits ``last_logits``, used by the first-stage regulariser): DDP must see them among the
    outputs, or it would take the gates for unused parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, entry: str = "forward") -> tuple[Any, list[Tensor]]:
        out = getattr(self.inner, entry)(x)
        aux = [
            t
            for m in self.inner.modules()
            if isinstance(t := getattr(m, "last_logits", None), Tensor) and t.requires_grad
        ]
        return out, aux


class DDPModel:
    """What a training recipe sees in a distributed run: calls go through DDP; everything else
    (``modules()``, attributes such as ``last_bits``) reaches the wrapped model."""

    def __init__(
        self, model: nn.Module, device: torch.device, find_unused_parameters: bool = False
    ) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = model
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(
            _Entry(model), device_ids=ids, find_unused_parameters=find_unused_parameters
        )

    def __call__(self, x: Tensor) -> Any:
        return self.ddp(x, "forward")[0]

    def forward_features(self, x: Tensor) -> Any:
        """The wrapped model's ``forward_features`` through DDP."""
        return self.ddp(x, "forward_features")[0]

    def features(self, x: Tensor) -> Any:
        """The wrapped model's ``features`` through DDP."""
        return self.ddp(x, "features")[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)
