"""Paired LR/HR array transforms used by the datasets.

All functions take and return ``H x W x C`` numpy arrays (any dtype; the datasets use uint8 in
0..255) and never modify their inputs. Randomness always comes from an explicit
:class:`numpy.random.Generator` so that callers control reproducibility.
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment_pair", "crop_to_multiple", "paired_random_crop"]


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom/right edge so that height and width are multiples of ``multiple``.

    Args:
        image: ``H x W`` or ``H x W x C`` array.
        multiple: positive int; ``1`` returns the image unchanged.

    Returns:
        A view of shape ``(H - H % multiple, W - W % multiple, ...)`` (the top-left corner is
        kept, as BasicSR's ``mod_crop`` and the benchmarks' MATLAB scripts do).
    """
    if multiple < 1:
        raise ValueError(f"crop_to_multiple needs multiple >= 1, got {multiple}")
    h, w = image.shape[:2]
    return image[: h - h % multiple, : w - w % multiple]


def paired_random_crop(
    lr: np.ndarray, hr: np.ndarray, lr_patch: int, scale: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Crop an aligned ``lr_patch``-square LR patch and its ``lr_patch * scale`` HR patch.

    Args:
        lr: ``h x w x C`` LR image.
        hr: ``(h * scale) x (w * scale) x C`` HR image (exactly, not larger).
        lr_patch: side of the LR crop in pixels, ``1 <= lr_patch <= min(h, w)``.
        scale: integer upscaling factor.
        rng: source of the crop position (two ``integers`` draws: row, then column).

    Returns:
        ``(lr_crop, hr_crop)`` views of shapes ``(lr_patch, lr_patch, C)`` and
        ``(lr_patch * scale, lr_patch * scale, C)``; HR pixel ``(y * scale, x * scale)`` is the
        top-left of the HR patch when LR pixel ``(y, x)`` is the top-left of the LR patch.

    Raises:
        ValueError: shapes do not match or the image is smaller than the crop (datasets check
            this first so that they can name the file).
    """
    h, w = lr.shape[:2]
    if hr.shape[:2] != (h * scale, w * scale):
        raise ValueError(f"HR shape {hr.shape[:2]} is not LR shape {(h, w)} times {scale}")
    if lr_patch < 1 or h < lr_patch or w < lr_patch:
        raise ValueError(f"cannot crop {lr_patch}x{lr_patch} from an LR image of {h}x{w}")
    top = int(rng.integers(0, h - lr_patch + 1))
    left = int(rng.integers(0, w - lr_patch + 1))
    hr_patch = lr_patch * scale
    lr_crop = lr[top : top + lr_patch, left : left + lr_patch]
    hr_crop = hr[top * scale : top * scale + hr_patch, left * scale : left * scale + hr_patch]
    return lr_crop, hr_crop


def augment_pair(
    lr: np.ndarray,
    hr: np.ndarray,
    rng: np.random.Generator,
    *,
    hflip: bool = True,
    vflip: bool = True,
    transpose: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same random horizontal flip, vertical flip and transpose to LR and HR.

    Each enabled operation is applied with probability 0.5, decided by one ``rng.random()``
    draw per operation in the order hflip, vflip, transpose (disabled ones draw nothing). The
    eight outcomes are the dihedral group of the square, the standard EDSR/BasicSR augmentation.

    Args:
        lr, hr: ``H x W x C`` arrays (a transpose swaps H and W).
        rng: the random source.

    Returns:
        ``(lr, hr)`` as (possibly non-contiguous) views.
    """
    if hflip and rng.random() < 0.5:
        lr, hr = lr[:, ::-1], hr[:, ::-1]
    if vflip and rng.random() < 0.5:
        lr, hr = lr[::-1], hr[::-1]
    if transpose and rng.random() < 0.5:
        lr, hr = lr.swapaxes(0, 1), hr.swapaxes(0, 1)
    return lr, hr
