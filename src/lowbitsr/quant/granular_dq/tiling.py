"""Tiled Granular-DQ inference (docs/methods.md §2.4): the tile grid, one bit-width per tile,
stitching (:func:`gdq_super_resolve`).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import Tensor, nn


def gdq_tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Tile start offsets along one axis: ``0, step, 2 step, ...`` then one tile aligned to the
    far border (so every tile has the same size). A side ``<= tile`` is one tile."""
    if tile <= 0 or step <= 0 or step > tile:
        raise ValueError(f"need 0 < step <= tile, got tile={tile}, step={step}")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def _own_bounds(starts: list[int], tile: int, size: int) -> list[int]:
    """Region boundaries: tile ``i`` keeps ``[b[i], b[i+1])``; a boundary is the middle of the
    two tiles' overlap (for tile 96 / step 90: 3 pixels into the next tile, as released)."""
    bounds = [0]
    for a, b in itertools.pairwise(starts):
        bounds.append((b + min(a + tile, size)) // 2)
    bounds.append(size)
    return bounds


def gdq_tile_regions(
    height: int, width: int, tile: int, step: int
) -> list[tuple[int, int, int, int]]:
    """The LR region each tile of :func:`gdq_super_resolve` fills, ``(y0, y1, x0, x1)``.

    One entry per tile in row-major order (the order of ``bit_map.flatten()``); the regions
    partition the ``height x width`` LR image. Multiply by the scale for the SR region.
    """
    ys, xs = gdq_tile_starts(height, tile, step), gdq_tile_starts(width, tile, step)
    by = _own_bounds(ys, min(tile, height), height)
    bx = _own_bounds(xs, min(tile, width), width)
    return [(by[i], by[i + 1], bx[j], bx[j + 1]) for i in range(len(ys)) for j in range(len(xs))]


@torch.no_grad()
def gdq_super_resolve(
    model: nn.Module,
    lr: Tensor,
    scale: int,
    tile: int = 96,
    step: int = 90,
    *,
    batched: bool = True,
    max_batch: int = 16,
    bits: Tensor | int | None = None,
) -> tuple[Tensor, Tensor]:
    """Granular-DQ tiled inference (docs/methods.md §2.4): each LR tile at its own bit-width.

    The image is split into ``tile x tile`` LR tiles every ``step`` pixels (the last row/column
    aligned to the border, so all tiles have one size). Stitching: each tile keeps its own
    region, the part of the image closer to it than to its neighbour, i.e. overlaps are split
    at their middle (same rule as the released code's ``combine``; no blending).

    ``batched=True``: the bits of all tiles are decided first (``model.decide_image_bits``:
    each tile alone, or with ``config.image_fab`` all tiles together under per-image rate
    control), then the tiles of each bit-width run together (batches of at most ``max_batch``,
    bits forced to the decision). ``batched=False``: one tile per forward, the model deciding
    itself (the released code's loop; the benchmark's baseline; under rate control the bits
    are decided together first). A model without ``decide_bits`` (a float model)
    runs at 32 bits. Both ways give the same bit map and the same image, bit for bit in float64;
    in float32 a conv rounds differently for batch 1 and batch N (about 1e-7 relative), which
    a quantizer can turn into a one-level step at a few pixels.

    Call ``model.eval()`` first.

    Args:
        model: a :class:`GranularDQModel` (or any SR model ``[N, 3, h, w] -> [N, 3, sh, sw]``).
        lr: ``[1, 3, H, W]`` RGB in ``[0, rgb_range]`` on the model's device.
        scale: the model's upscaling factor.
        tile, step: tile size and step in LR pixels (``0 < step <= tile``).
        batched: group tiles by bit-width (True) or run them one by one.
        max_batch: largest number of tiles per forward.
        bits: run with this bit map instead of the model's decisions: an int (every tile) or
            ``[n_rows, n_cols]`` (e.g. a ``bit_map`` of an earlier call, or an allocation to
            compare against the controller's). Batched mode only; the model must have
            ``force_bits``.

    Returns:
        ``(sr, bit_map)``: ``sr`` ``[1, 3, sH, sW]`` (not clamped); ``bit_map``
        ``[n_rows, n_cols]`` int64 on the CPU, the bit-width of every tile. The image's FAB is
        :func:`~lowbitsr.quant.bitops.fab` ``(bit_map)``.
    """
    if lr.dim() != 4 or lr.shape[0] != 1:
        raise ValueError(f"gdq_super_resolve takes one image [1, 3, H, W], got {tuple(lr.shape)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    _, c, h, w = lr.shape
    ys, xs = gdq_tile_starts(h, tile, step), gdq_tile_starts(w, tile, step)
    th, tw = min(tile, h), min(tile, w)
    by, bx = _own_bounds(ys, th, h), _own_bounds(xs, tw, w)
    boxes = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    out = lr.new_empty((1, c, h * scale, w * scale))
    s = scale

    def crop(k: int) -> Tensor:
        i, j = boxes[k]
        return lr[0, :, ys[i] : ys[i] + th, xs[j] : xs[j] + tw]

    def place(k: int, sr: Tensor) -> None:
        i, j = boxes[k]
        y0, y1, x0, x1 = by[i], by[i + 1], bx[j], bx[j + 1]
        oy, ox = (y0 - ys[i]) * s, (x0 - xs[j]) * s
        out[0, :, y0 * s : y1 * s, x0 * s : x1 * s] = sr[
            :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
        ]

    n = len(boxes)
    decide = getattr(model, "decide_bits", None)
    force = getattr(model, "force_bits", None)
    given = bits
    bits = torch.full((n,), 32, dtype=torch.long)
    if given is not None:
        if not batched or not callable(force):
            raise ValueError("gdq_super_resolve: bits= needs batched=True and a Granular-DQ model")
        given = torch.as_tensor(given, dtype=torch.long).cpu()
        if given.dim() == 0:
            given = given.expand(n)
        elif tuple(given.shape) != (len(ys), len(xs)):
            raise ValueError(
                f"gdq_super_resolve: bits must be an int or of shape {(len(ys), len(xs))} "
                f"(the tile grid), got {tuple(given.shape)}"
            )
        bits = given.flatten().clone()
    decide_image = getattr(model, "decide_image_bits", None)
    joint = getattr(getattr(model, "config", None), "image_fab", None) is not None
    if not batched:
        if joint and callable(decide_image) and callable(force):
            # per-image rate control decides all tiles together, then each runs alone
            bits = decide_image(torch.stack([crop(k) for k in range(n)]), max_batch)
        for k in range(n):
            with force(int(bits[k])) if joint else contextlib.nullcontext():
                out_k = model(crop(k)[None])
            last = getattr(model, "last_bits", None)
            if last is not None:
                bits[k] = int(last[0])
            place(k, out_k[0])
        return out, bits.view(len(ys), len(xs))
    tiles = torch.stack([crop(k) for k in range(n)])
    if given is None and callable(decide_image) and callable(force):
        bits = decide_image(tiles, max_batch)
    elif given is None and callable(decide) and callable(force):
        bits = torch.cat([decide(tiles[a : a + max_batch]).cpu() for a in range(0, n, max_batch)])
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(bits == b).flatten().tolist()
        for a in range(0, len(idx), max_batch):
            group = idx[a : a + max_batch]
            batch = tiles[group]
            ctx = force(b) if callable(force) and callable(decide) else contextlib.nullcontext()
            with ctx:
                sr = model(batch)
            for k, sr_k in zip(group, sr, strict=True):
                place(k, sr_k)
    return out, bits.view(len(ys), len(xs))
