"""Image-quality metrics with the SR papers' evaluation protocol (docs/evaluation.md §1).

PSNR and SSIM are measured on the output as it would be saved, i.e. rounded to integers in
[0, 255], converted to the luma channel Y of BT.601 YCbCr with MATLAB's ``rgb2ycbcr``
coefficients (kept in float, not re-rounded), after removing ``crop_border`` pixels (the scale
factor, by convention) from every border. SSIM is Wang et al. 2004 as implemented in their
``ssim_index.m``: 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid'
filtering and the mean of the SSIM map.

Inputs may be numpy arrays ``H x W x C`` (channel last) or torch tensors ``C x H x W`` /
``N x C x H x W`` (channel first). uint8 inputs are always read as [0, 255]; any other dtype is
read as [0, rgb_range]. For a batch (N > 1) the metric is computed per image and the mean over
the batch is returned.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["match_hr_to_sr", "psnr", "rgb_to_y", "ssim"]

# MATLAB rgb2ycbcr, Y row, for RGB in [0, 255]: Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16.
_Y_COEFFS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_PIXEL_MAX = 255.0

ArrayOrTensor = np.ndarray | torch.Tensor


def rgb_to_y(img: ArrayOrTensor) -> ArrayOrTensor:
    """Luma Y of BT.601 YCbCr with MATLAB's ``rgb2ycbcr`` coefficients, without rounding.

    Args:
        img: RGB values in [0, 255]. A numpy array ``... x 3`` (channel last, e.g. ``H x W x 3``)
            or a torch tensor ``... x 3 x H x W`` (channel first, e.g. ``N x 3 x H x W``).

    Returns:
        Y in [16, 235]. For numpy: float64 array of shape ``...`` (channel axis dropped). For
        torch: tensor ``... x 1 x H x W`` (channel axis kept so the result is still NCHW) in the
        input's floating dtype (integer tensors give the default float dtype).

    Raises:
        ValueError: the channel axis does not have size 3.
    """
    if isinstance(img, torch.Tensor):
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ValueError(
                f"rgb_to_y expects a torch tensor ... x 3 x H x W, got shape {tuple(img.shape)}"
            )
        x = img if img.is_floating_point() else img.to(torch.get_default_dtype())
        coeffs = torch.tensor(_Y_COEFFS, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * coeffs).sum(dim=-3, keepdim=True) / 255.0 + _Y_OFFSET
    arr = np.asarray(img)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects a numpy array ... x 3, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    return arr @ np.asarray(_Y_COEFFS, dtype=np.float64) / 255.0 + _Y_OFFSET


def _spatial_hw(img: ArrayOrTensor) -> tuple[int, int]:
    """(H, W) of a numpy ``H x W [x C]`` array or a torch ``... x H x W`` tensor."""
    if img.ndim < 2:
        raise ValueError(f"expected an image, got shape {tuple(img.shape)}")
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    return int(img.shape[0]), int(img.shape[1])


def match_hr_to_sr(hr: ArrayOrTensor, sr: ArrayOrTensor) -> ArrayOrTensor:
    """Crop the HR image from the bottom/right to the spatial size of the SR output.

    The benchmarks compare against HR cropped to ``LR size x scale`` (docs/evaluation.md §1); the SR
    output has exactly that size, so cropping HR to it applies the convention.

    Args:
        hr: numpy ``H x W`` / ``H x W x C`` or torch ``... x H x W``.
        sr: Same conventions (it may be of the other kind); only its H and W are used.

    Returns:
        A view of ``hr`` of spatial size ``sr``'s; dtype and other axes unchanged.

    Raises:
        ValueError: ``hr`` is smaller than ``sr`` in H or W.
    """
    h, w = _spatial_hw(hr)
    out_h, out_w = _spatial_hw(sr)
    if out_h > h or out_w > w:
        raise ValueError(
            f"HR image {h}x{w} is smaller than the SR output {out_h}x{out_w}; check that the HR "
            "and LR files belong together and the scale is right"
        )
    if isinstance(hr, torch.Tensor):
        return hr[..., :out_h, :out_w]
    return hr[:out_h, :out_w]


def _to_nhwc_255(img: ArrayOrTensor, rgb_range: float, name: str) -> np.ndarray:
    """Canonicalise a metric input to float64 ``N x H x W x C`` integers in [0, 255].

    Rounding happens here because the protocol scores the image as saved to an 8-bit file.
    """
    if isinstance(img, torch.Tensor):
        is_uint8 = img.dtype == torch.uint8
        if img.ndim == 3:
            img = img.unsqueeze(0)
        if img.ndim != 4:
            raise ValueError(
                f"{name} must be a tensor C x H x W or N x C x H x W, got {tuple(img.shape)}"
            )
        arr = img.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    elif isinstance(img, np.ndarray):
        if img.dtype == np.bool_ or not np.issubdtype(img.dtype, np.number):
            raise ValueError(f"{name} must hold numbers, got dtype {img.dtype}")
        is_uint8 = img.dtype == np.uint8
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3:
            raise ValueError(f"{name} must be an array H x W or H x W x C, got {img.shape}")
        arr = img.astype(np.float64)[None]
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(img).__name__}")
    if not is_uint8 and rgb_range != _PIXEL_MAX:
        arr = arr * (_PIXEL_MAX / rgb_range)
    # floor(x + 0.5) on clipped, non-negative values = MATLAB's round (half away from zero).
    return np.floor(np.clip(arr, 0.0, _PIXEL_MAX) + 0.5)


_BAND = 512  # image rows per step of the banded computations (bounds their memory)


def _is_uint8_rgb(img: ArrayOrTensor) -> bool:
    return (
        isinstance(img, np.ndarray)
        and img.dtype == np.uint8
        and img.ndim == 3
        and (img.shape[2] == 3)
    )


def _uint8_to_y(img: np.ndarray, crop_border: int) -> np.ndarray:
    """:func:`rgb_to_y` of a cropped uint8 ``H x W x 3`` image as ``1 x h x w x 1`` float64."""
    h, w = img.shape[:2]
    view = img[crop_border : h - crop_border, crop_border : w - crop_border]
    out = np.empty(view.shape[:2], dtype=np.float64)
    for r in range(0, view.shape[0], _BAND):
        out[r : r + _BAND] = rgb_to_y(view[r : r + _BAND])
    return out[None, ..., None]


def _prepare(
    sr: ArrayOrTensor,
    hr: ArrayOrTensor,
    crop_border: int,
    test_y_channel: bool,
    rgb_range: float,
    min_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate, round, convert to Y and crop both images; returns float64 ``N x H x W x C``."""
    if isinstance(crop_border, bool) or int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"crop_border must be an integer >= 0, got {crop_border}")
    crop_border = int(crop_border)
    if not (rgb_range > 0 and math.isfinite(rgb_range)):
        raise ValueError(f"rgb_range must be a finite number > 0, got {rgb_range}")
    if test_y_channel and _is_uint8_rgb(sr) and _is_uint8_rgb(hr) and sr.shape == hr.shape:
        # Already rounded: Y straight from the 8-bit values, a band of rows at a time (a float64
        # copy of both RGB images would cost 48 bytes a pixel).
        a, b = _uint8_to_y(sr, crop_border), _uint8_to_y(hr, crop_border)
        if a.shape[1] < min_size or a.shape[2] < min_size:
            raise ValueError(
                f"image of shape {tuple(sr.shape)} is too small: after cropping {crop_border} "
                f"pixels per border it must be at least {min_size}x{min_size}"
            )
        return a, b
    a = _to_nhwc_255(sr, rgb_range, "sr")
    b = _to_nhwc_255(hr, rgb_range, "hr")
    if a.shape != b.shape:
        raise ValueError(
            f"sr shape {tuple(sr.shape)} does not match hr shape {tuple(hr.shape)}; crop hr "
            "to the sr size first (see lowbitsr.metrics.match_hr_to_sr)"
        )
    if test_y_channel:
        if a.shape[-1] != 3:
            raise ValueError(
                f"test_y_channel=True needs RGB images with 3 channels, got shape "
                f"{tuple(sr.shape)}; pass test_y_channel=False for other images"
            )
        a = rgb_to_y(a)[..., None]
        b = rgb_to_y(b)[..., None]
    if crop_border:
        a = a[:, crop_border:-crop_border, crop_border:-crop_border]
        b = b[:, crop_border:-crop_border, crop_border:-crop_border]
    if a.shape[1] < min_size or a.shape[2] < min_size:
        raise ValueError(
            f"image of shape {tuple(sr.shape)} is too small: after cropping {crop_border} "
            f"pixels per border it must be at least {min_size}x{min_size}"
        )
    return a, b


