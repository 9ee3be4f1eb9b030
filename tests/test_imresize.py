"""Tests for the MATLAB-compatible bicubic imresize."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbitsr.imresize import imresize

# ---------------------------------------------------------------------------------------------
# Known MATLAB outputs.
#
# MATLAB's imresize(uint8(IN), s, 'bicubic', 'Antialiasing', aa) on the 8 x 10 image below. The
# numbers were produced by MATLAB and are published as reference data in the test block of the
# GNU Octave image package's imresize.m (2022 revision), which we cannot run here.
# ---------------------------------------------------------------------------------------------

MATLAB_IN = np.array(
    [
        [116, 227, 153, 69, 146, 194, 59, 130, 139, 106],
        [2, 47, 137, 249, 90, 75, 16, 24, 158, 44],
        [155, 68, 46, 84, 166, 156, 69, 204, 32, 152],
        [71, 221, 137, 230, 210, 153, 192, 115, 30, 118],
        [107, 143, 108, 52, 51, 73, 101, 21, 175, 90],
        [54, 158, 143, 77, 26, 168, 113, 229, 165, 225],
        [9, 47, 133, 135, 130, 207, 236, 43, 19, 73],
        [129, 60, 59, 243, 64, 181, 249, 56, 32, 86],
    ],
    dtype=np.uint8,
)

MATLAB_OUT = {
    (0.5, False): [
        [92, 164, 123, 38, 118],
        [139, 116, 188, 167, 69],
        [121, 87, 67, 108, 180],
        [54, 153, 141, 149, 42],
    ],
    (0.5, True): [
        [105, 140, 126, 81, 109],
        [110, 134, 153, 114, 93],
        [108, 108, 94, 127, 146],
        [67, 126, 162, 149, 62],
    ],
    (1 / 3, False): [
        [47, 90, 24, 44],
        [143, 51, 21, 90],
        [60, 64, 56, 86],
    ],
    (1 / 3, True): [
        [115, 135, 97, 101],
        [113, 119, 124, 125],
        [81, 157, 118, 64],
    ],
    (1.5, True): [
        [116, 187, 237, 171, 94, 61, 135, 191, 187, 75, 91, 142, 140, 124, 108],
        [43, 92, 143, 149, 164, 163, 119, 123, 118, 44, 38, 80, 151, 118, 62],
        [13, 21, 47, 107, 195, 228, 115, 81, 70, 24, 19, 56, 137, 105, 48],
        [146, 98, 49, 49, 71, 107, 148, 159, 132, 58, 124, 176, 61, 85, 146],
        [118, 139, 144, 92, 116, 168, 201, 188, 159, 140, 167, 158, 27, 69, 153],
        [61, 151, 218, 145, 174, 219, 201, 164, 146, 187, 148, 84, 48, 76, 115],
        [102, 132, 151, 119, 90, 72, 72, 72, 83, 114, 60, 31, 144, 130, 80],
        [81, 121, 154, 133, 87, 41, 19, 67, 116, 95, 108, 140, 183, 180, 163],
        [37, 95, 152, 150, 117, 73, 35, 108, 179, 130, 174, 214, 153, 176, 219],
        [3, 29, 73, 131, 136, 120, 116, 162, 214, 229, 147, 54, 35, 62, 96],
        [67, 54, 51, 83, 153, 187, 111, 141, 210, 255, 149, 22, 13, 42, 74],
        [142, 99, 53, 43, 164, 237, 77, 103, 197, 254, 159, 42, 31, 59, 91],
    ],
    (4 / 3, True): [
        [116, 203, 221, 141, 62, 110, 180, 191, 70, 104, 143, 136, 111, 106],
        [26, 78, 126, 156, 200, 139, 103, 103, 33, 28, 92, 158, 67, 46],
        [51, 35, 51, 112, 195, 146, 101, 87, 29, 57, 100, 114, 81, 74],
        [159, 110, 63, 50, 82, 148, 179, 152, 83, 173, 147, 27, 143, 170],
        [70, 171, 189, 134, 217, 226, 193, 158, 186, 157, 83, 25, 114, 135],
        [91, 152, 162, 116, 118, 114, 102, 98, 138, 65, 60, 127, 92, 84],
        [90, 130, 144, 111, 52, 24, 50, 101, 94, 86, 129, 190, 146, 135],
        [41, 114, 157, 139, 89, 37, 82, 178, 125, 192, 203, 154, 213, 227],
        [4, 33, 89, 141, 127, 118, 151, 213, 232, 119, 35, 34, 81, 92],
        [88, 61, 54, 97, 203, 129, 115, 203, 255, 119, 18, 24, 70, 81],
        [147, 91, 43, 68, 247, 125, 80, 191, 255, 130, 33, 37, 83, 94],
    ],
}


@pytest.mark.parametrize(("scale", "antialiasing"), list(MATLAB_OUT))
def test_matches_published_matlab_output(scale: float, antialiasing: bool) -> None:
    out = imresize(MATLAB_IN, scale, antialiasing=antialiasing)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.array(MATLAB_OUT[(scale, antialiasing)]))


def test_matlab_output_needs_per_pass_uint8_rounding() -> None:
    # Rounding only once at the end (float pipeline) misses MATLAB by 1 on many pixels; this
    # guards the per-pass rounding that makes the uint8 path exact.
    via_float = imresize(MATLAB_IN.astype(np.float64), 1.5)
    rounded_once = np.floor(np.clip(via_float, 0, 255) + 0.5)
    assert np.any(rounded_once != np.array(MATLAB_OUT[(1.5, True)]))


# ---------------------------------------------------------------------------------------------
# An independent, loop-based reference written straight from MATLAB's contributions.m.
# ---------------------------------------------------------------------------------------------


def _ref_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _ref_mirror(i: int, n: int) -> int:
    """1-based index anywhere on the integer line -> 0-based index by reflecting at the edges."""
    while i < 1 or i > n:
        i = 1 - i if i < 1 else 2 * n + 1 - i
    return i - 1


def _ref_weights(n_in: int, n_out: int, scale: float, aa: bool) -> list[dict[int, float]]:
    stretch = scale if (scale < 1 and aa) else 1.0
    half_width = 2.0 / stretch
    rows = []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        taps = range(math.floor(u - half_width), math.ceil(u + half_width) + 1)
        raw = [(j, stretch * _ref_cubic(stretch * (u - j))) for j in taps]
        total = sum(w for _, w in raw)
        row: dict[int, float] = {}
        for j, w in raw:
            src = _ref_mirror(j, n_in)
            row[src] = row.get(src, 0.0) + w / total
        rows.append(row)
    return rows


def _ref_imresize(img: np.ndarray, out_hw: tuple[int, int], scales: tuple[float, float], aa: bool):
    is_uint8 = img.dtype == np.uint8
    cur = img.astype(np.float64).reshape(img.shape[0], img.shape[1], -1)
    axes = [0, 1] if scales[0] <= scales[1] else [1, 0]
    for axis in axes:
        rows = _ref_weights(cur.shape[axis], out_hw[axis], scales[axis], aa)
        shape = list(cur.shape)
        shape[axis] = out_hw[axis]
        nxt = np.zeros(shape)
        for o, row in enumerate(rows):
            for src, w in row.items():
                if axis == 0:
                    nxt[o] += w * cur[src]
                else:
                    nxt[:, o] += w * cur[:, src]
        if is_uint8:
            nxt = np.array(
                [math.floor(min(max(v, 0.0), 255.0) + 0.5) for v in nxt.ravel()]
            ).reshape(nxt.shape)
        cur = nxt
    return cur.reshape(out_hw + img.shape[2:])


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3, 4])
@pytest.mark.parametrize("shape", [(13, 9, 3), (7, 11)])
def test_agrees_with_loop_reference(scale: float, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    img_f = rng.uniform(0, 255, size=shape)
    img_u8 = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out_hw = (math.ceil(shape[0] * scale), math.ceil(shape[1] * scale))

    out_f = imresize(img_f, scale)
    assert out_f.shape == out_hw + shape[2:]
    np.testing.assert_allclose(
        out_f, _ref_imresize(img_f, out_hw, (scale, scale), True), rtol=0, atol=1e-9
    )
    out_u8 = imresize(img_u8, scale)
    assert out_u8.dtype == np.uint8
    np.testing.assert_array_equal(out_u8, _ref_imresize(img_u8, out_hw, (scale, scale), True))


@pytest.mark.parametrize("out_hw", [(5, 23), (20, 4), (9, 9)])
def test_output_shape_uses_per_axis_scale_and_order(out_hw: tuple[int, int]) -> None:
    # Different scales per axis: the smaller-scale axis goes first, which matters for uint8.
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(10, 8, 3), dtype=np.uint8)
    scales = (out_hw[0] / 10, out_hw[1] / 8)
    out = imresize(img, output_shape=out_hw)
    assert out.shape == (*out_hw, 3)
    np.testing.assert_array_equal(out, _ref_imresize(img, out_hw, scales, True))


def test_no_antialiasing_matches_reference() -> None:
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, size=(12, 10))
    out = imresize(img, 0.25, antialiasing=False)
    np.testing.assert_allclose(out, _ref_imresize(img, (3, 3), (0.25, 0.25), False), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties with hand-derived expected values.
# ---------------------------------------------------------------------------------------------


def test_downscale_impulse_gives_antialiased_kernel() -> None:
    # Width-16 row with a unit impulse at 1-based position 8, shrunk by 0.5. Output j samples
    # u = 2j - 0.5, so the impulse sits at offset u - 8 = 2j - 8.5 in {-2.5, -0.5, 1.5, 3.5} for
    # j = 3..6. The antialiased kernel is cubic(x / 2) / 2 and, away from the border, its taps
    # already sum to one (partition of unity on both half-integer grids). With
    # cubic(t) = 1.5t^3 - 2.5t^2 + 1 (t <= 1) and -0.5t^3 + 2.5t^2 - 4t + 2 (1 < t <= 2):
    #   cubic(0.25) / 2 = 0.8671875 / 2 = 0.43359375     (j = 4, offset -0.5)
    #   cubic(0.75) / 2 = 0.2265625 / 2 = 0.11328125     (j = 5, offset  1.5)
    #   cubic(1.25) / 2 = -0.0703125 / 2 = -0.03515625   (j = 3, offset -2.5)
    #   cubic(1.75) / 2 = -0.0234375 / 2 = -0.01171875   (j = 6, offset  3.5)
    row = np.zeros((1, 16))
    row[0, 7] = 1.0
    expected = [0, 0, -0.03515625, 0.43359375, 0.11328125, -0.01171875, 0, 0]
    np.testing.assert_allclose(imresize(row, 0.5), [expected], rtol=0, atol=1e-15)

    # The same in 2-D is the outer product (separable passes).
    img = np.zeros((16, 16))
    img[7, 7] = 1.0
    np.testing.assert_allclose(imresize(img, 0.5), np.outer(expected, expected), rtol=0, atol=1e-15)


def test_integer_upscale_interpolates_input_samples() -> None:
    # For scale 3, output pixel x (1-based) samples u = x/3 + 1/3, so x = 2, 5, 8, ... land on
    # input pixels 1, 2, 3, ... where the cubic kernel is 1 at 0 and 0 at the other integers.
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 255, size=(6, 7, 3))
    out = imresize(img, 3)
    np.testing.assert_allclose(out[1::3, 1::3], img, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 1.5, 2, 4])
def test_constant_image_stays_constant(scale: float) -> None:
    img = np.full((9, 10, 3), 77.0)
    np.testing.assert_allclose(imresize(img, scale), 77.0, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(imresize(img.astype(np.uint8), scale), 77)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2, 3])
def test_linear_ramp_stays_linear_away_from_border(scale: float) -> None:
    # Keys' a = -0.5 kernel reproduces linear functions, also when stretched for antialiasing
    # (the taps form 1/scale interleaved unit grids, each with zero first moment). So a ramp
    # f(p) = p over 1-based input positions becomes f(u) = x/scale + (1 - 1/scale)/2.
    width = 48
    ramp = np.tile(np.arange(1, width + 1, dtype=np.float64), (3, 1))
    out = imresize(ramp, scale)
    x = np.arange(1, out.shape[1] + 1)
    expected = x / scale + 0.5 * (1 - 1 / scale)
    # Interior: the kernel support (2/scale input pixels when shrinking, 2 otherwise) stays
    # inside the image.
    reach = 2 / min(scale, 1) + 1
    interior = (expected > reach) & (expected < width + 1 - reach)
    assert interior.sum() >= 4
    np.testing.assert_allclose(out[0, interior], expected[interior], rtol=0, atol=1e-10)
    # Near the border the mirrored padding bends the ramp, so it is not linear there.
    assert not np.allclose(out[0, ~interior], expected[~interior])


def test_identity_scale_returns_input() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imresize(img, 1.0), img)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, rounding and validation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_hw", "scale", "out_hw"),
    [
        ((7, 10), 0.5, (4, 5)),  # 3.5 -> 4
        ((5, 7), 1 / 3, (2, 3)),  # 1.67 -> 2, 2.33 -> 3
        ((8, 10), 4 / 3, (11, 14)),  # 10.67 -> 11, 13.33 -> 14
        ((5, 5), 1.5, (8, 8)),  # 7.5 -> 8
        ((12, 12), 1 / 4, (3, 3)),
        ((339, 510), 4, (1356, 2040)),
    ],
)
def test_output_size_is_ceil(in_hw: tuple[int, int], scale: float, out_hw: tuple[int, int]):
    assert imresize(np.zeros(in_hw), scale).shape == out_hw
    assert imresize(np.zeros((*in_hw, 3), np.uint8), scale).shape == (*out_hw, 3)


def test_output_shape_argument() -> None:
    out = imresize(np.zeros((10, 12, 2), np.float32), output_shape=(3, 17))
    assert out.shape == (3, 17, 2)
    assert out.dtype == np.float32


def test_uint8_rounds_half_away_from_zero() -> None:
    # 1 x 2 -> 1 x 1 (scale 0.5): the weights are symmetric about u = 1.5 and the mirrored taps
    # split evenly between the two pixels, so the float result is exactly (a + b) / 2.
    for a, b, expected in [(0, 1, 1), (2, 3, 3), (100, 101, 101), (0, 255, 128)]:
        pair = np.array([[a, b]])
        assert imresize(pair.astype(np.float64), output_shape=(1, 1))[0, 0] == (a + b) / 2
        assert imresize(pair.astype(np.uint8), output_shape=(1, 1))[0, 0] == expected


def test_uint8_clips_overshoot() -> None:
    # Bicubic overshoots at a step edge; MATLAB saturates to [0, 255]. With one row, the row
    # pass is an exact copy, so the uint8 result is the rounded, clipped float result.
    step = np.array([[0, 0, 0, 255, 255, 255]])
    as_float = imresize(step.astype(np.float64), 2)
    assert as_float.min() < 0 and as_float.max() > 255
    as_uint8 = imresize(step.astype(np.uint8), 2)
    np.testing.assert_array_equal(as_uint8, np.floor(np.clip(as_float, 0, 255) + 0.5))
    assert as_uint8.min() == 0 and as_uint8.max() == 255


def test_channels_are_independent() -> None:
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1, size=(9, 8, 3))
    out = imresize(img, 0.5)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], imresize(img[..., c], 0.5), atol=1e-14)


def test_float32_in_float32_out() -> None:
    img = np.random.default_rng(6).uniform(0, 1, size=(8, 8, 3)).astype(np.float32)
    out = imresize(img, 0.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, imresize(img.astype(np.float64), 0.5), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros(5), "scale": 2}, "H x W"),
        ({"image": np.zeros((2, 3, 4, 5)), "scale": 2}, "H x W"),
        ({"image": np.zeros((4, 4), np.int32), "scale": 2}, "dtype"),
        ({"image": np.zeros((4, 4), bool), "scale": 2}, "dtype"),
        ({"image": np.zeros((0, 4)), "scale": 2}, "empty"),
        ({"image": np.zeros((4, 4)), "scale": 0}, "scale"),
        ({"image": np.zeros((4, 4)), "scale": -0.5}, "scale"),
        ({"image": np.zeros((4, 4)), "scale": float("nan")}, "scale"),
        ({"image": np.zeros((4, 4))}, "exactly one"),
        ({"image": np.zeros((4, 4)), "scale": 2, "output_shape": (8, 8)}, "exactly one"),
        ({"image": np.zeros((4, 4)), "output_shape": (0, 3)}, "output_shape"),
        ({"image": np.zeros((4, 4)), "output_shape": (2.5, 3)}, "output_shape"),
        ({"image": np.zeros((4, 4)), "output_shape": (3,)}, "output_shape"),
    ],
)
def test_invalid_input_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        imresize(**kwargs)
