"""MATLAB-compatible bicubic image resizing.

The SR benchmarks (Set5, Set14, B100, Urban100, Manga109, DIV2K) were made by downsampling the HR
images with MATLAB's ``imresize(hr, 1/s, 'bicubic')``. Other resamplers (PIL, OpenCV, torch)
use a different kernel, no antialiasing or different boundary handling, which shifts PSNR by
tenths of a dB, so LR images must be made exactly this way (docs/evaluation.md §2).

The algorithm, per axis (MATLAB's ``contributions``/``resizeAlongDim``):

* cubic convolution kernel with a = -0.5 (Keys 1981), support [-2, 2];
* when shrinking (scale < 1) with antialiasing, the kernel is stretched to ``scale * k(scale * x)``
  and its support widened to ``4 / scale``;
* output pixel ``x`` (1-based) samples input coordinate ``u = x / scale + 0.5 * (1 - 1 / scale)``;
* weights are normalised to sum to one for every output pixel;
* indices falling outside the image are mirrored (``[1..n, n..1]`` repeated, i.e. symmetric
  padding that repeats the edge pixel);
* the axes are resized one after the other, the axis with the smaller scale first (ties: rows
  first); for uint8 images the result of each pass is rounded and saturated to uint8, because
  MATLAB stores the intermediate image in the input's class.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize"]

# MATLAB's bicubic kernel is 4 input pixels wide (|x| <= 2).
_KERNEL_WIDTH = 4.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as in MATLAB (float64, support [-2, 2])."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1.0)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0) * ((absx > 1.0) & (absx <= 2.0))
    return inner + outer


def _contributions(
    in_length: int, out_length: int, scale: float, antialiasing: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices of every output pixel along one axis.

    Returns:
        ``(weights, indices)``, both of shape ``(out_length, taps)``; ``weights`` is float64 with
        rows summing to 1, ``indices`` is int64 in ``[0, in_length)``.
    """
    if scale < 1.0 and antialiasing:
        # Stretching the kernel by 1/scale low-pass filters the input before decimation.
        def kernel(x: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * x)

        width = _KERNEL_WIDTH / scale
    else:
        kernel = _cubic
        width = _KERNEL_WIDTH

    x = np.arange(1, out_length + 1, dtype=np.float64)
    # Maps output pixel centres to input pixel centres so that both images cover the same extent.
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    # One spare tap on each side; taps that end up all-zero are dropped below.
    taps = math.ceil(width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)

    # Symmetric boundary: 1-based index i maps into [1..n, n..1] with period 2n.
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]

    keep = np.any(weights != 0.0, axis=0)
    return weights[:, keep], indices[:, keep]


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Saturate to [0, 255] and round half away from zero, as MATLAB's uint8 conversion does."""
    return np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _resize_axis(
    image: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray
) -> np.ndarray:
    """Resample ``image`` (float64, H x W x C) along ``axis`` with precomputed contributions."""
    src = np.moveaxis(image, axis, 0)
    out = np.zeros((weights.shape[0], *src.shape[1:]), dtype=np.float64)
    # A loop over the few taps (6 to ~26) keeps memory at one output-sized temporary and sums
    # the taps in the same order as MATLAB's mex kernel.
    for tap in range(weights.shape[1]):
        out += weights[:, tap, None, None] * src[indices[:, tap]]
    return np.moveaxis(out, 0, axis)


def imresize(
    image: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
    *,
    antialiasing: bool = True,
) -> np.ndarray:
    """Resize an image like MATLAB's ``imresize(image, scale_or_size, 'bicubic')``.

    Args:
        image: ``H x W`` or ``H x W x C`` array, dtype uint8 (values 0..255) or floating point
            (any range; no clipping is applied).
        scale: Scale factor applied to both axes (> 0). The output is
            ``ceil(H * scale) x ceil(W * scale)`` and the sampling grid uses ``scale`` itself,
            as MATLAB does. Give exactly one of ``scale`` and ``output_shape``.
        output_shape: ``(out_h, out_w)``, positive ints. Each axis then uses the scale
            ``out / in`` of its own.
        antialiasing: Widen the kernel by ``1 / scale`` when shrinking (MATLAB's default for
            bicubic). Has no effect on axes that are enlarged.

    Returns:
        The resized image with the same number of dimensions and channels. uint8 input gives
        uint8 output, rounded half away from zero and saturated after each axis pass (as
        MATLAB does); floating input is computed in float64 and returned in the input dtype.

    Raises:
        ValueError: ``image`` is not 2-D or 3-D, not uint8/floating, empty, or the scale /
            output shape is missing, duplicated or not positive.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"imresize expects an H x W or H x W x C image, got shape {image.shape}; "
            "resize batches one image at a time"
        )
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"imresize supports uint8 and floating-point images, got dtype {image.dtype}; "
            "convert with .astype(np.float64) first"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"imresize got an empty image of shape {image.shape}")
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize needs exactly one of scale= or output_shape=")

    in_shape = (int(image.shape[0]), int(image.shape[1]))
    if scale is not None:
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"imresize scale must be a finite number > 0, got {scale}")
        scales = (scale, scale)
        out_shape = (math.ceil(in_shape[0] * scale), math.ceil(in_shape[1] * scale))
    else:
        assert output_shape is not None
        if len(output_shape) != 2 or any(
            isinstance(s, bool) or int(s) != s or s <= 0 for s in output_shape
        ):
            raise ValueError(
                f"imresize output_shape must be two positive integers (out_h, out_w), "
                f"got {output_shape}"
            )
        out_shape = (int(output_shape[0]), int(output_shape[1]))
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])

    is_uint8 = image.dtype == np.uint8
    squeeze = image.ndim == 2
    work = image.astype(np.float64)
    if squeeze:
        work = work[:, :, None]

    # MATLAB resizes along the axis with the smallest scale first (stable sort: rows on ties),
    # which keeps the intermediate image small when shrinking.
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    for axis in order:
        weights, indices = _contributions(
            in_shape[axis], out_shape[axis], scales[axis], antialiasing
        )
        work = _resize_axis(work, axis, weights, indices)
        if is_uint8:
            # MATLAB keeps the intermediate image in the input class, so it is rounded here too.
            work = _round_to_uint8(work).astype(np.float64)

    if squeeze:
        work = work[:, :, 0]
    if is_uint8:
        return work.astype(np.uint8)
    return work.astype(image.dtype, copy=False)
