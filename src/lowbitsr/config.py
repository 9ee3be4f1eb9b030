"""Experiment configuration: frozen dataclasses, YAML loading and dotted overrides.

One YAML file describes one experiment, with fixed top-level sections (BasicSR-like)::

    name: edsr_tiny_x4_fp          # run name; outputs go to <output_root>/<name>
    seed: 0
    model: {name: edsr_tiny, scale: 4, overrides: {}, init: null}
    data:
      train: {type: bundled, split: train, lr_patch: 32, repeat: 64}
      val:   {type: bundled, split: valid}
    train: {iterations: 2000, batch_size: 16, lr: 2.0e-4, ...}
    quant: null                    # or a method section, e.g. {method: ddtb, bits: 2}

Every key is checked when the file is loaded: an unknown key or a value of the wrong type raises
:class:`~lowbitsr.errors.ConfigError` naming the dotted key, so a typo never silently falls back to
a default. ``dataset`` and ``quant`` sections are free-form mappings here and are validated by the
code that consumes them (:func:`lowbitsr.data.build_dataset`,
:func:`lowbitsr.quant.config_from_dict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "from_dict",
    "load_config",
    "save_config",
]


def _require(key: str, value: Any, ok: bool, want: str) -> None:
    """Raise :class:`ConfigError` naming the dotted ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}': must be {want}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which float architecture to build and where its starting weights come from.

    Attributes:
        name: a registered model name (see :func:`lowbitsr.list_models`).
        scale: upscaling factor (2, 3 or 4 where the architecture allows it).
        overrides: constructor overrides, e.g. ``{n_resblocks: 4, n_feats: 32}``.
        init: optional path to float weights loaded before training (any format
            :func:`lowbitsr.load_weights` reads), or a pretrained name (``pretrained:NAME``).
    """

    name: str = "edsr_tiny"
    scale: int = 4
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None

    def __post_init__(self) -> None:
        _require("model.scale", self.scale, self.scale >= 1, "a positive integer")


@dataclass(frozen=True)
class DataConfig:
    """Training and validation dataset specs (see :func:`lowbitsr.data.build_dataset`)."""

    train: dict[str, Any] = field(
        default_factory=lambda: {"type": "bundled", "split": "train", "lr_patch": 32}
    )
    val: dict[str, Any] | None = field(
        default_factory=lambda: {"type": "bundled", "split": "valid"}
    )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule (iteration based).

    Attributes:
        iterations: total optimizer steps.
        batch_size: samples per step (global batch).
        lr: Adam learning rate for the network weights.
        betas: Adam betas.
        weight_decay: Adam weight decay.
        lr_step: StepLR period in iterations (0 = constant learning rate).
        lr_gamma: StepLR decay factor.
        val_every: validate every N iterations (0 = only at the end).
        checkpoint_every: write a resumable checkpoint every N iterations.
        log_every: update the progress bar's loss every N iterations.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_tile: tile size (LR pixels) used for validation inference (0 = whole image).
        grad_clip: clip the gradient norm to this value (0 = off).
        max_nonfinite: a step whose loss is NaN/inf is skipped; after this many such steps
            the run stops with a message (the last good checkpoint is kept).
        amp: ``"none"`` (float32) or ``"bf16"``: the forward and loss run under
            ``torch.autocast(dtype=bfloat16)`` (meant for GPUs; weights, optimizer state,
            quantizer bounds and checkpoints stay float32). On CPUs with AMX (bf16 matrix
            units) this is about 4x faster than float32 for EDSR-style convs, together with
            ``channels_last``.
        channels_last: keep the model and batches in ``torch.channels_last`` memory format
            during training (faster convolutions on CPUs; validation is unaffected).
        tensorboard: also write TensorBoard scalars to ``<run_dir>/tensorboard`` (losses,
            learning rate, validation PSNR/SSIM, quantizer bounds, gate outputs, FAB); needs
            ``pip install "lowbitsr[tensorboard]"``.
    """

    iterations: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_step: int = 0
    lr_gamma: float = 0.5
    val_every: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    val_tile: int = 0
    grad_clip: float = 0.0
    max_nonfinite: int = 10
    amp: str = "none"
    channels_last: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        """Refuse values that would make the run meaningless (e.g. ``iterations: -5`` trains
        nothing and still writes a model) or crash it later (``checkpoint_every: 0``)."""
        for key in ("iterations", "batch_size", "checkpoint_every", "log_every", "max_nonfinite"):
            v = getattr(self, key)
            _require(f"train.{key}", v, v >= 1, "a positive integer")
        for key in ("lr_step", "val_every", "num_workers", "val_tile"):
            v = getattr(self, key)
            _require(f"train.{key}", v, v >= 0, "an integer >= 0 (0 = off)")
        for key in ("lr", "lr_gamma"):
            v = getattr(self, key)
            _require(f"train.{key}", v, math.isfinite(v) and v > 0, "a positive number")
        for key in ("weight_decay", "grad_clip"):
            v = getattr(self, key)
            _require(f"train.{key}", v, math.isfinite(v) and v >= 0, "a number >= 0")
        ok = all(0 <= b < 1 for b in self.betas)  # False for NaN too
        _require("train.betas", list(self.betas), ok, "two numbers in [0, 1)")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: model, data, training schedule and (optionally) quantization."""

    name: str = "experiment"
    seed: int = 0
    output_root: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """Directory that holds this run's checkpoints, logs and final weights."""
        return Path(self.output_root) / self.name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples, ints become floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise ConfigError(
                f"config key '{key}': expected a list of {len(args)} values, got {value!r}"
            )
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept what is clearly a number
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, validating every key and type.

    Raises:
        ConfigError: for an unknown key (the message lists the valid keys) or a value of the
            wrong type (the message names the dotted key).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict (YAML-safe) view of a config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place.

    Example: ``["train.iterations=100", "model.scale=2", "quant.bits=3"]``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = _parse_scalar(text)
    return data


#: sections a config *file* must have (``load_config(None, ...)`` starts from defaults)
REQUIRED_SECTIONS = ("model", "data")
SECTION_WHAT = {
    "model": "model to train (model: {name: ..., scale: ...})",
    "data": "data to train on (data: {train: {...}, val: {...}})",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or start from defaults when ``path`` is None), apply overrides.

    A file must have the ``model:`` and ``data:`` sections (an empty file or one without them
    would silently train the default model on the default data); other keys default.

    Raises:
        ConfigError: missing/empty/unparsable file, missing section, unknown key, wrong type or
            out-of-range value (file and key named).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            raise ConfigError(
                f"{p}: the config file is empty; an experiment needs at least "
                f"{' and '.join(f'{s}:' for s in REQUIRED_SECTIONS)} sections (see configs/)"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    apply_overrides(data, overrides)
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    missing = [s for s in REQUIRED_SECTIONS if s not in data]
    if path is not None and missing:
        # defaults exist for library use, but a file that forgets a section must not train on them
        raise ConfigError(
            f"{path}: no '{missing[0]}:' section; a config file must say which "
            f"{SECTION_WHAT[missing[0]]} (see configs/ for examples)"
        )
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (round-trips through :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
