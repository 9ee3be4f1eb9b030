"""Saved models and resumable training state.

A *saved model* is two files side by side::

    <stem>.safetensors   the state dict (float32 tensors, CPU)
    <stem>.json          {"format": "lowbitsr-model", "version": 1, "model": {...model_config},
                          "quant": {...} | null, "meta": {...}}

:func:`load_model` rebuilds the architecture from the JSON (``create_model(**model)``, then the
quantization transform when ``quant`` is set) and loads the weights, so any run loads back with
one call. A *training checkpoint* is a single safetensors file whose string metadata carries the
JSON state (step, scheduler, best metric, ...); it is written to a temporary file and renamed, so a
crash never leaves a partial checkpoint behind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .fileio import atomic_write, model_paths

__all__ = [
    "atomic_write",
    "load_model",
    "load_training_state",
    "model_paths",
    "peek_training_state",
    "save_model",
    "save_training_state",
    "state_mismatch",
]

FORMAT = "lowbitsr-model"
VERSION = 1


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone() breaks storage sharing (safetensors refuses shared tensors) and moves to CPU
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_model(
    model: nn.Module,
    path: str | Path,
    *,
    quant: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` (weights + JSON config) so :func:`load_model` can rebuild it.

    Args:
        model: a model from :func:`lowbitsr.create_model` (it carries ``model_config``), possibly
            quantized (then pass the quantization config dict as ``quant``).
        path: a folder (writes ``model.safetensors``/``model.json`` in it) or a stem/file path.
        quant: plain-dict quantization config, or None for a float model.
        meta: extra JSON-able information (training step, metrics, the command that made it).
    Returns:
        The path of the weights file.
    """
    cfg = getattr(model, "model_config", None)
    if cfg is None:
        raise CheckpointError(
            "save_model: the model has no model_config; build it with lowbitsr.create_model"
        )
    if quant is None:
        quant = getattr(model, "quant_config_dict", None)
    weights, config = model_paths(path)
    state = _plain_state(model)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": dict(cfg),
        "quant": dict(quant) if quant is not None else None,
        "meta": dict(meta or {}),
    }
    atomic_write(weights, lambda t: save_file(state, str(t), metadata={"format": FORMAT}))
    atomic_write(config, lambda t: t.write_text(json.dumps(header, indent=2)))
    return weights


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model saved by :func:`save_model` (or a training run's folder).

    Args:
        path: the run folder, the ``.safetensors`` or ``.json`` file, or their common stem.
    Returns:
        The model in eval mode, on ``map_location``.
    Raises:
        CheckpointError: a file is missing, unreadable or does not describe a lowbitsr model.
    """
    from .models import create_model, load_weights

    weights, config = model_paths(path)
    if not config.is_file():
        raise CheckpointError(
            f"{config}: model config not found (a saved model is <name>.safetensors + <name>.json)"
        )
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found beside {config.name}")
    try:
        header = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "model" not in header:
        raise CheckpointError(f"{config}: not a lowbitsr model config (format != {FORMAT!r})")
    try:
        model = create_model(**header["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config}: cannot build the model it describes ({exc})") from None
    if header.get("quant"):
        from .quant import config_from_dict, quantize

        model = quantize(model, config_from_dict(header["quant"]), inplace=True)
    load_weights(model, weights)
    return model.to(map_location).eval()


def state_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], shown: int = 3
) -> str:
    """One line saying how the state dict ``found`` (e.g. a checkpoint's) differs from
    ``expected`` (a model's): missing and unexpected keys, shapes that differ ("" if none)."""

    def few(items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {list(found[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing from the checkpoint ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the model lacks ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (checkpoint vs model: {few(shapes)})")
    return "; ".join(parts)


def _flatten_optimizer(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in info["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": info["param_groups"]}


def save_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one resumable checkpoint file atomically (model, optimizer, scheduler, RNG, step).

    ``extra`` must be JSON-able (best validation PSNR, quantizer calibration flags, ...).
    """
    tensors = {f"model.{k}": v for k, v in _plain_state(model).items()}
    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    info = {
        "step": step,
        "optimizer": opt_info,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": dict(extra or {}),
    }
    meta = {"format": "lowbitsr-train-state", "state": json.dumps(info)}
    atomic_write(path, lambda t: save_file(tensors, str(t), metadata=meta))


def peek_training_state(path: str | Path) -> dict[str, Any]:
    """The JSON part of a training checkpoint (``step``, ``extra``, ...) without its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable lowbitsr training checkpoint ({exc})"
        ) from None


def load_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_training_state`; returns ``{step, extra}``."""
    path = Path(path)
    info = peek_training_state(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable lowbitsr training checkpoint ({exc})"
        ) from None
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        detail = state_mismatch(model.state_dict(), model_state) or " ".join(str(exc).split())
        raise CheckpointError(
            f"{path}: checkpoint does not match the configured {type(model).__name__}: {detail}; "
            "resume with the config the run was started with"
        ) from None
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: the optimizer state does not match the configured model's parameters "
            f"({' '.join(str(exc).split())}); resume with the config the run was started with"
        ) from None
    if scheduler is not None and info["scheduler"] is not None:
        scheduler.load_state_dict(info["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return {"step": int(info["step"]), "extra": info["extra"]}
