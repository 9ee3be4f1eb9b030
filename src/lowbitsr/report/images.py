"""Crops and SR images: where the models differ most (:func:`choose_crop`), SR images read
or re-computed, crop and Granular-DQ bit-map figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError
from .plots import _figure, _save
from .records import _PSNR_TOLERANCE_DB, EvalRecord, ReportError

# --------------------------------------------------------------------------- crops and SR


def _luma(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float64)
    return 16.0 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255.0


def _window_means(a: np.ndarray, size: int) -> np.ndarray:
    """Means of every ``size``×``size`` window of a 2-D array (integral image)."""
    c = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    s = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    return s / (size * size)


def choose_crop(
    hr: np.ndarray, srs: Sequence[np.ndarray], size: int, border: int = 0
) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size``×``size`` crop that shows the models' differences best.

    With two or more SR images: the window where their Y-channel MSEs against ``hr`` differ
    most (max minus min over models). With fewer: the window of highest HR gradient energy.
    Windows stay ``border`` pixels away from the image edges when the image allows it.

    Args:
        hr: uint8 H×W×3 ground truth.
        srs: uint8 H×W×3 SR images of the same size.
        size: crop side in HR pixels (clipped to the image).
        border: pixels to keep clear of each edge (usually the scale).
    """
    h, w = hr.shape[:2]
    size = min(size, h, w)
    y_hr = _luma(hr)
    if len(srs) >= 2:
        mse = np.stack([_window_means((_luma(s) - y_hr) ** 2, size) for s in srs])
        score = mse.max(0) - mse.min(0)
    else:
        gy, gx = np.gradient(y_hr)
        score = _window_means(gy**2 + gx**2, size)
    b = border if h - size - 2 * border >= 0 and w - size - 2 * border >= 0 else 0
    sub = score[b : h - size - b + 1, b : w - size - b + 1]
    iy, ix = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(iy) + b, int(ix) + b


@dataclass
class _SR:
    image: np.ndarray | None = None
    bit_map: Any = None
    tiling: tuple[int, int] | None = None  # (tile, step) of Granular-DQ
    candidates: tuple[int, ...] = ()
    source: str = ""
    psnr: float = math.nan


class _Renderer:
    """Loads each record's model once and produces its SR image of a dataset image."""

    def __init__(self, overrides: dict[str, str], device: str, notes: list[str]) -> None:
        self.overrides = overrides
        self.device = device
        self.notes = notes
        self.models: dict[Path, Any] = {}

    def spec(self, rec: EvalRecord) -> str | None:
        from ..pretrained import list_pretrained

        if rec.model in self.overrides:
            return self.overrides[rec.model]
        if rec.info.get("model_spec"):
            return str(rec.info["model_spec"])
        if rec.kind == "bicubic":
            return "bicubic"
        if rec.model in list_pretrained():
            return f"pretrained:{rec.model}"
        return None

    def model(self, rec: EvalRecord) -> Any:
        if rec.path in self.models:
            return self.models[rec.path]
        from ..specs import load_any_model

        spec = self.spec(rec)
        model = None
        if spec is None:
            self.notes.append(
                f"{rec.model}: no model spec recorded in `{rec.path}` (older eval JSON); pass "
                f"`--model {rec.model}=SPEC` to show its images"
            )
        else:
            try:
                model = load_any_model(spec, rec.scale)[0]
                if model.model_config["scale"] != rec.scale:
                    raise ReportError(f"{spec} is a x{model.model_config['scale']} model")
                if hasattr(model, "to"):
                    model = model.to(self.device).eval()
            except Exception as exc:  # any failure becomes a note; the report goes on
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.notes.append(f"{rec.model}: cannot load `{spec}`: {msg}")
                model = None
        self.models[rec.path] = model
        return model

    def saved_image(self, rec: EvalRecord, name: str) -> Path | None:
        dirs = [Path(rec.info["sr_dir"])] if rec.info.get("sr_dir") else []
        dirs += [rec.path.parent / rec.path.stem, rec.path.parent / rec.model]  # demo layout
        return next((d / f"{name}.png" for d in dirs if (d / f"{name}.png").is_file()), None)

    def render(self, rec: EvalRecord, name: str, lr: np.ndarray, hr: np.ndarray) -> _SR:
        from ..data import read_image
        from ..metrics import psnr

        row = rec.image(name)
        want = row["psnr"] if row else math.nan
        saved = self.saved_image(rec, name)
        if saved is not None and (not rec.dynamic or self.model(rec) is None):
            try:
                img = read_image(saved)
                if img.shape == hr.shape:
                    p = psnr(img, hr, crop_border=rec.scale)
                    if not math.isfinite(want) or abs(p - want) <= _PSNR_TOLERANCE_DB:
                        return _SR(img, source=f"saved `{saved}`", psnr=p)
            except LowbitsrError:
                pass
        model = self.model(rec)
        if model is None:
            return _SR(source="unavailable")
        try:
            out = self._run(model, rec, lr)
        except Exception as exc:  # any failure becomes a note; the report goes on
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.notes.append(f"{rec.model}: failed on {name}: {msg}")
            return _SR(source="unavailable")
        if out.image is None or out.image.shape != hr.shape:
            self.notes.append(f"{rec.model}: SR image of {name} has the wrong size")
            return _SR(source="unavailable")
        out.psnr = psnr(out.image, hr, crop_border=rec.scale)
        if math.isfinite(want) and abs(out.psnr - want) > _PSNR_TOLERANCE_DB:
            self.notes.append(
                f"{rec.model}: re-computed {name} gives {out.psnr:.2f} dB but `{rec.path.name}` "
                f"says {want:.2f} dB (model or data changed since the evaluation?)"
            )
        return out

    def _run(self, model: Any, rec: EvalRecord, lr: np.ndarray) -> _SR:
        import torch

        from ..evaluate import _to_uint8, is_dynamic_bits, upscale_image

        if is_dynamic_bits(model):
            from ..quant.granular_dq import gdq_super_resolve

            cfg = model.config
            x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                sr, bit_map = gdq_super_resolve(
                    model, x.to(self.device), rec.scale, cfg.tile, cfg.tile_step
                )
            return _SR(
                _to_uint8(sr[0]),
                bit_map.cpu().numpy(),
                (cfg.tile, cfg.tile_step),
                tuple(cfg.candidates),
                "re-computed",
            )
        rgb_range = float(getattr(model, "model_config", {}).get("rgb_range", 255.0))
        tile = int(rec.info.get("tile", 0) or 0)
        overlap = rec.info.get("overlap")  # as eval ran it (None: the model's receptive field)
        img = upscale_image(
            model,
            lr,
            rec.scale,
            tile=tile,
            overlap=overlap if isinstance(overlap, int) else None,
            device=self.device,
            rgb_range=rgb_range,
        )
        return _SR(img, source="re-computed")


