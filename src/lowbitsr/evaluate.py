"""Inference (whole-image or tiled) and benchmark evaluation with the standard SR protocol.

Protocol (docs/evaluation.md §1): the SR output is rounded to integers in [0, 255]; PSNR and SSIM
are measured on the Y channel (BT.601, MATLAB coefficients) after cropping ``scale`` pixels from
every border; the HR image is cropped to LR size × scale by the dataset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .imresize import imresize
from .metrics import psnr, ssim

__all__ = [
    "DEFAULT_EVAL_TILE",
    "Bicubic",
    "EvalResult",
    "ImageResult",
    "evaluate",
    "format_table",
    "has_input_wide_statistics",
    "receptive_radius",
    "super_resolve",
    "tile_boxes",
    "upscale_image",
]


#: Default LR tile side of :func:`evaluate` (and ``lowbitsr eval --tile``). Images up to this
#: size run whole; larger ones tile by tile with the model's receptive field as overlap, which
#: bounds memory (about 1 GB for a ×4 EDSR-tiny on a 1000×1000 LR image instead of 5.4 GB) and
#: gives the whole-image output for every model whose layers see only their neighbourhood
#: (float, PAMS, DDTB without gates). DDTB's dynamic gates pool over the input, so on images
#: larger than a tile they see each tile's statistics: pass ``tile=0`` for the whole-image
#: protocol. Granular-DQ models always use their own tiling.
DEFAULT_EVAL_TILE = 384


class Bicubic(nn.Module):
    """The bicubic baseline as a "model": MATLAB-compatible bicubic upscaling.

    Input (N, 3, H, W) float in [0, 255]; output (N, 3, sH, sW) float in [0, 255] (uint8-valued).
    """

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.model_config = {"name": "bicubic", "scale": scale}
        #: LR pixels an output pixel depends on, on each side (the cubic kernel's 2 taps)
        self.receptive_radius = 2

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        out = []
        for img in lr:
            arr = img.clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8).cpu().numpy()
            up = imresize(arr, float(self.scale))
            out.append(torch.from_numpy(up).permute(2, 0, 1).float())
        return torch.stack(out).to(lr.device)


def tile_boxes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping core boxes ``(y0, y1, x0, x1)``, at most ``tile`` pixels, covering the image.

    The grid is regular except the last row/column, which is shorter; boxes are in row-major order.
    """
    if tile <= 0:
        return [(0, height, 0, width)]
    ys = list(range(0, height, tile))
    xs = list(range(0, width, tile))
    return [(y, min(y + tile, height), x, min(x + tile, width)) for y in ys for x in xs]


def receptive_radius(model: nn.Module) -> int:
    """LR pixels on each side that one output pixel of ``model`` may depend on (an upper bound).

    The sum of ``dilation * (kernel - 1) // 2`` over the convolutions (the larger of the two
    axes), counting those that run after upsampling as if they ran at LR resolution. Convs
    inside DDTB's dynamic gates are skipped: a gate sees the globally pooled input, not a
    neighbourhood. A model may state its own radius in a ``receptive_radius`` attribute.

    Tiles grown by this many pixels of context (``overlap``) reproduce the whole-image output.
    """
    own = getattr(model, "receptive_radius", None)
    if isinstance(own, int):
        return own
    skip: set[int] = set()
    for m in model.modules():
        if type(m).__name__ == "DynamicGate":
            skip.update(id(c) for c in m.modules())
    radius = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in skip:
            radius += max(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))
    return radius


def has_input_wide_statistics(model: nn.Module) -> bool:
    """Whether some layer of ``model`` pools over its whole input (DDTB's dynamic gates), so
    that a tile's output depends on the rest of the tile and tiling changes the result."""
    return any(type(m).__name__ == "DynamicGate" for m in model.modules())


def _overlap(model: nn.Module, overlap: int | None) -> int:
    return receptive_radius(model) if overlap is None else overlap


