"""onnxruntime inference of exported SR models: whole images or tile by tile into a uint8 image.

:class:`OnnxSR` wraps an ``onnxruntime.InferenceSession`` (CPUExecutionProvider by default) of a
file written by :func:`~lowbitsr.deploy.onnx_export.export_onnx` and reads the scale and RGB range
from its metadata. :func:`upscale_image_onnx` mirrors :func:`lowbitsr.evaluate.upscale_image`
(same tile geometry, :func:`lowbitsr.evaluate._iter_tiles`, same rounding): with ``tile > 0`` each
tile's output is written straight into a preallocated uint8 result, so peak memory is the uint8
output plus the float32 LR image plus one tile's activations. Granular-DQ exports (inputs ``lr``
and ``bits``) run with their bits decided in the graph by default;
:func:`upscale_image_gdq_onnx` is their §2.4 tiled inference (96/90 tiles, a batch of tiles at
mixed bit-widths per call).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError
from ..evaluate import _iter_tiles

__all__ = ["GDQ_MAX_BATCH", "OnnxSR", "upscale_image_gdq_onnx", "upscale_image_onnx"]

#: Tiles per onnxruntime call of :func:`upscale_image_gdq_onnx`. Each sample runs at its own
#: bits, so the batch size does not change the result; 4 tiles keep the peak memory of a
#: 1000×1000 ×4 image at about 0.65 GB (16 tiles: 1.8 GB) at the same speed.
GDQ_MAX_BATCH = 4


class OnnxSR:
    """An exported SR model run by onnxruntime.

    Args:
        path: ``.onnx`` file from :func:`~lowbitsr.deploy.onnx_export.export_onnx`.
        threads: intra-op threads (None: onnxruntime's default, all physical cores).
        providers: execution providers (default CPU only).
        optimization: ``"all"`` (default: includes the NCHWc float-conv layout and the
            QDQ → QLinearConv fusion), ``"extended"``, ``"basic"`` or ``"disable"``.
        mem_arena: onnxruntime's CPU memory arena (default on). Off, buffers are allocated
            as requested: lower peak memory for large inputs, at some speed cost.

    Attributes:
        granular_dq: the file is a Granular-DQ export (inputs ``lr`` and ``bits``, outputs
            ``sr`` and ``bits_used``).
        last_bits: Granular-DQ: ``[N]`` bit-widths of the last call (None before / otherwise).
        scale: upscaling factor (from the file's ``lowbitsr.scale`` metadata).
        rgb_range: value of white (``lowbitsr.rgb_range``, default 255).
        session: the ``onnxruntime.InferenceSession``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        optimization: str = "all",
        mem_arena: bool = True,
    ) -> None:
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise LowbitsrError(f"{p}: ONNX model not found; write one with 'lowbitsr export'")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(
                f"optimization must be one of {', '.join(levels)}, got {optimization!r}"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[optimization]
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        so.enable_cpu_mem_arena = bool(mem_arena)
        try:
            self.session = ort.InferenceSession(str(p), so, providers=list(providers))
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile, ... (pybind11 types)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LowbitsrError(
                f"{p}: onnxruntime cannot load it ({type(exc).__name__}: {first}); is it a "
                "complete .onnx file? Write one with 'lowbitsr export'"
            ) from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.scale = int(meta.get("lowbitsr.scale", "0"))
        self.rgb_range = float(meta.get("lowbitsr.rgb_range", "255"))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.granular_dq = "bits" in {i.name for i in self.session.get_inputs()}
        #: the quantization config the model was exported with (None for float models)
        self.quant: dict | None = json.loads(meta.get("lowbitsr.quant") or "null")
        self.last_bits: np.ndarray | None = None
        if self.scale <= 0:
            raise LowbitsrError(
                f"{p}: no 'lowbitsr.scale' metadata; export the model with "
                "lowbitsr.deploy.export_onnx"
            )

    def __call__(self, lr: np.ndarray, bits: np.ndarray | int | None = None) -> np.ndarray:
        """Super-resolve a batch.

        Args:
            lr: N×3×H×W float32 in [0, rgb_range] (any H, W ≥ 1; converted to contiguous
                float32 if needed).
            bits: Granular-DQ exports only: the bit-width of each sample (``[N]`` or one int;
                0 = decided in the graph, the default). The bits used are kept in
                :attr:`last_bits`.

        Returns:
            N×3×(scale·H)×(scale·W) float32, same range, not clamped.
        """
        x = np.ascontiguousarray(lr, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"OnnxSR: expected an N×3×H×W array, got shape {x.shape}")
        if not self.granular_dq:
            if bits is not None:
                raise ValueError("OnnxSR: bits are only for Granular-DQ exports")
            return self.session.run([self.output_name], {self.input_name: x})[0]
        b = np.broadcast_to(np.asarray(0 if bits is None else bits, dtype=np.int64), x.shape[:1])
        sr, used = self.session.run(
            ["sr", "bits_used"], {self.input_name: x, "bits": np.ascontiguousarray(b)}
        )
        self.last_bits = used
        return sr


def _runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(session, OnnxSR) or (callable(session) and not hasattr(session, "run")):
        return session
    inp = session.get_inputs()[0].name
    out = session.get_outputs()[0].name
    if "bits" in {i.name for i in session.get_inputs()}:  # Granular-DQ: bits decided in-graph
        return lambda x: session.run(
            [out],
            {
                inp: np.ascontiguousarray(x, dtype=np.float32),
                "bits": np.zeros(x.shape[0], np.int64),
            },
        )[0]
    return lambda x: session.run([out], {inp: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _to_uint8(sr: np.ndarray, rgb_range: float) -> np.ndarray:
    """(3, h, w) float → uint8 h×w×3: ``round(sr * 255 / rgb_range)`` (half to even), clipped,
    as :func:`lowbitsr.evaluate._to_uint8`."""
    t = np.rint(sr * np.float32(255.0 / rgb_range))
    return np.clip(t, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def upscale_image_onnx(
    session: OnnxSR | Any,
    image: np.ndarray,
    scale: int | None = None,
    tile: int = 0,
    overlap: int = 16,
    *,
    rgb_range: float | None = None,
) -> np.ndarray:
    """Super-resolve one uint8 H×W×3 image with onnxruntime; returns uint8 (sH)×(sW)×3.

    Mirrors :func:`lowbitsr.evaluate.upscale_image`: tiles are the core boxes of
    :func:`lowbitsr.evaluate.tile_boxes` grown by ``overlap`` LR pixels of context on each side
    (``_iter_tiles``), and only each tile's core is kept. The tiled result equals the
    whole-image one wherever the network's receptive field (in LR pixels, from the core's edge)
    fits inside ``overlap``.

    Args:
        session: an :class:`OnnxSR`, an ``onnxruntime.InferenceSession`` or any callable
            N×3×h×w float32 → N×3×sh×sw.
        image: uint8 H×W×3 RGB.
        scale: upscaling factor (default: ``session.scale``).
        tile: core tile size in LR pixels (0 = whole image in one run).
        overlap: LR context pixels per side.
        rgb_range: the model's value of white (default: ``session.rgb_range`` or 255).

    Returns:
        uint8 array (scale·H)×(scale·W)×3, preallocated and filled tile by tile.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"upscale_image_onnx: expected a uint8 H×W×3 image, got {image.dtype} {image.shape}"
        )
    scale = int(scale if scale is not None else session.scale)
    rng = float(rgb_range if rgb_range is not None else getattr(session, "rgb_range", 255.0))
    run = _runner(session)
    h, w = image.shape[:2]
    lr = image.transpose(2, 0, 1)[None].astype(np.float32)
    if rng != 255.0:
        lr *= np.float32(rng / 255.0)
    if tile <= 0:
        return _to_uint8(run(lr)[0], rng)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    for (y0, y1, x0, x1), (py0, _, px0, _), patch in _iter_tiles(lr, tile, overlap):  # type: ignore[arg-type]
        sr = run(np.ascontiguousarray(patch))[0]
        oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
        core = sr[:, oy : oy + (y1 - y0) * scale, ox : ox + (x1 - x0) * scale]
        out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = _to_uint8(core, rng)
    return out


def upscale_image_gdq_onnx(
    session: OnnxSR,
    image: np.ndarray,
    tile: int = 96,
    step: int = 90,
    *,
    max_batch: int = GDQ_MAX_BATCH,
    bits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Granular-DQ tiled inference (docs/methods.md §2.4) of one uint8 H×W×3 image with onnxruntime.

    The tile geometry and stitching of :func:`lowbitsr.quant.granular_dq.gdq_super_resolve`
    (``tile``×``tile`` LR tiles every ``step`` pixels, the last row/column aligned to the
    border; each tile keeps the region closer to it than to its neighbours). The tiles run in
    batches of up to ``max_batch``, each at its own bit-width in the same batch (the export's
    quantizers select per-sample scales), decided in the graph unless ``bits`` is given.

    Args:
        session: an :class:`OnnxSR` of a Granular-DQ export.
        image: uint8 H×W×3 RGB.
        tile, step: LR tile size and step (``0 < step <= tile``).
        max_batch: tiles per onnxruntime call (memory grows with it; the result does not
            depend on it).
        bits: optional ``[rows, cols]`` (or flat) bit-width of every tile.

    Returns:
        ``(sr, bit_map)``: uint8 (scale·H)×(scale·W)×3 and the ``[rows, cols]`` int64 bits.
    """
    from ..quant.granular_dq.tiling import _own_bounds, gdq_tile_starts

    if not session.granular_dq:
        raise ValueError("upscale_image_gdq_onnx: not a Granular-DQ export")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W×3 image, got {image.dtype} {image.shape}")
    s, rng = session.scale, session.rgb_range
    h, w = image.shape[:2]
    lr = image.transpose(2, 0, 1).astype(np.float32)
    if rng != 255.0:
        lr *= np.float32(rng / 255.0)
    ys, xs = gdq_tile_starts(h, tile, step), gdq_tile_starts(w, tile, step)
    th, tw = min(tile, h), min(tile, w)
    by, bx = _own_bounds(ys, th, h), _own_bounds(xs, tw, w)
    boxes = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    forced = None if bits is None else np.asarray(bits, dtype=np.int64).reshape(-1)
    if forced is not None and forced.size != len(boxes):
        raise ValueError(f"bits: need {len(boxes)} tile bit-widths, got {forced.size}")
    out = np.empty((h * s, w * s, 3), dtype=np.uint8)
    used = np.zeros(len(boxes), dtype=np.int64)
    for a in range(0, len(boxes), max_batch):
        group = boxes[a : a + max_batch]
        batch = np.stack([lr[:, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for i, j in group])
        sr = session(batch, None if forced is None else forced[a : a + len(group)])
        assert session.last_bits is not None
        used[a : a + len(group)] = session.last_bits
        for (i, j), sr_k in zip(group, sr, strict=True):
            y0, y1, x0, x1 = by[i], by[i + 1], bx[j], bx[j + 1]
            oy, ox = (y0 - ys[i]) * s, (x0 - xs[j]) * s
            core = sr_k[:, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
            out[y0 * s : y1 * s, x0 * s : x1 * s] = _to_uint8(core, rng)
    return out, used.reshape(len(ys), len(xs))