def _crop_figure(
    image: str,
    hr: np.ndarray,
    panels: list[tuple[str, np.ndarray | None, str]],
    yx: tuple[int, int],
    size: int,
    title: str,
    path: Path,
) -> Path:
    from matplotlib.patches import Rectangle

    y, x = yx
    n = len(panels) + 1
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(2.45 * ncols, 2.85 * nrows + 0.3)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes:
        ax.set_axis_off()
    ax0 = axes[0]
    ax0.imshow(hr, interpolation="antialiased")
    ax0.add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, ec="red", lw=1.6))
    ax0.set_title(
        f"{image} HR {hr.shape[1]}×{hr.shape[0]}\ncrop {size}×{size} at x={x}, y={y}", fontsize=8.5
    )
    for ax, (label, img, sub) in zip(axes[1:], panels, strict=False):
        if img is None:
            ax.text(
                0.5,
                0.5,
                "not available\n(see notes)",
                ha="center",
                va="center",
                fontsize=9,
                color="0.4",
                transform=ax.transAxes,
            )
            ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, ec="0.7", transform=ax.transAxes))
        else:
            ax.imshow(img[y : y + size, x : x + size], interpolation="nearest")
        ax.set_title(f"{label}\n{sub}" if sub else label, fontsize=8.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=1.4)
    return _save(fig, path)


def _bitmap_figure(
    label: str,
    image: str,
    sr: _SR,
    lr_size: tuple[int, int],
    title: str,
    path: Path,
) -> Path:
    from matplotlib.patches import Patch

    from ..quant.bitops import fab
    from ..viz import _colour, bitmap_overlay

    tile, step = sr.tiling or (0, 0)
    pic = bitmap_overlay(sr.image, sr.bit_map, lr_size, tile, step, alpha=0.4)
    bits = np.asarray(sr.bit_map).ravel()
    cands = sorted(set(sr.candidates) | {int(b) for b in bits})
    counts = [int((bits == b).sum()) for b in cands]
    aspect = pic.shape[1] / pic.shape[0]
    fig = _figure(4.4 * min(max(aspect, 0.7), 1.8) + 3.4, 4.6)
    gs = fig.add_gridspec(1, 2, width_ratios=[min(max(aspect, 0.7), 1.8) * 1.4, 1.0])
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(pic, interpolation="antialiased")
    ax.set_axis_off()
    ax.set_title(f"{label} on {image}: FAB {fab(sr.bit_map):.2f} bits", fontsize=9.5)
    colours = [np.asarray(_colour(b)) / 255.0 for b in cands]
    ax.legend(
        handles=[Patch(color=c, label=f"{b} bit") for b, c in zip(cands, colours, strict=True)],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=len(cands),
        fontsize=8,
        frameon=False,
        handlelength=1.2,
    )
    bx = fig.add_subplot(gs[0, 1])
    bars = bx.bar([str(b) for b in cands], counts, color=colours, edgecolor="0.3", lw=0.6)
    total = max(len(bits), 1)
    for b, c in zip(bars, counts, strict=True):
        bx.annotate(
            f"{c} ({100 * c / total:.0f}%)",
            (b.get_x() + b.get_width() / 2, c),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    bx.set_ylim(0, max(counts) * 1.18 + 0.5)
    bx.set_xlabel("activation bits")
    bx.set_ylabel("tiles")
    bx.set_title(f"{len(bits)} tiles of {tile}×{tile} LR px, step {step}", fontsize=9)
    bx.yaxis.get_major_locator().set_params(integer=True)
    for side in ("top", "right"):
        bx.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
