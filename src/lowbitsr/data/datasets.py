"""Paired (LR, HR) super-resolution datasets.

Every dataset here is a :class:`PairedImageDataset`: a list of :class:`ImagePair` (an HR file and
optionally its LR file) plus the common behaviour:

* ``mode="train"``: a random aligned crop of ``lr_patch`` x ``lr_patch`` LR pixels and the
  matching ``lr_patch * scale`` HR patch, then (``augment=True``) a random horizontal flip,
  vertical flip and transpose, each with probability 0.5, applied identically to both.
  ``len(ds) == n_images * repeat`` and index ``i`` uses image ``i % n_images``.
* ``mode="eval"``: whole images, the HR image cropped to exactly LR size × scale.

Items are ``{"lr": (3, h, w), "hr": (3, h * scale, w * scale), "name": str}``, both tensors
float32 holding integer values in ``[0, 255]``.

When a pair has no LR file, the LR image is made from the HR image with MATLAB-compatible
bicubic downsampling (:func:`lowbitsr.imresize.imresize`) after cropping the HR image to a
multiple of the scale, exactly how the benchmark LR images were made (docs/evaluation.md §2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError
from ..imresize import imresize
from .io import IMAGE_EXTENSIONS, read_image
from .transforms import augment_pair, crop_to_multiple, paired_random_crop

__all__ = [
    "BenchmarkDataset",
    "DIV2KDataset",
    "ImageFolderDataset",
    "ImagePair",
    "PairedImageDataset",
]

_MODES = ("train", "eval")


@dataclass(frozen=True)
class ImagePair:
    """One sample: its name, its HR file and its LR file (``None``: LR made from HR)."""

    name: str
    hr_path: Path
    lr_path: Path | None = None


def _check_int(value: Any, key: str, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools rejected), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"dataset option {key}={value!r} must be an integer >= {minimum}")
    return int(value)


class PairedImageDataset(Dataset):
    """Base class of all lowbitsr datasets: paired crops for training, whole images for eval.

    Reproducibility: the crop position and the flips of item ``index`` come from a fresh
    ``numpy.random.Generator`` seeded with ``SeedSequence([seed, epoch, index])``. The stream
    therefore depends only on the seed, the epoch and the index, not on which DataLoader worker
    (or how many workers) serve it, so training data is identical for ``num_workers=0`` and any
    number of workers, and workers never share a random stream. Call :meth:`set_epoch` at the
    start of every epoch (as with ``DistributedSampler``) so that each epoch sees new crops; the
    epoch lives in shared memory, so this also reaches persistent workers provided it is called
    before the epoch's ``iter(loader)``.

    Caching (``cache=True``): each decoded (LR, HR) pair is kept in memory after its first use.
    DataLoader workers are separate processes, so each fills its own cache.

    Args:
        pairs: the samples, in index order.
        scale: integer upscaling factor (>= 1).
        mode: ``"train"`` (random crops, augmentation, ``repeat``) or ``"eval"``.
        lr_patch: LR crop side in train mode (HR crop side is ``lr_patch * scale``).
        augment: random flips and transpose in train mode.
        repeat: train-mode length multiplier (ignored in eval mode).
        cache: keep decoded images in memory.
        seed: non-negative base seed of the per-item random streams.
        hr_multiple: for pairs without an LR file, the HR image is cropped to a multiple of
            this before downsampling (default ``scale``; must be a multiple of ``scale``).
        convert: passed to :func:`~lowbitsr.data.read_image` (accept greyscale / alpha /
            16-bit files by converting them).
    """

    def __init__(
        self,
        pairs: Sequence[ImagePair],
        scale: int,
        *,
        mode: str = "train",
        lr_patch: int = 48,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
        seed: int = 0,
        hr_multiple: int | None = None,
        convert: bool = False,
    ) -> None:
        self.scale = _check_int(scale, "scale", 1)
        if mode not in _MODES:
            raise ConfigError(f"dataset mode {mode!r} is not valid; use one of {', '.join(_MODES)}")
        self.mode = mode
        self.lr_patch = _check_int(lr_patch, "lr_patch", 1)
        self.repeat = _check_int(repeat, "repeat", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.hr_multiple = _check_int(
            self.scale if hr_multiple is None else hr_multiple, "hr_multiple", 1
        )
        if self.hr_multiple % self.scale:
            raise ConfigError(
                f"dataset option hr_multiple={self.hr_multiple} must be a multiple of "
                f"scale={self.scale}"
            )
        self.augment = bool(augment)
        self.cache = bool(cache)
        self.convert = bool(convert)
        self.pairs: tuple[ImagePair, ...] = tuple(pairs)
        if not self.pairs:
            raise DatasetError(f"{type(self).__name__}: no images to load")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Shared memory, so set_epoch() in the main process reaches (persistent) workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def names(self) -> list[str]:
        """Sample names, one per image (not repeated)."""
        return [p.name for p in self.pairs]

    @property
    def epoch(self) -> int:
        """The epoch mixed into the random streams (see :meth:`set_epoch`)."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops/flips of ``epoch`` (a non-negative int)."""
        self._epoch.fill_(_check_int(epoch, "epoch", 0))

    def __len__(self) -> int:
        n = len(self.pairs)
        return n * self.repeat if self.mode == "train" else n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.pairs)} images, scale={self.scale}, "
            f"mode={self.mode!r}, lr_patch={self.lr_patch}, repeat={self.repeat})"
        )

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The random generator of item ``index`` in ``epoch`` (default: the current epoch)."""
        e = self.epoch if epoch is None else epoch
        return np.random.default_rng(np.random.SeedSequence([self.seed, e, index]))

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded ``(lr, hr)`` uint8 arrays of image ``i`` (``0 <= i < len(pairs)``).

        Shapes ``h x w x 3`` and ``(h * scale) x (w * scale) x 3``; cached if ``cache``.
        """
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        pair = self.pairs[i]
        s = self.scale
        hr = read_image(pair.hr_path, convert=self.convert)
        if pair.lr_path is None:
            hr = crop_to_multiple(hr, self.hr_multiple)
            if hr.shape[0] == 0 or hr.shape[1] == 0:
                raise DatasetError(
                    f"{pair.hr_path}: image is smaller than {self.hr_multiple} pixels on a side, "
                    f"too small for scale {s}; remove it from the dataset"
                )
            lr = imresize(hr, output_shape=(hr.shape[0] // s, hr.shape[1] // s))
        else:
            lr = read_image(pair.lr_path, convert=self.convert)
            (h, w), (hh, hw) = lr.shape[:2], hr.shape[:2]
            # HR may exceed LR x scale only by what cropping to a multiple of scale removes.
            if not (h * s <= hh < (h + 1) * s and w * s <= hw < (w + 1) * s):
                raise DatasetError(
                    f"{pair.lr_path} is {w}x{h} but {pair.hr_path} is {hw}x{hh} (width x height); "
                    f"at scale {s} the HR image should be {w * s}x{h * s}; check the scale or "
                    "regenerate the LR images"
                )
        h, w = lr.shape[:2]
        if hr.shape[:2] != (h * s, w * s):
            hr = np.ascontiguousarray(hr[: h * s, : w * s])
        if self.cache:
            # Read-only, so no caller can silently alter later epochs' data.
            lr.flags.writeable = False
            hr.flags.writeable = False
            self._cache[i] = (lr, hr)
        return lr, hr

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``: ``{"lr": (3,h,w), "hr": (3,h*s,w*s), "name": str}``, float32 0..255."""
        length = len(self)
        if index < 0:
            index += length
        # In train mode a key >= len means "item key % len in a later epoch": a sampler can then
        # address any sample of an unbounded, resumable stream (see lowbitsr.train) without
        # mutating shared epoch state in the workers.
        epoch = self.epoch
        if self.mode == "train" and index >= length:
            epoch, index = epoch + index // length, index % length
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range for a dataset of length {length}")
        i = index % len(self.pairs)
        lr, hr = self.load_pair(i)
        if self.mode == "train":
            h, w = lr.shape[:2]
            p = self.lr_patch
            if h < p or w < p:
                pair = self.pairs[i]
                files = pair.hr_path if pair.lr_path is None else f"{pair.lr_path} ({pair.hr_path})"
                raise DatasetError(
                    f"{files}: LR image is {w}x{h} pixels but the training crop is {p}x{p} LR "
                    f"pixels ({p * self.scale}x{p * self.scale} HR); use a smaller lr_patch or "
                    "remove the image"
                )
            rng = self.rng(index, epoch)
            lr, hr = paired_random_crop(lr, hr, p, self.scale, rng)
            if self.augment:
                lr, hr = augment_pair(lr, hr, rng)
        return {"lr": _to_tensor(lr), "hr": _to_tensor(hr), "name": self.pairs[i].name}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 (any strides) -> contiguous float32 ``(3, H, W)``."""
    # The dtype change makes this a fresh writable copy, never a view of the cache.
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


def _is_image(path: Path) -> bool:
    # Hidden files include macOS "._name.png" resource forks, which are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted by relative path), skipping hidden files/folders."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in it:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        if _is_image(p) and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _require_dir(folder: Path, expected: str) -> None:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "folder not found"
        raise DatasetError(f"{folder}: {what}; expected {expected}")


_EXT_PATTERN = ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS)


class ImageFolderDataset(PairedImageDataset):
    """Any folder of HR images; LR images are made on the fly with MATLAB bicubic.

    Each HR image is cropped (bottom/right) to a multiple of ``hr_multiple`` (default: the
    scale) and downsampled with ``imresize(hr, 1 / scale)`` (antialiased, as the benchmarks).
    Suffixes ``.png .jpg .jpeg .bmp .tif .tiff .webp`` (any case) count as images; hidden files
    are skipped. Sample names are the paths relative to ``root`` without suffix (``sub/img``).

    Args:
        root: the folder.
        scale: upscaling factor.
        recursive: also take images from sub-folders.
        files: use exactly these files (paths relative to ``root`` or absolute) in this order
            instead of scanning the folder.
        mode, lr_patch, augment, repeat, cache, seed, hr_multiple, convert: see
            :class:`PairedImageDataset`.

    Raises:
        DatasetError: the folder is missing or holds no images, or a listed file is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        scale: int,
        *,
        mode: str = "train",
        recursive: bool = False,
        files: Sequence[str | os.PathLike[str]] | None = None,
        lr_patch: int = 48,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
        seed: int = 0,
        hr_multiple: int | None = None,
        convert: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        _require_dir(root, "a folder of HR images")
        if files is None:
            paths = _list_images(root, recursive)
            if not paths:
                where = " or its sub-folders" if recursive else ""
                raise DatasetError(
                    f"{root}: no images matching {_EXT_PATTERN} in this folder{where}; "
                    "expected a folder of HR images"
                    + ("" if recursive else " (pass recursive=True to search sub-folders)")
                )
        else:
            paths = [root / f for f in files]
            for p in paths:
                if not p.is_file():
                    raise DatasetError(f"{p}: image file not found in {root}; check the file list")
        self.root = root
        super().__init__(
            [ImagePair(_sample_name(p, root), p) for p in paths],
            scale,
            mode=mode,
            lr_patch=lr_patch,
            augment=augment,
            repeat=repeat,
            cache=cache,
            seed=seed,
            hr_multiple=hr_multiple,
            convert=convert,
        )


def _with_lr(name: str, hr_path: Path, lr_dir: Path, lr_name: str) -> ImagePair:
    """``hr_path`` paired with ``lr_dir/lr_name`` when the LR folder exists (then every HR image
    must have its LR image there), else with LR images made on the fly (DIV2K, benchmarks)."""
    lr_path = None
    if lr_dir.is_dir():
        lr_path = lr_dir / lr_name
        if not lr_path.is_file():
            raise DatasetError(
                f"{lr_path}: missing LR image for {hr_path.name}; complete {lr_dir} "
                "or delete it to make LR images on the fly"
            )
    return ImagePair(name, hr_path, lr_path)


def _sample_name(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    return rel.with_suffix("").as_posix()


_DIV2K_SPLITS: dict[str, tuple[int, int]] = {"train": (1, 800), "valid": (801, 900)}


class DIV2KDataset(PairedImageDataset):
    """DIV2K (Agustsson & Timofte 2017) with its official bicubic LR images.

    Layout (``root`` is the folder holding the ``DIV2K_*`` folders)::

        root/DIV2K_train_HR/0001.png ... 0800.png
        root/DIV2K_train_LR_bicubic/X4/0001x4.png ...
        root/DIV2K_valid_HR/0801.png ... 0900.png
        root/DIV2K_valid_LR_bicubic/X4/0801x4.png ...

    If the ``..._LR_bicubic/X{scale}`` folder is missing, LR images are made on the fly from
    the HR images with MATLAB-compatible bicubic (``imresize(hr, 1 / scale)`` after cropping HR
    to a multiple of the scale), which reproduces the official LR images.

    Args:
        root: DIV2K folder.
        scale: upscaling factor.
        split: ``"train"`` (images 1-800) or ``"valid"`` (801-900): which folders to read.
        index_range: inclusive ``(first, last)`` image numbers within the split, e.g.
            ``(1, 790)`` for training and ``(791, 800)`` (split ``"train"``) or ``(801, 810)``
            (split ``"valid"``) for validation. Default: the whole split.
        mode: default ``"train"`` for split ``"train"`` and ``"eval"`` for ``"valid"``.
        lr_patch, augment, repeat, cache, seed, convert: see :class:`PairedImageDataset`.

    Raises:
        ConfigError: unknown split or an index range outside it.
        DatasetError: missing folders or files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        scale: int,
        split: str = "train",
        index_range: Sequence[int] | None = None,
        *,
        mode: str | None = None,
        lr_patch: int = 48,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
        seed: int = 0,
        convert: bool = False,
    ) -> None:
        if split not in _DIV2K_SPLITS:
            raise ConfigError(
                f"DIV2K split {split!r} is not valid; use one of {', '.join(_DIV2K_SPLITS)}"
            )
        scale = _check_int(scale, "scale", 1)
        lo, hi = _DIV2K_SPLITS[split]
        first, last = (lo, hi) if index_range is None else _check_range(index_range)
        if not lo <= first <= last <= hi:
            raise ConfigError(
                f"DIV2K index_range ({first}, {last}) is outside split {split!r} "
                f"(images {lo}-{hi}); give lo <= first <= last <= hi"
                + ("; use split 'valid' for images 801-900" if split == "train" else "")
            )
        root = Path(root).expanduser()
        layout = f"the DIV2K layout {root}/DIV2K_{split}_HR/{lo:04d}.png"
        _require_dir(root, layout)
        hr_dir = root / f"DIV2K_{split}_HR"
        _require_dir(hr_dir, layout)
        if not any(hr_dir.glob("*.png")):
            raise DatasetError(
                f"{hr_dir}: no images matching *.png in this folder; expected {layout}"
            )
        lr_dir = root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
        pairs = []
        for n in range(first, last + 1):
            hr_path = hr_dir / f"{n:04d}.png"
            if not hr_path.is_file():
                raise DatasetError(
                    f"{hr_path}: missing DIV2K image {n} (index_range {first}-{last}); "
                    f"expected {layout}"
                )
            pairs.append(_with_lr(f"{n:04d}", hr_path, lr_dir, f"{n:04d}x{scale}.png"))
        self.root = root
        self.split = split
        self.index_range = (first, last)
        super().__init__(
            pairs,
            scale,
            mode=mode or ("train" if split == "train" else "eval"),
            lr_patch=lr_patch,
            augment=augment,
            repeat=repeat,
            cache=cache,
            seed=seed,
            convert=convert,
        )


