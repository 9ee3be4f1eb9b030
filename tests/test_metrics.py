"""Tests for PSNR / SSIM with the SR evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lowbitsr.metrics import match_hr_to_sr, psnr, rgb_to_y, ssim


def _pair(shape=(40, 36, 3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish uint8 HR image and a noisy SR version of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = 128 + 60 * np.sin(yy / 5.0)[..., None] * np.cos(xx / 7.0)[..., None]
    hr = np.clip(base + rng.normal(0, 20, size=shape), 0, 255).round().astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, 8, size=shape), 0, 255).round().astype(np.uint8)
    return sr, hr


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 1 x 3 x H x W in [0, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float() / 255.0


# --------------------------------------------------------------------------------------------
# rgb_to_y
# --------------------------------------------------------------------------------------------


def test_rgb_to_y_known_values() -> None:
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    # Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16: black 16, white 16 + 219 = 235, and each
    # primary adds its own coefficient.
    expected = [[16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]]
    y = rgb_to_y(rgb)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


def test_rgb_to_y_torch_matches_numpy() -> None:
    img = np.random.default_rng(1).integers(0, 256, size=(2, 5, 6, 3)).astype(np.float64)
    y_np = rgb_to_y(img)
    y_t = rgb_to_y(torch.from_numpy(img).permute(0, 3, 1, 2))
    assert tuple(y_t.shape) == (2, 1, 5, 6)
    assert y_t.dtype == torch.float64
    np.testing.assert_allclose(y_t[:, 0].numpy(), y_np, rtol=0, atol=1e-12)
    # Single C x H x W tensors and integer tensors work too.
    y_single = rgb_to_y(torch.from_numpy(img[0]).permute(2, 0, 1).to(torch.uint8))
    assert tuple(y_single.shape) == (1, 5, 6)
    assert y_single.is_floating_point()
    np.testing.assert_allclose(y_single[0].numpy(), y_np[0], atol=1e-4)


def test_rgb_to_y_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="3"):
        rgb_to_y(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="3"):
        rgb_to_y(torch.zeros(1, 1, 4, 4))


# --------------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------------


def test_psnr_identical_is_inf() -> None:
    _, hr = _pair()
    assert psnr(hr, hr.copy(), crop_border=2) == math.inf
    assert psnr(_to_tensor(hr), _to_tensor(hr), crop_border=2, rgb_range=1.0) == math.inf


def test_psnr_hand_computed() -> None:
    hr = np.full((16, 16, 3), 100, dtype=np.uint8)
    sr = hr + np.uint8(1)
    # One gray level on every RGB value: MSE = 1, PSNR = 10 log10(255^2) = 48.1308 dB.
    assert psnr(sr, hr, crop_border=0, test_y_channel=False) == pytest.approx(48.1308036, abs=1e-6)
    # On Y, a gray offset of 1 moves Y by (65.481 + 128.553 + 24.966) / 255 = 219/255, so
    # PSNR = 10 log10(255^2 / (219/255)^2) = 20 log10(255^2 / 219) = 49.4527 dB.
    assert psnr(sr, hr, crop_border=0) == pytest.approx(49.4527249, abs=1e-6)
    # Half the pixels off by 2 gray levels in RGB: MSE = 2, PSNR = 48.1308 - 10 log10(2).
    sr2 = hr.copy()
    sr2[:8] += 2
    assert psnr(sr2, hr, 0, test_y_channel=False) == pytest.approx(45.1205036, abs=1e-6)


@pytest.mark.parametrize("crop", [0, 3])
def test_psnr_matches_skimage_on_cropped_y(crop: int) -> None:
    sr, hr = _pair()
    y_sr = rgb_to_y(sr)[crop : sr.shape[0] - crop, crop : sr.shape[1] - crop]
    y_hr = rgb_to_y(hr)[crop : hr.shape[0] - crop, crop : hr.shape[1] - crop]
    expected = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert psnr(sr, hr, crop_border=crop) == pytest.approx(expected, abs=1e-4)


def test_psnr_rgb_matches_skimage() -> None:
    sr, hr = _pair()
    expected = peak_signal_noise_ratio(hr[4:-4, 4:-4], sr[4:-4, 4:-4], data_range=255)
    assert psnr(sr, hr, 4, test_y_channel=False) == pytest.approx(expected, abs=1e-4)


def test_crop_border_removes_border() -> None:
    _, hr = _pair()
    sr = hr.copy()
    sr[:4] = 0
    sr[-4:] = 255
    sr[:, :4] = 7
    sr[:, -4:] = 9
    assert psnr(sr, hr, crop_border=4) == math.inf
    assert ssim(sr, hr, crop_border=4) == pytest.approx(1.0, abs=1e-12)
    assert psnr(sr, hr, crop_border=3) < 40
    assert ssim(sr, hr, crop_border=3) < 0.999


def test_output_is_rounded_before_measuring() -> None:
    hr = np.full((12, 12, 3), 10.0)
    assert psnr(hr + 0.4, hr, 0) == math.inf
    assert psnr(hr - 0.49, hr, 0) == math.inf
    # 10.5 rounds half away from zero to 11, so it differs.
    assert psnr(hr + 0.5, hr, 0, test_y_channel=False) == pytest.approx(48.1308036, abs=1e-6)
    # Values outside [0, 255] are clipped like a uint8 save.
    assert psnr(np.full((12, 12, 3), 300.0), np.full((12, 12, 3), 255.0), 0) == math.inf
    assert psnr(np.full((12, 12, 3), -5.0), np.zeros((12, 12, 3)), 0) == math.inf
    # Also for tensors in [0, 1].
    t = torch.full((1, 3, 12, 12), 10.0 / 255)
    assert psnr(t + 0.4 / 255, t, 0, rgb_range=1.0) == math.inf


def test_numpy_uint8_and_torch_give_identical_results() -> None:
    sr, hr = _pair()
    for fn in (psnr, ssim):
        ref = fn(sr, hr, 3)
        assert fn(_to_tensor(sr), _to_tensor(hr), 3, rgb_range=1.0) == ref
        assert fn(_to_tensor(sr)[0] * 255, _to_tensor(hr)[0] * 255, 3) == ref
        assert fn(sr.astype(np.float32) / 255, hr.astype(np.float32) / 255, 3, rgb_range=1) == ref
        # uint8 is always [0, 255], whatever rgb_range says; mixing types is allowed.
        assert fn(_to_tensor(sr), hr, 3, rgb_range=1.0) == ref


def test_batch_returns_mean_of_images() -> None:
    sr1, hr1 = _pair(seed=1)
    sr2, hr2 = _pair(seed=2)
    batch_sr = torch.cat([_to_tensor(sr1), _to_tensor(sr2)])
    batch_hr = torch.cat([_to_tensor(hr1), _to_tensor(hr2)])
    for fn in (psnr, ssim):
        expected = (fn(sr1, hr1, 2) + fn(sr2, hr2, 2)) / 2
        assert fn(batch_sr, batch_hr, 2, rgb_range=1.0) == pytest.approx(expected, abs=1e-12)


def test_shape_mismatch_names_both_shapes() -> None:
    sr, hr = _pair()
    with pytest.raises(ValueError, match=r"\(40, 36, 3\).*\(40, 34, 3\)"):
        psnr(sr, hr[:, :34], 2)
    with pytest.raises(ValueError, match="shape"):
        ssim(_to_tensor(sr), _to_tensor(hr)[..., :30], 2, rgb_range=1.0)


@pytest.mark.parametrize(
    ("sr", "kwargs", "match"),
    [
        (np.zeros((8, 8, 3)), {"crop_border": -1}, "crop_border"),
        (np.zeros((8, 8, 3)), {"crop_border": 4}, "too small"),
        (np.zeros((8, 8, 3)), {"crop_border": 0, "rgb_range": 0}, "rgb_range"),
        (np.zeros((8, 8, 4)), {"crop_border": 0}, "3 channels"),
        (np.zeros((2, 8, 8, 3)), {"crop_border": 0}, "H x W"),
        (torch.zeros(8, 8), {"crop_border": 0}, "C x H x W"),
    ],
)
def test_psnr_invalid_input(sr, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        psnr(sr, sr, **kwargs)


def test_gray_images_without_y() -> None:
    hr = np.full((16, 16), 50, dtype=np.uint8)
    assert psnr(hr + np.uint8(1), hr, 0, test_y_channel=False) == pytest.approx(48.1308036)


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [0, 2, 4])
def test_ssim_matches_skimage_on_cropped_y(crop: int) -> None:
    sr, hr = _pair()
    y_sr = rgb_to_y(sr)[crop : sr.shape[0] - crop, crop : sr.shape[1] - crop]
    y_hr = rgb_to_y(hr)[crop : hr.shape[0] - crop, crop : hr.shape[1] - crop]
    # skimage filters with 'reflect' padding and then drops (win_size - 1) // 2 = 5 pixels from
    # each border of the SSIM map before averaging, which is exactly 'valid' filtering. Its
    # Gaussian (sigma 1.5, truncate 3.5) has radius 5, i.e. the 11 x 11 window.
    expected = structural_similarity(
        y_sr,
        y_hr,
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(sr, hr, crop_border=crop) == pytest.approx(expected, abs=1e-4)
    assert ssim(sr, hr, crop_border=crop) == pytest.approx(expected, abs=1e-10)


def test_ssim_rgb_is_channel_mean_and_matches_skimage() -> None:
    sr, hr = _pair()
    expected = structural_similarity(
        sr[3:-3, 3:-3].astype(np.float64),
        hr[3:-3, 3:-3].astype(np.float64),
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=-1,
    )
    assert ssim(sr, hr, 3, test_y_channel=False) == pytest.approx(expected, abs=1e-10)


def test_ssim_of_constant_images_hand_computed() -> None:
    # Flat images have zero variance and covariance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    # with C1 = (0.01 * 255)^2 = 6.5025: (22000 + 6.5025) / (22100 + 6.5025) = 0.99547644.
    a = np.full((20, 20), 100, dtype=np.uint8)
    b = np.full((20, 20), 110, dtype=np.uint8)
    assert ssim(a, b, 0, test_y_channel=False) == pytest.approx(0.9954764441, abs=1e-9)


def test_ssim_identical_is_one_and_degrades_with_noise() -> None:
    sr, hr = _pair()
    assert ssim(hr, hr, 2) == pytest.approx(1.0, abs=1e-12)
    noisier = np.clip(sr.astype(int) + (sr.astype(int) - hr), 0, 255).astype(np.uint8)
    assert ssim(noisier, hr, 2) < ssim(sr, hr, 2) < 1.0


def test_ssim_needs_window_after_crop() -> None:
    img = np.zeros((14, 14, 3), dtype=np.uint8)
    assert ssim(img, img, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        ssim(img, img, 2)


# --------------------------------------------------------------------------------------------
# match_hr_to_sr
# --------------------------------------------------------------------------------------------


def test_match_hr_to_sr() -> None:
    # Set5 "woman" is 228 x 344; its x3 LR is 76 x 114, so SR is 228 x 342.
    hr = np.arange(228 * 344 * 3).reshape(228, 344, 3)
    sr = np.zeros((228, 342, 3), np.uint8)
    cropped = match_hr_to_sr(hr, sr)
    assert cropped.shape == (228, 342, 3)
    np.testing.assert_array_equal(cropped, hr[:, :342])
    hr_t = torch.zeros(2, 3, 229, 345)
    assert tuple(match_hr_to_sr(hr_t, torch.zeros(2, 3, 228, 344)).shape) == (2, 3, 228, 344)
    assert tuple(match_hr_to_sr(hr_t, np.zeros((210, 300, 3))).shape) == (2, 3, 210, 300)
    assert match_hr_to_sr(hr, torch.zeros(1, 3, 100, 120)).shape == (100, 120, 3)
    with pytest.raises(ValueError, match="smaller"):
        match_hr_to_sr(hr, np.zeros((232, 344, 3)))
