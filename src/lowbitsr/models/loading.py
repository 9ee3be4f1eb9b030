"""Reading, canonicalising, loading and saving model weights (including foreign checkpoints).

Accepted files:

* ``.safetensors`` (read with :mod:`safetensors`; never executes anything);
* ``.pt``, ``.pth``, ``.pth.tar``, ``.ckpt``: read with ``torch.load(..., weights_only=True)``,
  which only rebuilds tensors and plain containers. A pickle that asks for any other Python object
  (the classic ``__reduce__`` code-execution trick, but also pickled ``nn.Module`` objects or numpy
  scalars) is refused with :class:`~lowbitsr.errors.CheckpointError` *before* anything in it runs.

Foreign layouts handled by :func:`load_weights`, in this order:

1. :func:`canonicalize_state_dict`: unwrap ``params_ema`` / ``params`` / ``state_dict`` / ``model``
   / ``net`` / ``generator`` wrappers (BasicSR, DDTB ``.pth.tar``, Lightning-style files) and strip
   ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes;
2. BasicSR EDSR key names (detected by ``conv_first.weight`` + ``conv_after_body.weight``) are
   renamed by :func:`~lowbitsr.models.edsr.edsr_keys_from_basicsr`, which also supplies the mean
   shift BasicSR does not save;
3. the model's own ``adapt_state_dict(sd) -> sd`` hook, if the top module defines one (a
   quantization transform uses it to remap its authors' checkpoint keys);
4. a strict key and shape check that fails with one readable line before anything is copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..fileio import atomic_write
from .edsr import edsr_keys_from_basicsr, is_basicsr_edsr

__all__ = ["canonicalize_state_dict", "load_weights", "read_state_dict", "save_weights"]

_TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"
# Checked in this order, so an EMA copy wins over the raw weights when a file has both.
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net", "generator")
_PREFIXES = ("module.", "_orig_mod.")
# Phrases torch's weights-only unpickler uses when a pickle asks for a non-allowlisted object.
_UNSAFE_MARKERS = (
    "Unsupported global",
    "is blocked",
    "unrecognized function",
    "Can only create new object",
    "must be imported to load",
)


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = str(exc)
    # torch wraps the real reason in a long generic paragraph about weights_only
    text = text.split("WeightsUnpickler error:", 1)[-1]
    text = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch colours parts of its messages
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # protocol-version chatter from the weights-only reader; the outcome is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if any(marker in message for marker in _UNSAFE_MARKERS):
            found = re.search(r"GLOBAL (\S+)", message)
            what = f" (it asks for {found.group(1)})" if found else ""
        elif "Unsupported operand" in message:
            # Pickle opcodes the weights-only reader does not accept: either garbage bytes or a
            # pickle written by something other than torch.save; refusing is right for both.
            what = (
                " (it uses pickle instructions a weights-only load does not accept, or is corrupt)"
            )
        else:
            what = None
        if what is not None:
            raise CheckpointError(
                f"{path}: not a plain tensor checkpoint{what}; refused for safety and nothing in "
                "it was executed. If you trust its source, re-save only its state_dict (or as "
                ".safetensors) and load that."
            ) from None
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({_first_line(exc)}); re-download or "
            "re-save it"
        ) from None
    except Exception as exc:  # zip/EOF/OS errors all mean the same thing to the user
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({_first_line(exc)}); re-download or "
            "re-save it"
        ) from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, header JSON errors, ...
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({_first_line(exc)}); re-download or "
            "re-save it"
        ) from None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat, canonical ``{key: tensor}`` dict on the CPU.

    Args:
        path: a ``.safetensors``, ``.pt``, ``.pth``, ``.pth.tar`` or ``.ckpt`` file.
    Returns:
        The state dict after :func:`canonicalize_state_dict` (dtypes as stored).
    Raises:
        CheckpointError: the file is missing, has an unknown extension, is corrupt or truncated,
            is an unsafe pickle (refused without executing it), or holds no tensors.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint file not found; check the path")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a checkpoint file; give the weights file")
    name = p.name.lower()
    if name.endswith(_SAFETENSORS_SUFFIX):
        obj: Any = _read_safetensors(p)
    elif name.endswith(_TORCH_SUFFIXES):
        obj = _read_torch(p)
    else:
        raise CheckpointError(
            f"{p}: unknown checkpoint extension; use one of "
            f"{', '.join((_SAFETENSORS_SUFFIX, *_TORCH_SUFFIXES))}"
        )
    state = canonicalize_state_dict(obj) if isinstance(obj, Mapping) else {}
    if not state:
        raise CheckpointError(
            f"{p}: contains no named tensors (found {type(obj).__name__}); expected a model "
            "state dict"
        )
    return state


def _has_tensor(obj: Mapping[Any, Any]) -> bool:
    return any(
        isinstance(v, Tensor) or (isinstance(v, Mapping) and _has_tensor(v)) for v in obj.values()
    )


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    # torch.compile on a submodule puts the marker in the middle of the key
    return key.replace("._orig_mod.", ".")


def canonicalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Unwrap and normalise a state dict saved by another training framework.

    Descends into nested wrappers (``params_ema`` preferred over ``params``, then
    ``state_dict``, ``model``, ``net``, ``generator``; the first one holding tensors wins), strips
    ``module.`` and ``_orig_mod.`` prefixes, turns parameters into plain detached tensors and drops
    non-tensor entries (epoch counters, optimizer state left at the same level, ...).

    Args:
        state_dict: a mapping as returned by ``torch.load`` or ``safetensors``.
    Returns:
        A new flat ``{key: tensor}`` dict (may be empty if nothing tensor-valued was found).
    Raises:
        CheckpointError: two keys collapse to the same name after stripping prefixes.
    """
    obj: Mapping[Any, Any] = state_dict
    while True:
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _has_tensor(inner):
                obj = inner
                break
        else:
            break
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        name = _strip_prefixes(str(key))
        if name in out:
            raise CheckpointError(
                f"state dict has two entries for {name!r} once 'module.'/'_orig_mod.' prefixes "
                "are stripped; save the weights of a single model"
            )
        out[name] = value.detach()
    return out


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "model_config", None)
    if isinstance(cfg, Mapping) and "name" in cfg:
        return f"{cfg['name']} x{cfg.get('scale', '?')}"
    return type(model).__name__