def psnr(
    sr: ArrayOrTensor,
    hr: ArrayOrTensor,
    crop_border: int,
    test_y_channel: bool = True,
    rgb_range: float = 255.0,
) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(255^2 / MSE)``, with the SR protocol.

    Args:
        sr: Restored image: numpy ``H x W x 3`` (or ``H x W x C`` / ``H x W`` when
            ``test_y_channel`` is False), torch ``3 x H x W`` or ``N x 3 x H x W``. uint8 is read
            as [0, 255], any other dtype as [0, rgb_range].
        hr: Ground truth, same layout rules; its shape must equal ``sr``'s after bringing both
            to ``N x H x W x C``.
        crop_border: Pixels removed from each border before measuring (usually the scale).
        test_y_channel: Measure on Y (BT.601, MATLAB coefficients) instead of all channels.
        rgb_range: Upper end of the value range of non-uint8 inputs (e.g. 1.0 or 255.0).

    Returns:
        PSNR in dB as a Python float; ``inf`` for identical (rounded) images; for a batch, the
        mean of the per-image PSNRs (``inf`` if any pair is identical). Non-finite inputs may
        give ``nan``.

    Raises:
        ValueError: shapes differ, the layout is not one of the above, or nothing is left
            after cropping.
    """
    a, b = _prepare(sr, hr, crop_border, test_y_channel, rgb_range, min_size=1)
    values = []
    for x, y in zip(a, b, strict=True):
        mse = float(np.mean((x - y) ** 2))
        values.append(math.inf if mse == 0.0 else 10.0 * math.log10(_PIXEL_MAX**2 / mse))
    return float(np.mean(values))


def _gaussian_1d() -> np.ndarray:
    """Normalised 1-D Gaussian, 11 taps, sigma 1.5; its outer product is ``fspecial``'s window."""
    x = np.arange(_SSIM_WINDOW, dtype=np.float64) - (_SSIM_WINDOW - 1) / 2
    g = np.exp(-(x**2) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D float64 image: ``H x W -> (H-10) x (W-10)``."""
    k = g.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i in range(k):
        rows += g[i] * img[i : i + h - k + 1]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j in range(k):
        out += g[j] * rows[:, j : j + w - k + 1]
    return out


def _ssim_2d(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """Mean SSIM of two float64 ``H x W`` images in [0, 255] (Wang et al. 2004, eq. 13).

    The map is computed ``_BAND`` rows at a time (each band reads ``window - 1`` more rows), so
    memory stays at a dozen bands instead of a dozen images.
    """
    k = g.size
    rows, cols = x.shape[0] - k + 1, x.shape[1] - k + 1
    total = 0.0
    for r in range(0, rows, _BAND):
        end = min(r + _BAND, rows)
        total += float(_ssim_map(x[r : end + k - 1], y[r : end + k - 1], g).sum())
    return total / (rows * cols)


def _ssim_map(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """SSIM map ('valid' part) of two float64 ``H x W`` images in [0, 255]."""
    c1 = (_SSIM_K1 * _PIXEL_MAX) ** 2
    c2 = (_SSIM_K2 * _PIXEL_MAX) ** 2
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    # Population (1/N-weighted) local variances, as in ssim_index.m.
    var_x = _filter_valid(x * x, g) - mu_xx
    var_y = _filter_valid(y * y, g) - mu_yy
    cov_xy = _filter_valid(x * y, g) - mu_xy
    return ((2.0 * mu_xy + c1) * (2.0 * cov_xy + c2)) / (
        (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    )


def ssim(
    sr: ArrayOrTensor,
    hr: ArrayOrTensor,
    crop_border: int,
    test_y_channel: bool = True,
    rgb_range: float = 255.0,
) -> float:
    """Structural similarity (Wang et al. 2004, MATLAB ``ssim_index``) with the SR protocol.

    Args:
        sr: Restored image, layouts and value ranges as in :func:`psnr`.
        hr: Ground truth, same shape as ``sr``.
        crop_border: Pixels removed from each border before measuring (usually the scale).
        test_y_channel: Measure on Y; otherwise SSIM is computed per channel and averaged.
        rgb_range: Upper end of the value range of non-uint8 inputs.

    Returns:
        Mean SSIM in [-1, 1] (1 for identical images) as a Python float; for a batch, the mean
        over images.

    Raises:
        ValueError: shapes differ, the layout is unsupported, or the cropped image is smaller
            than the 11 x 11 window.
    """
    a, b = _prepare(sr, hr, crop_border, test_y_channel, rgb_range, min_size=_SSIM_WINDOW)
    g = _gaussian_1d()
    values = [
        np.mean([_ssim_2d(x[..., c], y[..., c], g) for c in range(x.shape[-1])])
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(values))