def _iter_tiles(
    lr: torch.Tensor, tile: int, overlap: int
) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int, int], torch.Tensor]]:
    """Yield ``(core_box, padded_box, lr_patch)``: core box grown by ``overlap``."""
    h, w = lr.shape[-2:]
    for y0, y1, x0, x1 in tile_boxes(h, w, tile):
        py0, py1 = max(0, y0 - overlap), min(h, y1 + overlap)
        px0, px1 = max(0, x0 - overlap), min(w, x1 + overlap)
        yield (y0, y1, x0, x1), (py0, py1, px0, px1), lr[..., py0:py1, px0:px1]


@torch.no_grad()
def super_resolve(
    model: nn.Module,
    lr: torch.Tensor,
    scale: int,
    *,
    tile: int = 0,
    overlap: int | None = 16,
) -> torch.Tensor:
    """Run ``model`` on ``lr``, optionally tile by tile to bound memory.

    Args:
        model: maps (N, 3, h, w) → (N, 3, scale·h, scale·w), values in [0, rgb_range].
        lr: (N, 3, H, W) float tensor on the model's device.
        scale: the model's upscaling factor.
        tile: core tile size in LR pixels (0 = whole image in one pass).
        overlap: LR pixels of context added on each side of a tile and discarded after the
            forward pass; tiled output equals the whole-image output wherever the network's
            receptive field fits in the overlap, and differs slightly near tile seams otherwise.
            None: :func:`receptive_radius` of the model.
    Returns:
        (N, 3, scale·H, scale·W) float tensor (not rounded or clamped).
    """
    if tile <= 0:
        return model(lr)
    n, c, h, w = lr.shape
    out = lr.new_empty((n, c, h * scale, w * scale))
    for (y0, y1, x0, x1), (py0, _, px0, _), patch in _iter_tiles(
        lr, tile, _overlap(model, overlap)
    ):
        sr = model(patch)
        oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
        out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] = sr[
            ..., oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale
        ]
    return out


def _to_uint8(sr: torch.Tensor, rgb_range: float = 255.0) -> np.ndarray:
    """(3, H, W) float in [0, rgb_range] → uint8 H×W×3 (rounded, clipped)."""
    t = (sr * (255.0 / rgb_range)).round().clamp(0, 255).to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def upscale_image(
    model: nn.Module,
    image: np.ndarray,
    scale: int,
    *,
    tile: int = 0,
    overlap: int | None = 16,
    device: str | torch.device = "cpu",
    rgb_range: float = 255.0,
) -> np.ndarray:
    """Super-resolve one uint8 H×W×3 image; returns uint8 (scale·H)×(scale·W)×3.

    With ``tile > 0`` only one tile's activations live at a time and each tile's output is
    written straight into the uint8 result, so peak memory is the output image plus one tile.
    ``overlap=None`` takes the model's :func:`receptive_radius` (whole-image result).
    """
    lr = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    lr = lr * (rgb_range / 255.0)
    return _super_resolve_uint8(model, lr, scale, tile, overlap, device, rgb_range)


def _super_resolve_uint8(
    model: nn.Module,
    lr: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int | None,
    device: str | torch.device,
    rgb_range: float,
) -> np.ndarray:
    """``(1, 3, H, W)`` LR in [0, rgb_range] → uint8 SR image, tile by tile into the result."""
    h, w = lr.shape[-2:]
    if tile <= 0:
        return _to_uint8(model(lr.to(device))[0], rgb_range)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    for (y0, y1, x0, x1), (py0, _, px0, _), patch in _iter_tiles(
        lr, tile, _overlap(model, overlap)
    ):
        sr = model(patch.to(device))[0]
        oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
        core = sr[:, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale]
        out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = _to_uint8(core, rgb_range)
    return out