def _shape(t: Tensor | torch.Size) -> str:
    return "(" + ",".join(str(s) for s in t) + ")"


def _mismatch_report(
    model: nn.Module, state: Mapping[str, Tensor], strict: bool
) -> list[str] | None:
    own = model.state_dict()
    # BatchNorm fills a missing counter itself (files from PyTorch < 0.4.1 lack it).
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    parts: list[str] = []
    if strict and missing:
        parts.append(f"{len(missing)} missing keys e.g. {missing[0]!r}")
    if strict and unexpected:
        parts.append(f"{len(unexpected)} unexpected e.g. {unexpected[0]!r}")
    if mismatched:
        k = mismatched[0]
        n = len(mismatched)
        head = "shape mismatch" if n == 1 else f"{n} shape mismatches e.g."
        parts.append(f"{head} {k!r} file {_shape(state[k].shape)} vs model {_shape(own[k].shape)}")
    return parts or None


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load a checkpoint file into ``model`` in place and return ``model``.

    Steps: :func:`read_state_dict` (which canonicalises), BasicSR-EDSR renaming when detected,
    ``model.adapt_state_dict(sd)`` when the model defines it, then a key/shape check and
    ``model.load_state_dict``. Nothing is copied unless the whole check passes.

    Args:
        model: the target module (e.g. from :func:`~lowbitsr.models.create_model`).
        path: any file :func:`read_state_dict` accepts.
        strict: if True (default) every model key must be present and no extra key allowed;
            if False, missing and unexpected keys are ignored. Shape mismatches always fail.
    Returns:
        ``model`` (same object), with its training/eval mode unchanged.
    Raises:
        CheckpointError: unreadable file, one that does not match the architecture, or one whose
            mean shift was built for another ``rgb_range`` than the model's.
    """
    state = read_state_dict(path)
    note = ""
    if is_basicsr_edsr(state):
        state = edsr_keys_from_basicsr(state, rgb_range=float(getattr(model, "rgb_range", 255.0)))
        note = ", read as a BasicSR EDSR file"
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state = adapt(state)
    problems = _mismatch_report(model, state, strict)
    if problems:
        raise CheckpointError(
            f"{path}: does not match {_describe(model)} ({'; '.join(problems)}{note}) — was it "
            "saved for another architecture or scale?"
        )
    range_problem = _mean_shift_range_mismatch(model, state)
    if range_problem:
        raise CheckpointError(f"{path}: {range_problem}")
    model.load_state_dict(state, strict=strict)
    return model


def _mean_shift_range_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """Catch a file whose mean shift was built for another ``rgb_range`` than the model's.

    Loading it would silently make the model expect a different input range than its
    ``rgb_range`` says (e.g. EDSR-PyTorch files, built for 255, into a model with rgb_range 1).
    A uniform per-channel ratio other than 1 is that case; a non-uniform one is a different mean
    (e.g. a BasicSR file's own ``mean``) and is accepted.
    """
    key = "sub_mean.bias"
    model_range = getattr(model, "rgb_range", None)
    own = model.state_dict().get(key) if model_range is not None else None
    theirs = state.get(key)
    if own is None or theirs is None or own.shape != theirs.shape or not bool((own != 0).all()):
        return None
    ratio = theirs.detach().float().cpu() / own.detach().float().cpu()
    if torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3) and not torch.allclose(
        ratio, torch.ones_like(ratio), rtol=1e-3
    ):
        file_range = float(ratio.mean()) * float(model_range)
        return (
            f"its mean shift was built for rgb_range {file_range:g} but the model has rgb_range "
            f"{float(model_range):g}; create the model with rgb_range={file_range:g}"
        )
    return None


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file (atomically).

    Tensors are detached, moved to the CPU, made contiguous and cloned (safetensors refuses tensors
    that share storage, e.g. tied weights, and views). When the model carries ``model_config`` it
    is stored as JSON in the file's metadata under ``"lowbitsr.model_config"``.

    Args:
        model: any module.
        path: destination ending in ``.safetensors``; parent folders are created.
    Returns:
        The written path.
    Raises:
        CheckpointError: the path does not end in ``.safetensors``.
    """
    p = Path(path)
    if not p.name.lower().endswith(_SAFETENSORS_SUFFIX):
        raise CheckpointError(
            f"{p}: save_weights writes safetensors; give the file a .safetensors extension"
        )
    state = model.state_dict()
    extra = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if extra:
        raise TypeError(
            f"save_weights stores tensors only; {extra[0]!r} is {type(state[extra[0]])}"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt"}
    cfg = getattr(model, "model_config", None)
    if isinstance(cfg, Mapping):
        # a non-JSON override only loses this convenience copy, not the weights
        with contextlib.suppress(TypeError, ValueError):
            metadata["lowbitsr.model_config"] = json.dumps(dict(cfg), sort_keys=True)
    atomic_write(p, lambda t: save_file(tensors, str(t), metadata=metadata))
    return p