def _check_range(index_range: Sequence[int]) -> tuple[int, int]:
    if isinstance(index_range, str | bytes) or len(index_range) != 2:
        raise ConfigError(
            f"DIV2K index_range={index_range!r} must be two integers [first, last], e.g. [1, 800]"
        )
    first = _check_int(index_range[0], "index_range[0]", 1)
    last = _check_int(index_range[1], "index_range[1]", 1)
    return first, last


class BenchmarkDataset(PairedImageDataset):
    """A benchmark set (Set5, Set14, B100, Urban100, Manga109, ...) in the EDSR-PyTorch layout.

    Layout (``root`` is the ``benchmark`` folder)::

        root/<name>/HR/baby.png
        root/<name>/LR_bicubic/X4/babyx4.png

    If ``LR_bicubic/X{scale}`` is missing, LR images are made on the fly from the HR images with
    MATLAB-compatible bicubic (``imresize(hr, 1 / scale)`` after cropping HR to a multiple of
    the scale), the procedure the published LR images came from.

    Args:
        root: the ``benchmark`` folder.
        name: data set folder name, e.g. ``"Set5"``.
        scale: upscaling factor.
        mode: ``"eval"`` by default (whole images).
        lr_patch, augment, repeat, cache, seed, convert: see :class:`PairedImageDataset`.

    Raises:
        DatasetError: missing folders or files, or no HR images.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str,
        scale: int,
        *,
        mode: str = "eval",
        lr_patch: int = 48,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
        seed: int = 0,
        convert: bool = False,
    ) -> None:
        scale = _check_int(scale, "scale", 1)
        root = Path(root).expanduser()
        layout = f"the EDSR benchmark layout {root}/{name}/HR/*.png"
        _require_dir(root, layout)
        set_dir = root / name
        if not set_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if (p / "HR").is_dir())
            raise DatasetError(
                f"{set_dir}: benchmark {name!r} not found; expected {layout}; "
                f"available: {', '.join(available) or 'none'}"
            )
        hr_dir = set_dir / "HR"
        _require_dir(hr_dir, layout)
        hr_paths = _list_images(hr_dir)
        if not hr_paths:
            raise DatasetError(f"{hr_dir}: no images matching {_EXT_PATTERN}; expected {layout}")
        lr_dir = set_dir / "LR_bicubic" / f"X{scale}"
        pairs = []
        for hr_path in hr_paths:
            lr_name = f"{hr_path.stem}x{scale}{hr_path.suffix}"
            pairs.append(_with_lr(hr_path.stem, hr_path, lr_dir, lr_name))
        self.root = root
        self.name = name
        super().__init__(
            pairs,
            scale,
            mode=mode,
            lr_patch=lr_patch,
            augment=augment,
            repeat=repeat,
            cache=cache,
            seed=seed,
            convert=convert,
        )