@dataclass
class ImageResult:
    """Metrics of one image (PSNR in dB, SSIM in [0, 1])."""

    name: str
    psnr: float
    ssim: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """All per-image results of one model on one dataset, with their means."""

    model: str
    dataset: str
    scale: int
    images: list[ImageResult]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def psnr(self) -> float:
        """Mean PSNR over images (dB); ``inf`` entries are skipped."""
        vals = [r.psnr for r in self.images if math.isfinite(r.psnr)]
        return float(np.mean(vals)) if vals else float("inf")

    @property
    def fab(self) -> float:
        """Mean feature average bit-width over images (32 for float models)."""
        if not self.images or any("fab" not in r.extra for r in self.images):
            return float("nan")
        return self.extra_mean("fab")

    @property
    def ssim(self) -> float:
        """Mean SSIM over images."""
        return float(np.mean([r.ssim for r in self.images]))

    def extra_mean(self, key: str) -> float:
        """Mean of a per-image extra metric (e.g. ``fab``)."""
        return float(np.mean([r.extra[key] for r in self.images]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with per-image rows and the means."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "scale": self.scale,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "fab": self.fab,
            "info": self.info,
            "images": [asdict(r) for r in self.images],
        }

    def save_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` (parent folders created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2))


def static_bits(model: nn.Module) -> float:
    """Activation bit-width (FAB) of a static model: 32 for float models, ``bits`` for DDTB/PAMS;
    with the integer layout's ``stream_bits`` the mean over the block convs' inputs,
    ``(stream_bits + bits) / 2`` (conv1 reads the stream, conv2 the k-bit ReLU). As for the
    papers' FAB, the head, upsampler and tail are not counted; BitOPs count every layer."""
    q = getattr(model, "quant_config_dict", None) or {}
    bits = float(q.get("bits", 32))
    stream = q.get("stream_bits")
    return (float(stream) + bits) / 2 if stream else bits


def is_dynamic_bits(model: nn.Module) -> bool:
    """Whether ``model`` picks bits per patch (Granular-DQ): it then runs tile by tile."""
    return hasattr(model, "decide_bits")


@torch.no_grad()
def model_cost(model: nn.Module, fab: float, patch: int = 64) -> dict[str, Any]:
    """BitOPs of one ``patch``×``patch`` LR input at feature average bit-width ``fab``.

    Static models are counted as they are. For Granular-DQ every quantized layer of a patch uses
    the same bits and BitOPs are linear in the activation bits, so the mean BitOPs over patches
    equals the BitOPs at the mean bit-width: interpolated between two forced bit-widths.
    """
    from .quant.bitops import BITOPS_FORMULA, count_bitops

    if isinstance(model, Bicubic):
        return {"gbitops": float("nan"), "formula": BITOPS_FORMULA}
    shape = (1, 3, patch, patch)
    if not is_dynamic_bits(model):
        c = count_bitops(model, shape)
        return {"gbitops": c["gbitops"], "gmacs": c["macs"] / 1e9, "formula": c["formula"]}
    lo, hi = min(model.ctx.candidates), max(model.ctx.candidates)
    with model.force_bits(lo):
        c_lo = count_bitops(model, shape)
    with model.force_bits(hi):
        c_hi = count_bitops(model, shape)
    g = c_lo["gbitops"] + (fab - lo) * (c_hi["gbitops"] - c_lo["gbitops"]) / (hi - lo)
    return {"gbitops": g, "gmacs": c_lo["macs"] / 1e9, "formula": c_lo["formula"]}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    scale: int,
    *,
    model_name: str = "model",
    dataset_name: str = "dataset",
    crop_border: int | None = None,
    tile: int = DEFAULT_EVAL_TILE,
    overlap: int | None = None,
    device: str | torch.device = "cpu",
    rgb_range: float = 255.0,
    progress: bool = True,
    save_dir: str | Path | None = None,
    sharded: bool = True,
    skip_unreadable: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on every image of ``dataset``.

    In a ``torch.distributed`` job (and ``sharded``), rank ``r`` of ``N`` evaluates images
    ``r, r+N, ...`` and the rows are gathered in dataset order on every rank, so the result equals
    a single process's. Every rank must call it then.

    Args:
        model: SR model taking (1, 3, h, w) in [0, rgb_range].
        dataset: yields ``{"lr": (3,h,w), "hr": (3,sh,sw), "name": str}`` in [0, 255].
        scale: upscaling factor; also the default ``crop_border``.
        tile, overlap: see :func:`super_resolve`; by default tiles of :data:`DEFAULT_EVAL_TILE`
            LR pixels with the model's :func:`receptive_radius` as overlap, which gives the
            whole-image output of models without input-wide statistics in bounded memory
            (``tile=0``: whole images).
        save_dir: if given, each SR output is written there as ``<name>.png``.
        sharded: split the images over the ranks of a ``torch.distributed`` job.
        skip_unreadable: an image that cannot be read (:class:`~lowbitsr.errors.ImageError`)
            is left out and listed in ``info["skipped"]`` (``{"name", "error"}`` rows) instead
            of stopping the evaluation.
    Returns:
        :class:`EvalResult` with PSNR/SSIM (Y channel, border cropped) and FAB (feature average
        bit-width; 32 for float models) per image, and ``info`` with BitOPs per 64×64 LR patch,
        the ``tile`` and ``overlap`` used and, for a model with
        :func:`has_input_wide_statistics`, ``tiled_approximately``: the names of the images
        larger than a tile (their numbers differ slightly from whole-image inference).
        Granular-DQ models run tile by tile at their own tile size and step (docs/methods.md §2.4).
    """
    from .data import write_image
    from .distributed import all_gather_objects, shard
    from .errors import ImageError
    from .quant.bitops import fab

    crop = scale if crop_border is None else crop_border
    was_training = model.training
    model.eval()
    rows: list[tuple[int, ImageResult]] = []
    skipped: list[tuple[int, dict[str, str]]] = []
    approximate: list[tuple[int, str]] = []  # tiled images of a model with input-wide stats
    gated = tile > 0 and not is_dynamic_bits(model) and has_input_wide_statistics(model)
    indices = shard(range(len(dataset))) if sharded else list(range(len(dataset)))
    it = tqdm(indices, desc=f"eval {model_name}", disable=not progress, leave=False)
    names = getattr(dataset, "names", None)
    for i in it:
        try:
            item = dataset[i]
        except ImageError as exc:
            if not skip_unreadable:
                raise
            name = names[i] if names is not None and i < len(names) else str(i)
            skipped.append((i, {"name": name, "error": str(exc)}))
            continue
        name = item["name"]
        lr = item["lr"][None].to(device) * (rgb_range / 255.0)
        hr8 = item["hr"].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        del item  # the float HR image is not needed any more: free it before inference
        if is_dynamic_bits(model):
            from .quant.granular_dq import gdq_super_resolve

            gcfg = model.config
            sr, bit_map = gdq_super_resolve(model, lr, scale, gcfg.tile, gcfg.tile_step)
            sr8, image_fab = _to_uint8(sr[0], rgb_range), fab(bit_map)
            del sr
        else:
            sr8 = _super_resolve_uint8(model, lr, scale, tile, overlap, device, rgb_range)
            image_fab = static_bits(model)
            if gated and max(lr.shape[-2:]) > tile:
                approximate.append((i, name))
        del lr
        row = ImageResult(
            name,
            psnr(sr8, hr8, crop_border=crop),
            ssim(sr8, hr8, crop_border=crop),
            {"fab": float(image_fab)},
        )
        rows.append((i, row))
        if save_dir is not None:
            write_image(Path(save_dir) / f"{name}.png", sr8)
        del sr8, hr8
    model.train(was_training)
    if sharded:
        parts = all_gather_objects((rows, skipped, approximate))
        rows = [r for part, _, _ in parts for r in part]
        skipped = [s for _, part, _ in parts for s in part]
        approximate = [a for _, _, part in parts for a in part]
    ordered = [r for _, r in sorted(rows, key=lambda ir: ir[0])]
    result = EvalResult(model_name, dataset_name, scale, ordered)
    if not is_dynamic_bits(model):
        result.info["tile"] = tile
        result.info["overlap"] = _overlap(model, overlap) if tile > 0 else 0
    if approximate:
        result.info["tiled_approximately"] = [n for _, n in sorted(approximate)]
    if skipped:
        result.info["skipped"] = [s for _, s in sorted(skipped, key=lambda x: x[0])]
    if ordered and not isinstance(model, Bicubic):
        result.info.update(model_cost(model, result.extra_mean("fab")))
    return result


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a Markdown table (floats with 2–4 decimals)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isinf(v):
                return "inf"
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])
