"""Pictures for people: Granular-DQ bit maps.

Colours: 4 bits blue, 5 green, 6 yellow, 8 red (other widths on a blue→red ramp).
:func:`bitmap_panel` (``lowbitsr upscale --bitmap``) puts the untouched image beside its bit map
(each tile's region in its colour, outlined and labelled with its bits) above a legend;
:func:`bitmap_overlay` (the report, which draws its own legend) tints the image itself.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["BIT_COLOURS", "bitmap_overlay", "bitmap_panel"]

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


def _tile_regions(
    image_hw: tuple[int, int],
    bits: np.ndarray,
    lr_size: tuple[int, int],
    tile: int,
    step: int,
) -> list[tuple[int, int, int, int, int]]:
    """``(y0, y1, x0, x1, bits)`` of every tile's own region in image pixels."""
    from .quant.granular_dq.tiling import _own_bounds, gdq_tile_starts

    h, w = lr_size
    fy, fx = image_hw[0] / h, image_hw[1] / w
    ys = _own_bounds(gdq_tile_starts(h, tile, step), min(tile, h), h)
    xs = _own_bounds(gdq_tile_starts(w, tile, step), min(tile, w), w)
    if bits.shape != (len(ys) - 1, len(xs) - 1):
        raise ValueError(f"bit map shape {bits.shape} does not match the tiling of {lr_size}")
    return [
        (
            round(ys[i] * fy),
            round(ys[i + 1] * fy),
            round(xs[j] * fx),
            round(xs[j + 1] * fx),
            int(bits[i, j]),
        )
        for i in range(len(ys) - 1)
        for j in range(len(xs) - 1)
    ]


def bitmap_panel(
    image: np.ndarray,
    bit_map: Tensor | np.ndarray,
    lr_size: tuple[int, int],
    tile: int,
    step: int,
) -> np.ndarray:
    """The image, untouched, beside its Granular-DQ bit map, above a legend.

    Right of the image (same size, so tiles line up with what they cover) each tile's own
    region is filled with the colour of its bit-width, outlined, and labelled with the number
    when it is large enough; the strip below maps every colour to its bit-width with the
    number of tiles and the FAB.

    Args:
        image: uint8 H×W×3, the SR output (any size that is a multiple of ``lr_size``).
        bit_map: (rows, cols) ints, as returned by
            :func:`lowbitsr.quant.granular_dq.gdq_super_resolve`.
        lr_size: (h, w) of the LR image the tiles were cut from.
        tile, step: LR tile size and step used for inference.

    Returns:
        uint8 picture ``(H + legend) × (2W + gap) × 3``; ``[:H, :W]`` is ``image`` unchanged.
    """
    from PIL import Image, ImageDraw, ImageFont

    bits = np.asarray(bit_map.cpu() if isinstance(bit_map, Tensor) else bit_map)
    h, w = image.shape[:2]
    regions = _tile_regions((h, w), bits, lr_size, tile, step)
    gap = max(4, w // 100)
    width = 2 * w + gap
    font_px = int(np.clip(min(h, 2 * w) / 24, 10, 48))
    font = ImageFont.load_default(size=font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # legend: a swatch per bit-width (the standard ones and any other used), its tile count
    used = [int(v) for v in bits.ravel()]
    counts = {b: used.count(b) for b in sorted(set(BIT_COLOURS) | set(used))}
    entries = [(b, f"{b} bit: {n} tile{'' if n == 1 else 's'}") for b, n in counts.items()]
    rows: list[list[tuple[int, int, str]]] = [[]]  # (x, bits, text) per legend row
    x = 4
    for b, text in entries:
        size = font_px + 4 + int(measure.textlength(text, font=font)) + font_px
        if rows[-1] and x + size > width:
            rows.append([])
            x = 4
        rows[-1].append((x, b, text))
        x += size
    fab = float(np.mean(used)) if used else float("nan")
    note = f"left: image; right: bits per tile; FAB {fab:.2f}"
    line = font_px + 6
    canvas = Image.new("RGB", (width, h + line * (len(rows) + 1) + 6), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for y0, y1, x0, x1, b in regions:
        box = (w + gap + x0, y0, w + gap + x1 - 1, y1 - 1)
        draw.rectangle(box, fill=tuple(int(v) for v in _colour(b)), outline=(60, 60, 60))
        label = str(b)
        lw, lh = draw.textbbox((0, 0), label, font=font)[2:]
        if lw + 4 <= x1 - x0 and lh + 4 <= y1 - y0:
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(centre, label, fill=(0, 0, 0), font=font, anchor="mm")
    for r, row in enumerate(rows):
        y = h + 4 + r * line
        for x, b, text in row:
            draw.rectangle((x, y, x + font_px, y + font_px), fill=tuple(int(v) for v in _colour(b)))
            mid = (x + font_px + 4, y + font_px / 2)
            draw.text(mid, text, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((4, h + 4 + len(rows) * line), note, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


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
    from .quant.granular_dq.tiling import _own_bounds, gdq_tile_starts

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
