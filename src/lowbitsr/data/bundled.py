"""The bundled sample set: natural colour photographs shipped inside scikit-image.

They make a tiny but real train/valid/test set that needs no download, for examples, smoke
tests and CI. The files are read straight from scikit-image's installed ``data`` folder; the
``skimage.data`` fetchers are never called (some of them download).

The split is fixed and disjoint; the two halves of the motorcycle stereo pair are both in
``train`` because they show the same scene; the test images are PNG photographs (no JPEG
artefacts in the reference).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .datasets import ImageFolderDataset

__all__ = ["BUNDLED_SPLITS", "BundledDataset", "bundled_data_dir", "bundled_image_paths"]

#: Files (in scikit-image's data folder) of each split.
BUNDLED_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "coffee.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
        "rocket.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
    ),
    "valid": ("ihc.png",),
    # losslessly stored photographs: the JPEG ones carry 8x8 block artefacts in their "HR"
    # that no SR model should reproduce, which would blur the comparison with bicubic
    "test": ("astronaut.png", "chelsea.png"),
}

#: HR images are cropped to a multiple of lcm(2, 3, 4) so that x2, x3 and x4 see the same HR.
BUNDLED_HR_MULTIPLE = 12


def bundled_data_dir() -> Path:
    """scikit-image's installed ``data`` folder (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "scikit-image is not installed, so the bundled sample images are unavailable; "
            "install it with `pip install scikit-image`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def bundled_image_paths(split: str) -> list[Path]:
    """Paths of the bundled images of ``split`` (``"train"``, ``"valid"`` or ``"test"``).

    Raises:
        ConfigError: unknown split.
        DatasetError: a file is missing from scikit-image's data folder.
    """
    if split not in BUNDLED_SPLITS:
        raise ConfigError(
            f"bundled split {split!r} is not valid; use one of {', '.join(BUNDLED_SPLITS)}"
        )
    folder = bundled_data_dir()
    paths = [folder / name for name in BUNDLED_SPLITS[split]]
    for path in paths:
        if not path.is_file():
            raise DatasetError(
                f"{path}: bundled sample image missing from scikit-image's data folder; "
                "reinstall scikit-image (pip install --force-reinstall scikit-image)"
            )
    return paths


class BundledDataset(ImageFolderDataset):
    """The bundled scikit-image photographs of one split as a paired SR dataset.

    HR images are cropped to a multiple of ``lcm(12, scale)`` (12 = lcm of 2, 3, 4, so every
    common scale sees identical HR content) and LR images are made with MATLAB-compatible
    bicubic downsampling. Sample names are the file stems (``"astronaut"``).

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"`` (see :data:`BUNDLED_SPLITS`).
        scale: upscaling factor.
        mode: default ``"train"`` for split ``"train"``, ``"eval"`` otherwise.
        lr_patch, augment, repeat, cache, seed: see
            :class:`~lowbitsr.data.datasets.PairedImageDataset`.
    """

    def __init__(
        self,
        split: str,
        scale: int,
        *,
        mode: str | None = None,
        lr_patch: int = 48,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        paths = bundled_image_paths(split)
        self.split = split
        hr_multiple = (
            math.lcm(BUNDLED_HR_MULTIPLE, scale)
            if isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1
            else None  # let the base class report the invalid scale
        )
        super().__init__(
            paths[0].parent,
            scale,
            files=[p.name for p in paths],
            mode=mode or ("train" if split == "train" else "eval"),
            lr_patch=lr_patch,
            augment=augment,
            repeat=repeat,
            cache=cache,
            seed=seed,
            hr_multiple=hr_multiple,
        )
