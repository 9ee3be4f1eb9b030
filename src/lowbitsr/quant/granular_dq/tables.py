"""The entropy table: E2B thresholds and the ATC quantile curve from the training LR patches
(docs/methods.md §2.2), computed, saved beside a model and loaded (ours or the released
``E2B.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from ..gdq_layers import (
    interp_quantile_curve,
    patch_entropy,
)

ENTROPY_TABLE_FORMAT = "lowbitsr-entropy-table"


@dataclass(frozen=True)
class EntropyTable:
    """Quantiles of the E2B entropy over the training LR patches (docs/methods.md §2.2).

    Attributes:
        curve: entropy quantiles (nats) at the levels ``linspace(0, 1, len(curve))``.
        t1, t2: the quantile levels of the two thresholds (0.5, 0.9).
        patch: LR patch side used (0 = patches of mixed sizes, e.g. imported tables).
        n_patches: how many patches the curve was computed from.
        official: entropy measured the released way (top-left square).
    """

    curve: tuple[float, ...]
    t1: float = 0.5
    t2: float = 0.9
    patch: int = 48
    n_patches: int = 0
    official: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def thresholds(self) -> tuple[float, float]:
        """``(H_t1, H_t2)``: the curve at ``t1`` and ``t2``."""
        c = torch.tensor(self.curve, dtype=torch.float64)
        h = interp_quantile_curve(c, torch.tensor([self.t1, self.t2], dtype=torch.float64))
        return (float(h[0]), float(h[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``format`` tag, thresholds included for readers)."""
        h1, h2 = self.thresholds
        return {
            "format": ENTROPY_TABLE_FORMAT,
            "version": 1,
            "t1": self.t1,
            "t2": self.t2,
            "H_t1": h1,
            "H_t2": h2,
            "patch": self.patch,
            "n_patches": self.n_patches,
            "official": self.official,
            "levels": "linspace(0, 1, len(curve))",
            "curve": list(self.curve),
            "meta": dict(self.meta),
        }


def _lr_images(data: Any) -> Iterator[Tensor]:
    """Yield ``[3, H, W]`` float LR images (``[0, 255]``) from any accepted ``data`` form."""
    if hasattr(data, "load_pair") and hasattr(data, "pairs"):
        # A lowbitsr dataset: every whole LR image once (not the random training crops).
        for i in range(len(data.pairs)):
            lr, _ = data.load_pair(i)
            yield torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float()
        return
    if isinstance(data, Tensor):
        data = [data]
    for item in data:
        t = item["lr"] if isinstance(item, Mapping) else item
        t = torch.as_tensor(t)
        if t.dim() == 3:
            yield t.float()
        elif t.dim() == 4:
            yield from (img.float() for img in t)
        else:
            raise ValueError(
                f"entropy table: expected LR images [3, H, W] or batches [B, 3, H, W], got "
                f"shape {tuple(t.shape)}"
            )


def _tile_patches(img: Tensor, patch: int) -> Tensor:
    """Non-overlapping ``patch x patch`` tiles of ``[3, H, W]`` (remainder dropped); an image
    smaller than ``patch`` on a side counts as one patch."""
    _, h, w = img.shape
    if h < patch or w < patch:
        return img[None]
    nh, nw = h // patch, w // patch
    t = img[:, : nh * patch, : nw * patch].reshape(3, nh, patch, nw, patch)
    return t.permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, patch, patch)


