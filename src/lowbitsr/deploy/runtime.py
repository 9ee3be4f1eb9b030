"""onnxruntime inference of exported SR models: whole images or tile by tile into a uint8 image.

:class:`OnnxSR` wraps an ``onnxruntime.InferenceSession`` (CPUExecutionProvider by default) of a
file written by :func:`~lowbitsr.deploy.onnx_export.export_onnx` and reads the scale and RGB range
from its metadata. :func:`upscale_image_onnx` mirrors :func:`lowbitsr.evaluate.upscale_image`
(same tile geometry, :func:`lowbitsr.evaluate._iter_tiles`, same rounding): with ``tile > 0`` each
tile's output is written straight into a preallocated uint8 result, so peak memory is the uint8
output plus the float32 LR image plus one tile's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError
from ..evaluate import _iter_tiles

__all__ = ["OnnxSR", "upscale_image_onnx"]


class OnnxSR:
    """An exported SR model run by onnxruntime.

    Args:
        path: ``.onnx`` file from :func:`~lowbitsr.deploy.onnx_export.export_onnx`.
        threads: intra-op threads (None: onnxruntime's default, all physical cores).
        providers: execution providers (default CPU only).
        optimization: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.

    Attributes:
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
        self.session = ort.InferenceSession(str(p), so, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.scale = int(meta.get("lowbitsr.scale", "0"))
        self.rgb_range = float(meta.get("lowbitsr.rgb_range", "255"))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        if self.scale <= 0:
            raise LowbitsrError(
                f"{p}: no 'lowbitsr.scale' metadata; export the model with "
                "lowbitsr.deploy.export_onnx"
            )

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        """Super-resolve a batch.

        Args:
            lr: N×3×H×W float32 in [0, rgb_range] (any H, W ≥ 1; converted to contiguous
                float32 if needed).

        Returns:
            N×3×(scale·H)×(scale·W) float32, same range, not clamped.
        """
        x = np.ascontiguousarray(lr, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"OnnxSR: expected an N×3×H×W array, got shape {x.shape}")
        return self.session.run([self.output_name], {self.input_name: x})[0]


def _runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(session, OnnxSR) or (callable(session) and not hasattr(session, "run")):
        return session
    inp = session.get_inputs()[0].name
    out = session.get_outputs()[0].name
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
