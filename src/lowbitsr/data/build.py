"""Build a dataset from a config mapping (the ``data.train`` / ``data.val`` YAML sections)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .bundled import BundledDataset
from .datasets import BenchmarkDataset, DIV2KDataset, ImageFolderDataset, PairedImageDataset

__all__ = ["DATASET_TYPES", "build_dataset"]

#: Config ``type`` -> dataset class. The class's keyword arguments (minus ``scale`` and ``mode``,
#: which come from the experiment) are the keys a spec of that type may use.
DATASET_TYPES: dict[str, type[PairedImageDataset]] = {
    "bundled": BundledDataset,
    "div2k": DIV2KDataset,
    "benchmark": BenchmarkDataset,
    "folder": ImageFolderDataset,
}

_FROM_CALLER = ("self", "scale", "mode")


def _spec_params(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k not in _FROM_CALLER}


def build_dataset(spec: Mapping[str, Any], scale: int, mode: str) -> PairedImageDataset:
    """Create the dataset described by ``spec``.

    Examples of specs::

        {"type": "bundled", "split": "train", "lr_patch": 32, "repeat": 100}
        {"type": "div2k", "root": "data/DIV2K", "index_range": [1, 800]}
        {"type": "benchmark", "root": "data/benchmark", "name": "Set5"}
        {"type": "folder", "root": "my_photos", "recursive": True}

    The keys allowed for a type are the keyword arguments of its class in
    :data:`DATASET_TYPES` other than ``scale`` and ``mode``.

    Args:
        spec: mapping with a ``type`` key and that type's options.
        scale: upscaling factor of the experiment.
        mode: ``"train"`` (random crops) or ``"eval"`` (whole images).

    Returns:
        The dataset; items as described in :mod:`lowbitsr.data.datasets`.

    Raises:
        ConfigError: missing/unknown ``type``, unknown or missing key, or a bad value.
        DatasetError: the data cannot be found (raised by the dataset class).
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"dataset spec must be a mapping like {{type: bundled, split: train}}, got {spec!r}"
        )
    valid_types = ", ".join(DATASET_TYPES)
    if "type" not in spec:
        raise ConfigError(
            f"dataset spec {dict(spec)!r} has no 'type' key; use one of {valid_types}"
        )
    kind = spec["type"]
    cls = DATASET_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(f"unknown dataset type {kind!r}; use one of {valid_types}")
    params = _spec_params(cls)
    options = {k: v for k, v in spec.items() if k != "type"}
    unknown = [k for k in options if k not in params]
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} for dataset type {kind!r}; "
            f"valid keys: type, {', '.join(params)}"
        )
    missing = [
        k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options
    ]
    if missing:
        raise ConfigError(
            f"dataset type {kind!r} needs key(s) {', '.join(map(repr, missing))}; "
            f"valid keys: type, {', '.join(params)}"
        )
    for key, value in options.items():
        annotation = params[key].annotation
        if annotation == "bool" and not isinstance(value, bool):
            raise ConfigError(f"dataset key {key}={value!r} must be true or false")
        if key == "root":
            if not isinstance(value, str | os.PathLike):
                raise ConfigError(f"dataset key root={value!r} must be a folder path (a string)")
            options[key] = Path(value)
    return cls(scale=scale, mode=mode, **options)