def compute_entropy_table(
    data: Any,
    patch: int = 48,
    t1: float = 0.5,
    t2: float = 0.9,
    *,
    max_patches: int | None = None,
    curve_points: int = 201,
    official: bool = False,
    chunk: int = 256,
) -> EntropyTable:
    """Entropy quantile curve of all non-overlapping LR patches of the training data (§2.2).

    Args:
        data: a lowbitsr dataset (its whole LR images are used, e.g.
            ``BundledDataset("train", 4)`` or a DIV2K dataset), or an iterable of LR images
            ``[3, H, W]`` / batches ``[B, 3, H, W]`` / dicts with an ``"lr"`` entry (a training
            batch stream). Values RGB in ``[0, 255]``.
        patch: LR patch side (48 = the training crop).
        t1, t2: quantile levels of the two thresholds.
        max_patches: stop after this many patches (None = all).
        curve_points: resolution of the stored quantile curve.
        official: measure entropy the released way (top-left square).
        chunk: patches per entropy evaluation (memory: ``chunk * patch^2 * 32`` floats).

    Returns:
        :class:`EntropyTable`; ``table.thresholds`` is ``(H_t1, H_t2)``.
    """
    if not 0.0 <= t1 <= t2 <= 1.0:
        raise ValueError(f"need 0 <= t1 <= t2 <= 1, got t1={t1}, t2={t2}")
    entropies: list[Tensor] = []
    pending: list[Tensor] = []
    n = 0

    def flush() -> None:
        while pending:
            batch = pending.pop()
            for i in range(0, batch.shape[0], chunk):
                entropies.append(patch_entropy(batch[i : i + chunk], official=official).double())

    for img in _lr_images(data):
        patches = _tile_patches(img, patch)
        if max_patches is not None:
            patches = patches[: max(0, max_patches - n)]
        pending.append(patches)
        n += patches.shape[0]
        flush()
        if max_patches is not None and n >= max_patches:
            break
    if n == 0:
        raise ValueError("compute_entropy_table: the data held no LR patches")
    h = torch.cat(entropies)
    levels = torch.linspace(0, 1, curve_points, dtype=torch.float64)
    curve = torch.quantile(h, levels) if h.numel() <= 2**24 else _big_quantile(h, levels)
    return EntropyTable(
        tuple(float(v) for v in curve), t1, t2, patch, int(h.numel()), official=official
    )


def _big_quantile(h: Tensor, levels: Tensor) -> Tensor:
    s, _ = torch.sort(h)
    pos = levels * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return torch.lerp(s[lo], s[hi], pos - lo.double())


def build_entropy_table(
    data: Any, patch: int = 48, t1: float = 0.5, t2: float = 0.9, **kwargs: Any
) -> tuple[float, float]:
    """E2B thresholds ``(H_t1, H_t2)`` from the training LR patches (docs/methods.md §2.2).

    The ``t1``/``t2`` quantiles of :func:`patch_entropy` over every non-overlapping
    ``patch x patch`` tile of the training LR images. ``kwargs`` go to
    :func:`compute_entropy_table`, which returns the whole quantile curve (what ATC and
    :func:`save_entropy_table` need).
    """
    return compute_entropy_table(data, patch, t1, t2, **kwargs).thresholds


def entropy_table_path(checkpoint: str | Path) -> Path:
    """Where the entropy table of a saved model lives: ``<stem>.entropy.json`` beside it."""
    from ...fileio import model_paths

    weights, _ = model_paths(checkpoint)
    return weights.with_suffix(".entropy.json")


def save_entropy_table(table: EntropyTable, path: str | Path) -> Path:
    """Write ``table`` as JSON (atomically). ``path`` may be a checkpoint: then it goes to
    :func:`entropy_table_path` beside it."""
    from ...fileio import atomic_write

    p = Path(path)
    if p.suffix != ".json":
        p = entropy_table_path(p)
    text = json.dumps(table.to_dict(), indent=2)
    atomic_write(p, lambda t: t.write_text(text))
    return p


def load_entropy_table(path: str | Path, curve_points: int = 201) -> EntropyTable:
    """Read a table written by :func:`save_entropy_table`, or the released ``E2B.json``.

    The released file maps a percentage level (``"0.5"`` ... ``"99.5"``) to an entropy; it is
    resampled onto our uniform grid (levels outside its range take its end values).
    A checkpoint path (or run folder) reads the table beside it.
    """
    p = Path(path)
    if p.suffix != ".json":
        p = entropy_table_path(p)
    data = json.loads(p.read_text())
    if isinstance(data, dict) and data.get("format") == ENTROPY_TABLE_FORMAT:
        return EntropyTable(
            tuple(float(v) for v in data["curve"]),
            float(data.get("t1", 0.5)),
            float(data.get("t2", 0.9)),
            int(data.get("patch", 0)),
            int(data.get("n_patches", 0)),
            official=bool(data.get("official", False)),
            meta=dict(data.get("meta", {})),
        )
    try:
        pairs = sorted((float(k) / 100.0, float(v)) for k, v in data.items())
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(
            f"{p}: not an entropy table (neither lowbitsr's format nor the released "
            "'percent -> entropy' E2B.json)"
        ) from None
    levels = np.linspace(0, 1, curve_points)
    xs, ys = zip(*pairs, strict=True)
    curve = np.interp(levels, xs, ys)
    meta = {"from": str(p)}
    return EntropyTable(tuple(float(v) for v in curve), patch=0, official=True, meta=meta)
