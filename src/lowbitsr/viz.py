"""Pictures for people: Granular-DQ bit maps drawn over an image.

Colours: 4 bits blue, 5 green, 6 yellow, 8 red (other widths on a blue→red ramp), blended at
``alpha`` over the image, with each tile's own region outlined.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["BIT_COLOURS", "bitmap_overlay"]

BIT_COLOURS: dict[int, tuple[int, int, int]] = {
    4: (40, 90, 255),
    5: (40, 200, 80),
    6: (250, 220, 40),
    8: (240, 40, 40),
}


def _colour(bits: int) -> np.ndarray:
    if bits in BIT_COLOURS:
        return np.array(BIT_COLOURS[bits], dtype=float)
    t = float(np.clip((bits - 4) / 4, 0, 1))
    return np.array([40 + 200 * t, 90 * (1 - t), 255 * (1 - t)])


def bitmap_overlay(
    image: np.ndarray,
    bit_map: Tensor | np.ndarray,
    lr_size: tuple[int, int],
    tile: int,
    step: int,
    alpha: float = 0.35,
) -> np.ndarray:
    """Tint each tile's region of ``image`` by the bits it ran at.

    Args:
        image: uint8 H×W×3, the SR output (or any image covering the same area; its size may be
            a multiple of ``lr_size``).
        bit_map: (rows, cols) ints, as returned by
            :func:`lowbitsr.quant.granular_dq.gdq_super_resolve`.
        lr_size: (h, w) of the LR image the tiles were cut from.
        tile, step: LR tile size and step used for inference.
        alpha: tint opacity in [0, 1].
    Returns:
        uint8 H×W×3 picture.
    """
    from .quant.granular_dq import _own_bounds, gdq_tile_starts

    bits = np.asarray(bit_map.cpu() if isinstance(bit_map, Tensor) else bit_map)
    h, w = lr_size
    fy, fx = image.shape[0] / h, image.shape[1] / w
    ys = _own_bounds(gdq_tile_starts(h, tile, step), tile, h)
    xs = _own_bounds(gdq_tile_starts(w, tile, step), tile, w)
    if bits.shape != (len(ys) - 1, len(xs) - 1):
        raise ValueError(f"bit map shape {bits.shape} does not match the tiling of {lr_size}")
    out = image.astype(float)
    for i in range(len(ys) - 1):
        for j in range(len(xs) - 1):
            y0, y1 = round(ys[i] * fy), round(ys[i + 1] * fy)
            x0, x1 = round(xs[j] * fx), round(xs[j + 1] * fx)
            region = out[y0:y1, x0:x1]
            region[:] = (1 - alpha) * region + alpha * _colour(int(bits[i, j]))
            region[0, :] = region[:, 0] = 255  # tile outline
    return np.clip(out.round(), 0, 255).astype(np.uint8)
