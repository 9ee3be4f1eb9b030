"""``lowbitsr report``: evaluation JSON files → a Markdown + HTML report with figures.

Input: the per-model JSON files written by ``lowbitsr eval --json-dir`` (or ``lowbitsr demo``),
see :meth:`lowbitsr.evaluate.EvalResult.to_dict`. Results are grouped by (dataset, scale); for
each group the report has

* a summary table (method, W/A bits, FAB, GBitOPs per 64×64 LR input, PSNR, SSIM, ΔPSNR);
* PSNR vs FAB and PSNR vs GBitOPs scatter plots (bicubic and float as reference lines);
* a per-image grouped bar chart of ΔPSNR over bicubic (or over the float model);
* side-by-side crops (HR, bicubic, float, every quantized model) of the same region of the
  images where the models disagree most; the SR images are read from ``eval --save-images``
  output when present (and checked against the JSON's PSNR), otherwise re-computed by loading
  the model from the spec the JSON records (``info.model_spec``);
* Granular-DQ bit maps (tiles tinted by their bit-width, :func:`lowbitsr.viz.bitmap_overlay`)
  with per-tile bit counts.

``report.md`` links the PNG figures beside it; ``report.html`` embeds them (one file to share).
A model that cannot be loaded or run leaves a note in the report instead of failing it.
Matplotlib (the ``report`` extra) is imported only here, with the object-oriented API (no
global backend is changed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LowbitsrError

__all__ = [
    "EvalRecord",
    "ReportError",
    "ReportResult",
    "build_report",
    "choose_crop",
    "eval_provenance",
    "load_eval_json",
    "load_eval_results",
]

#: (marker, colour) per quantization method in the scatter plots.
_METHOD_STYLE: dict[str, tuple[str, str]] = {
    "fp": ("*", "black"),
    "pams": ("o", "tab:blue"),
    "ddtb": ("s", "tab:orange"),
    "granular_dq": ("D", "tab:green"),
}
_METHOD_NAMES = {"fp": "float", "pams": "PAMS", "ddtb": "DDTB", "granular_dq": "Granular-DQ"}
_PSNR_TOLERANCE_DB = 0.02  # re-computed SR images must match the JSON's PSNR this closely
_DPI = 150


class ReportError(LowbitsrError):
    """An eval JSON file is missing or malformed, or report options are invalid."""


# ----------------------------------------------------------------------------- eval records


@dataclass
class EvalRecord:
    """One model's evaluation on one dataset, as read from an eval JSON file.

    ``images`` rows hold ``name``, ``psnr`` (dB), ``ssim`` ([0, 1]) and ``fab`` (bits, NaN if
    not recorded). ``gbitops``/``gmacs`` are per 64×64 LR input (NaN when unknown, e.g. bicubic).
    """

    path: Path
    model: str
    dataset: str
    scale: int
    psnr: float
    ssim: float
    fab: float
    gbitops: float
    gmacs: float
    images: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """``bicubic``, ``fp``, ``pams``, ``ddtb``, ``granular_dq`` (or another recorded one)."""
        if self.info.get("method"):
            return str(self.info["method"])
        name = self.model.lower()
        if name.startswith("bicubic"):
            return "bicubic"
        if math.isfinite(self.fab) and self.fab >= 32:
            return "fp"
        for key, method in (("gdq", "granular_dq"), ("granular", "granular_dq")):
            if key in name:
                return method
        for method in ("ddtb", "pams"):
            if method in name:
                return method
        return "fp" if not math.isfinite(self.fab) else "quant"

    @property
    def kind(self) -> str:
        """``bicubic``, ``fp`` (float model) or ``quant``."""
        m = self.method
        return m if m in ("bicubic", "fp") else "quant"

    @property
    def dynamic(self) -> bool:
        """Whether bits are chosen per tile (Granular-DQ)."""
        return self.method == "granular_dq"

    @property
    def bits_label(self) -> str:
        """``W/A`` bit-widths, e.g. ``2/2``, ``8/4-8`` (per tile) or ``32/32``."""
        if self.info.get("bits"):
            return str(self.info["bits"])
        if self.kind == "bicubic":
            return "-"
        if self.kind == "fp":
            return "32/32"
        m = re.search(r"w(\d+)a(\d+)", self.model.lower())
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        return "?/dyn" if self.dynamic else "?"

    def image(self, name: str) -> dict[str, Any] | None:
        """The per-image row named ``name`` (None if this model has no such image)."""
        return next((r for r in self.images if r["name"] == name), None)


def _num(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{path}: {where} should be a number, got {value!r}")
    return float(value)


def _looks_like_eval(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "model" in data


def _record_from_dict(data: Any, path: Path) -> EvalRecord:
    if not isinstance(data, dict):
        raise ReportError(
            f"{path}: not a lowbitsr eval result (a JSON object from lowbitsr eval --json-dir "
            f"expected, got a {type(data).__name__})"
        )
    for key in ("model", "dataset", "scale", "images"):
        if key not in data:
            raise ReportError(f"{path}: not a lowbitsr eval result: missing key {key!r}")
    if not isinstance(data["model"], str) or not isinstance(data["dataset"], str):
        raise ReportError(f"{path}: 'model' and 'dataset' should be strings")
    scale = data["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ReportError(f"{path}: 'scale' should be a positive integer, got {scale!r}")
    rows = data["images"]
    if not isinstance(rows, list) or not rows:
        raise ReportError(f"{path}: 'images' should be a non-empty list of per-image results")
    images = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ReportError(f"{path}: images[{i}] should be an object with a 'name'")
        extra = row.get("extra") or {}
        images.append(
            {
                "name": row["name"],
                "psnr": _num(row.get("psnr"), f"images[{i}].psnr", path),
                "ssim": _num(row.get("ssim"), f"images[{i}].ssim", path),
                "fab": float(extra["fab"])
                if isinstance(extra.get("fab"), int | float)
                else math.nan,
            }
        )
    info = data.get("info") or {}
    if not isinstance(info, dict):
        raise ReportError(f"{path}: 'info' should be an object")
    finite = [r["psnr"] for r in images if math.isfinite(r["psnr"])]

    def opt(key: str, default: float) -> float:
        v = data.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else default

    def opt_info(key: str) -> float:
        v = info.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan

    fabs = [r["fab"] for r in images]
    return EvalRecord(
        path=path,
        model=data["model"],
        dataset=data["dataset"],
        scale=scale,
        psnr=opt("psnr", float(np.mean(finite)) if finite else math.inf),
        ssim=opt("ssim", float(np.mean([r["ssim"] for r in images]))),
        fab=opt("fab", float(np.mean(fabs))),
        gbitops=opt_info("gbitops"),
        gmacs=opt_info("gmacs"),
        images=images,
        info=info,
    )


def load_eval_json(path: str | Path) -> EvalRecord:
    """Read one eval JSON file (from ``lowbitsr eval --json-dir``).

    Raises:
        ReportError: the file is missing, unreadable, not JSON, or not an eval result; the
            message names the file.
    """
    p = Path(path)
    return _record_from_dict(_read_json(p), p)


def _read_json(p: Path) -> Any:
    if not p.is_file():
        raise ReportError(f"{p}: no such eval JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{p}: not a JSON file (not UTF-8 text)") from None
    except OSError as exc:
        raise ReportError(f"{p}: cannot be read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "re-create it with lowbitsr eval --json-dir"
        ) from None


def load_eval_results(inputs: Sequence[str | Path]) -> tuple[list[EvalRecord], list[str]]:
    """Eval records from JSON files and folders of them, and notes about what was skipped.

    A file named directly must be an eval result; in a folder, ``*.json`` files that parse but
    are not eval results (e.g. ``demo.json``) are skipped with a note, corrupt ones are errors.
    A second result for the same (dataset, scale, model) is skipped with a note.

    Raises:
        ReportError: no inputs, a missing path, an empty folder, a corrupt/invalid file.
    """
    if not inputs:
        raise ReportError("no eval JSON files or folders given")
    records: list[EvalRecord] = []
    notes: list[str] = []
    seen: dict[tuple[str, int, str], Path] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("*.json"))
            if not files:
                raise ReportError(
                    f"{p}: folder has no .json files (write them with lowbitsr eval --json-dir)"
                )
            explicit = False
        elif p.exists() or p.suffix == ".json":
            files, explicit = [p], True
        else:
            raise ReportError(f"{p}: no such eval JSON file or folder")
        for f in files:
            data = _read_json(f)
            if not explicit and not _looks_like_eval(data):
                notes.append(f"`{f}` skipped: not an eval result")
                continue
            rec = _record_from_dict(data, f)
            key = (rec.dataset, rec.scale, rec.model)
            if key in seen:
                notes.append(
                    f"`{f}` skipped: {rec.model} on {rec.dataset} x{rec.scale} is "
                    f"already read from `{seen[key]}`"
                )
                continue
            seen[key] = f
            records.append(rec)
    if not records:
        raise ReportError(f"{', '.join(map(str, inputs))}: no eval results found")
    return records, notes


def _sort_key(r: EvalRecord) -> tuple[int, float, str]:
    order = {"bicubic": 0, "fp": 1}.get(r.kind, 2)
    fab = r.fab if math.isfinite(r.fab) else 99.0
    return (order, -fab, r.model)


def _group(records: list[EvalRecord]) -> dict[tuple[str, int], list[EvalRecord]]:
    groups: dict[tuple[str, int], list[EvalRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.scale), []).append(r)
    return {k: sorted(groups[k], key=_sort_key) for k in sorted(groups)}


def _short_names(records: list[EvalRecord]) -> tuple[dict[str, str], str]:
    """Model names without their common ``prefix_`` (for plot labels), and that prefix."""
    names = [r.model for r in records if r.kind != "bicubic"]
    full = {r.model: r.model for r in records}
    if len(names) < 2:
        return full, ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[: prefix.rfind("_") + 1]
    if not prefix or any(len(n) == len(prefix) for n in names):
        return full, ""
    return {r.model: r.model.removeprefix(prefix) for r in records}, prefix


# ------------------------------------------------------------------------ eval provenance


def eval_provenance(
    ref: str, model: Any, *, tile: int = 0, save_dir: str | Path | None = None
) -> dict[str, Any]:
    """What ``lowbitsr report`` needs to know about a model evaluated by ``lowbitsr eval``.

    Args:
        ref: the model as given on the eval command line (``bicubic``, ``pretrained:NAME``, a
            shipped name or a saved-model path).
        model: the loaded model (its ``quant_config_dict`` gives method and bits).
        tile: the LR tile size eval ran with (0 = whole image).
        save_dir: folder the SR images were written to (``<image name>.png``), if any.
    Returns:
        ``{"model_spec", "method", "bits", "tile"[, "sr_dir"]}``: a spec that reloads the model
        from any working directory (paths made absolute), the quantization method
        (``bicubic``/``fp``/``pams``/``ddtb``/``granular_dq``), ``W/A`` bits, and the tile size.
    """
    from .pretrained import list_pretrained

    q = dict(getattr(model, "quant_config_dict", None) or {})
    if ref == "bicubic":
        spec, method, bits = "bicubic", "bicubic", "-"
    else:
        name = ref.split(":", 1)[1] if ref.startswith("pretrained:") else ref
        spec = f"pretrained:{name}" if name in list_pretrained() else str(Path(ref).resolve())
        method = str(q.get("method", "fp")) if q else "fp"
        if not q:
            bits = "32/32"
        elif "bits" in q:
            bits = f"{q.get('weight_bits', q['bits'])}/{q['bits']}"
        elif q.get("fixed_bits"):  # Granular-DQ fixed-bit baseline
            bits = f"{q.get('weight_bits', '?')}/{q['fixed_bits']}"
        else:
            cands = sorted(getattr(getattr(model, "config", None), "candidates", ()) or ())
            a = f"{cands[0]}-{cands[-1]}" if cands else "dyn"
            bits = f"{q.get('weight_bits', '?')}/{a}"
    out: dict[str, Any] = {"model_spec": spec, "method": method, "bits": bits, "tile": int(tile)}
    if save_dir is not None:
        out["sr_dir"] = str(Path(save_dir).resolve())
    return out


# ------------------------------------------------------------------------------ matplotlib


def _mpl() -> Any:
    """``matplotlib`` (imported lazily), or a clear error saying how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ReportError(
            'lowbitsr report needs matplotlib: pip install "lowbitsr[report]"'
        ) from None
    return matplotlib


def _figure(width: float, height: float) -> Any:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, facecolor="white")
    return path


def _place_labels(
    ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], fontsize: float = 8.5
) -> None:
    """Label points without labels overlapping each other or other points.

    Greedy: points from left to right; each label tries right/left of its point at growing
    vertical offsets and takes the first free place inside the axes (a thin leader line joins
    a displaced label to its point). Call after the axes limits and layout are final.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ppt = fig.dpi / 72.0  # display pixels per typographic point
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    box = ax.get_window_extent(renderer)
    r, pad = 4.5 * ppt, 6.0 * ppt
    taken = [(px - r, py - r, px + r, py + r) for px, py in pts]
    sizes = []
    for lab in labels:
        t = fig.text(0, 0, lab, fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        sizes.append((bb.width + 2, bb.height + 2))

    def clash(rect: tuple[float, float, float, float]) -> int:
        x0, y0, x1, y1 = rect
        return sum(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in taken)

    order = sorted(range(len(labels)), key=lambda i: (pts[i][0], -pts[i][1]))
    for i in order:
        (px, py), (w, h) = pts[i], sizes[i]
        best: tuple[int, float, int, tuple[float, float, float, float]] | None = None
        for k in range(41):
            dy = ((k + 1) // 2) * 0.6 * h * (1 if k % 2 else -1)
            for side in (1, -1):
                x0 = px + pad if side > 0 else px - pad - w
                rect = (x0, py + dy - h / 2, x0 + w, py + dy + h / 2)
                if rect[0] < box.x0 or rect[2] > box.x1 or rect[1] < box.y0 or rect[3] > box.y1:
                    continue
                cand = (clash(rect), abs(dy), side, rect)
                if best is None or cand[:2] < best[:2]:
                    best = cand
            if best is not None and best[0] == 0:
                break
        if best is None:  # no room inside the axes: plain label to the right
            best = (0, 0.0, 1, (px + pad, py - h / 2, px + pad + w, py + h / 2))
        _, dy, side, rect = best
        taken.append(rect)
        ax_x = rect[0] if side > 0 else rect[2]
        ay = (rect[1] + rect[3]) / 2
        ax.annotate(
            labels[i],
            (xs[i], ys[i]),
            xycoords="data",
            xytext=((ax_x - px) / ppt, (ay - py) / ppt),
            textcoords="offset points",
            fontsize=fontsize,
            ha="left" if side > 0 else "right",
            va="center",
            zorder=2,
            arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkB": r / ppt}
            if dy > 0.45 * h
            else None,
            bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.75},
        )


def _padded(lo: float, hi: float, frac: float = 0.08, minimum: float = 0.2) -> tuple[float, float]:
    span = max(hi - lo, minimum)
    mid = (hi + lo) / 2
    return mid - span * (0.5 + frac), mid + span * (0.5 + frac)


def _scatter_plot(
    recs: list[EvalRecord],
    short: dict[str, str],
    prefix: str,
    title: str,
    path: Path,
    *,
    x_of: Any,
    xlabel: str,
    log2: bool,
) -> Path | None:
    """PSNR against ``x_of(record)``: one labelled point per model, bicubic/FP as lines."""
    from matplotlib.lines import Line2D

    pts = [(r, x_of(r)) for r in recs if r.kind != "bicubic"]
    pts = [(r, x) for r, x in pts if x is not None and math.isfinite(x) and x > 0]
    if not pts or not all(math.isfinite(r.psnr) for r, _ in pts):
        return None
    fig = _figure(7.6, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    handles: dict[str, Any] = {}
    for r, x in pts:
        method = r.method if r.method in _METHOD_STYLE else "other"
        marker, colour = _METHOD_STYLE.get(method, ("^", "tab:purple"))
        ax.scatter(
            [x],
            [r.psnr],
            marker=marker,
            color=colour,
            s=90 if marker == "*" else 45,
            zorder=3,
            edgecolors="white",
            linewidths=0.6,
        )
        handles.setdefault(
            method,
            Line2D(
                [],
                [],
                marker=marker,
                color=colour,
                ls="",
                markersize=8 if marker == "*" else 6.5,
                label=_METHOD_NAMES.get(method, method),
            ),
        )
    ys = [r.psnr for r, _ in pts]
    for r in recs:
        if r.kind == "bicubic" and math.isfinite(r.psnr):
            ax.axhline(r.psnr, color="0.35", ls="--", lw=1, zorder=1)
            handles["bicubic"] = Line2D(
                [], [], color="0.35", ls="--", label=f"bicubic ({r.psnr:.2f} dB)"
            )
            ys.append(r.psnr)
    fp = [r for r, _ in pts if r.kind == "fp"]
    if fp:
        ax.axhline(fp[0].psnr, color="black", ls=":", lw=1, zorder=1)
        handles["fp line"] = Line2D(
            [], [], color="black", ls=":", label=f"float ({fp[0].psnr:.2f} dB)"
        )
    xs = [x for _, x in pts]
    if log2:
        ax.set_xscale("log", base=2)
        lo, hi = min(xs) / 1.5, max(xs) * 1.5
        ticks = [t for t in (1, 2, 3, 4, 5, 6, 8, 16, 32) if lo <= t <= hi]
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
    else:
        lo, hi = _padded(min(xs), max(xs), 0.12, minimum=max(xs) * 0.1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(*_padded(min(ys), max(ys), 0.1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PSNR (dB, Y channel)")
    ax.set_title(title, fontsize=10.5)
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    _legend_right(
        ax,
        f"labels: model name\nwithout '{prefix}'" if prefix else None,
        handles=list(handles.values()),
    )
    fig.tight_layout()
    _place_labels(ax, xs, [r.psnr for r, _ in pts], [short[r.model] for r, _ in pts])
    return _save(fig, path)


def _per_image_reference(recs: list[EvalRecord]) -> EvalRecord | None:
    """The baseline of the per-image bars: bicubic, else the float model (when others exist)."""
    bic = next((r for r in recs if r.kind == "bicubic"), None)
    if bic is not None:
        return bic
    fp = next((r for r in recs if r.kind == "fp"), None)
    return fp if fp is not None and len(recs) > 1 else None


def _per_image_plot(
    recs: list[EvalRecord],
    short: dict[str, str],
    prefix: str,
    title: str,
    path: Path,
    max_images: int = 40,
) -> Path | None:
    """Grouped bars per image (+ mean): ΔPSNR over bicubic (else over the float model, else
    plain PSNR), one bar per other model; the first ``max_images`` images."""
    ref = _per_image_reference(recs)
    models = [r for r in recs if r is not ref]
    if not models:
        return None
    names = [row["name"] for row in (ref or models[0]).images][:max_images]
    groups = [*names, "mean"]

    def value(r: EvalRecord, name: str) -> float:
        if name == "mean":
            return r.psnr - (ref.psnr if ref else 0.0)
        row, rrow = r.image(name), (ref.image(name) if ref else {"psnr": 0.0})
        return math.nan if row is None or rrow is None else row["psnr"] - rrow["psnr"]

    vals = np.array([[value(r, g) for g in groups] for r in models])
    n_m = len(models)
    width = 0.8 / n_m
    fig = _figure(max(6.5, 1.8 + len(groups) * (0.32 * n_m + 0.5)), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    x = np.arange(len(groups))
    label_bars = len(groups) * n_m <= 48
    for k, r in enumerate(models):
        bars = ax.bar(
            x - 0.4 + width * (k + 0.5),
            vals[k],
            width * 0.92,
            color="black" if r.kind == "fp" else cmap(k % 10),
            label=short[r.model],
            zorder=2,
        )
        if not label_bars:
            continue
        for bar, v in zip(bars, vals[k], strict=True):
            if math.isfinite(v):
                ax.annotate(
                    _delta(v) if ref else f"{v:.2f}",
                    (bar.get_x() + bar.get_width() / 2, v),
                    xytext=(0, 2 if v >= 0 else -2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom" if v >= 0 else "top",
                    fontsize=6.5,
                    rotation=0 if n_m <= 3 else 90,
                )
    finite = vals[np.isfinite(vals)]
    if ref:
        ax.axhline(0, color="0.3", lw=0.8)
        lo, hi = min(0.0, finite.min()), max(0.0, finite.max())
        span = max(hi - lo, 0.1)
        up, down = bool((finite >= 0).any()), bool((finite < 0).any())  # where labels sit
        ax.set_ylim(lo - (0.22 if down else 0.03) * span, hi + (0.22 if up else 0.03) * span)
        what = "bicubic" if ref.kind == "bicubic" else f"the float model ({short[ref.model]})"
        ax.set_ylabel(f"ΔPSNR over {what} (dB)" if len(what) < 20 else f"ΔPSNR over\n{what} (dB)")
    else:
        lo, hi = finite.min(), finite.max()
        ax.set_ylim(lo - 0.5, hi + 0.3 * max(hi - lo, 0.5))
        ax.set_ylabel("PSNR (dB; axis does not start at 0)")
    ax.set_xticks(x)
    ax.set_xticklabels(
        groups, rotation=0 if len(groups) <= 8 else 60, ha="center" if len(groups) <= 8 else "right"
    )
    ax.axvline(len(groups) - 1.5, color="0.7", lw=0.8, ls=":")
    ax.grid(True, axis="y", color="0.9", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10.5)
    _legend_right(ax, f"without '{prefix}'" if prefix else None)
    fig.tight_layout()
    return _save(fig, path)



def _legend_right(ax: Any, title: str | None, **kwargs: Any) -> None:
    """The report's legend style: outside the axes, top right, small, no frame."""
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8.5,
        frameon=False,
        title=title,
        title_fontsize=8,
        **kwargs,
    )


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
        from .pretrained import list_pretrained

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
        from .specs import load_any_model

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
        from .data import read_image
        from .metrics import psnr

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

        from .evaluate import _to_uint8, is_dynamic_bits, upscale_image

        if is_dynamic_bits(model):
            from .quant.granular_dq import gdq_super_resolve

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

    from .quant.bitops import fab
    from .viz import _colour, bitmap_overlay

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


# ------------------------------------------------------------------------ document blocks


def _fmt(v: float, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "inf" if v == math.inf else "-"
    return f"{v:.{digits}f}"


def _delta(v: float) -> str:
    """A signed difference with two decimals (``+0.12``, ``-0.34``; ``0.00``, never ``-0.00``)."""
    return "0.00" if abs(v) < 0.005 else f"{v:+.2f}"


def _group_slug(dataset: str, scale: int) -> str:
    """File-name prefix of a group: the dataset kind and the last part of its path, and scale."""
    kind, _, rest = dataset.partition(":")
    tail = Path(rest.split(":")[0]).name if rest else ""
    extra = rest.split(":")[1] if rest.count(":") == 1 else ""  # e.g. a DIV2K index range
    return _slug("_".join(p for p in (kind, tail, extra) if p) + f"_x{scale}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "x"


class _Doc:
    """A tiny document model rendered to both Markdown and (self-contained) HTML."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        align: Sequence[str] | None = None,
    ) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows], align)))

    def img(self, path: Path, alt: str, caption: str = "") -> None:
        self.blocks.append(("img", (path, alt, caption)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append("#" * val[0] + " " + val[1])
            elif kind == "p":
                out.append(val)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in val))
            elif kind == "table":
                header, rows, align = val
                align = align or ["l"] * len(header)
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                out.append(
                    "\n".join(
                        [
                            "| " + " | ".join(esc[0]) + " |",
                            "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
                        ]
                        + ["| " + " | ".join(r) + " |" for r in esc[1:]]
                    )
                )
            elif kind == "img":
                path, alt, caption = val
                rel = path.relative_to(self.out).as_posix()
                out.append(f"![{alt}]({rel})" + (f"\n\n*{caption}*" if caption else ""))
        return "\n\n".join(out) + "\n"

    @staticmethod
    def _inline(text: str) -> str:
        t = html.escape(text, quote=False)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
        return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", t)

    def html(self, title: str) -> str:
        body: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                body.append(f"<h{val[0]}>{self._inline(val[1])}</h{val[0]}>")
            elif kind == "p":
                body.append(f"<p>{self._inline(val)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{self._inline(i)}</li>" for i in val) + "</ul>")
            elif kind == "table":
                header, rows, align = val
                align = align or ["l"] * len(header)
                cls = ["" if a == "l" else ' class="num"' for a in align]
                head = "".join(
                    f"<th{c}>{self._inline(h)}</th>" for h, c in zip(header, cls, strict=True)
                )
                trs = "".join(
                    "<tr>"
                    + "".join(f"<td{c}>{self._inline(v)}</td>" for v, c in zip(r, cls, strict=True))
                    + "</tr>"
                    for r in rows
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                path, alt, caption = val
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                cap = f"<figcaption>{self._inline(caption)}</figcaption>" if caption else ""
                body.append(
                    f'<figure><img alt="{html.escape(alt)}" '
                    f'src="data:image/png;base64,{data}">{cap}</figure>'
                )
        css = (
            "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;"
            "padding:0 1em;color:#222;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
            "th,td{border:1px solid #ccc;padding:3px 9px}th{background:#f3f3f3}"
            "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
            "figure{margin:1.2em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
            "figcaption{font-size:0.9em;color:#555}code{background:#f5f5f5;padding:0 3px}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{css}</style></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )


# --------------------------------------------------------------------------------- report


@dataclass
class ReportResult:
    """Paths of what :func:`build_report` wrote, and its notes (skipped inputs, failures)."""

    markdown: Path
    html: Path
    figures: list[Path]
    notes: list[str]


def _parse_pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        key, sep, spec = v.partition("=")
        if not sep or not key or not spec:
            raise ReportError(f"{what} {v!r}: write NAME=SPEC")
        out[key] = spec
    return out


def _summary_table(doc: _Doc, recs: list[EvalRecord]) -> None:
    bic = next((r for r in recs if r.kind == "bicubic"), None)
    fp = next((r for r in recs if r.kind == "fp"), None)
    quant = [r for r in recs if r.kind == "quant" and math.isfinite(r.psnr)]
    best = max(quant, key=lambda r: r.psnr).model if quant else None
    header = ["model", "method", "W/A bits", "FAB", "GBitOPs", "PSNR (dB)", "SSIM"]
    align = ["l", "l", "l", "r", "r", "r", "r"]
    if fp:
        header.append("Δ vs float")
        align.append("r")
    if bic:
        header.append("Δ vs bicubic")
        align.append("r")
    rows = []
    for r in recs:
        psnr_s = _fmt(r.psnr)
        row = [
            f"`{r.model}`",
            "-" if r.kind == "bicubic" else _METHOD_NAMES.get(r.method, r.method),
            r.bits_label,
            "-" if r.kind == "bicubic" else _fmt(r.fab),
            _fmt(r.gbitops),
            f"**{psnr_s}**" if r.model == best else psnr_s,
            _fmt(r.ssim, 4),
        ]
        if fp:
            row.append("-" if r is fp or r.kind == "bicubic" else _delta(r.psnr - fp.psnr))
        if bic:
            row.append("-" if r is bic else _delta(r.psnr - bic.psnr))
        rows.append(row)
    doc.table(header, rows, align)


def _per_image_table(doc: _Doc, recs: list[EvalRecord], short: dict[str, str]) -> None:
    names = [row["name"] for row in recs[0].images]
    header = ["image", *[f"`{short[r.model]}`" for r in recs]]
    rows = []
    for n in names:
        vals = [r.image(n) for r in recs]
        rows.append([n, *[_fmt(v["psnr"]) if v else "-" for v in vals]])
    rows.append(["**mean**", *[_fmt(r.psnr) for r in recs]])
    doc.table(header, rows, ["l"] + ["r"] * len(recs))


def _pick_images(
    recs: list[EvalRecord],
    ds_names: list[str],
    wanted: Sequence[str] | None,
    max_images: int,
    notes: list[str],
) -> list[str]:
    if wanted:
        missing = [w for w in wanted if w not in ds_names]
        for w in missing:
            notes.append(
                f"image `{w}` not in this dataset (has: {', '.join(ds_names[:10])}"
                f"{', ...' if len(ds_names) > 10 else ''})"
            )
        return [w for w in wanted if w in ds_names]
    models = [r for r in recs if r.kind != "bicubic"] or recs

    def spread(name: str) -> float:
        v = [row["psnr"] for r in models if (row := r.image(name)) and math.isfinite(row["psnr"])]
        return max(v) - min(v) if len(v) >= 2 else 0.0

    return sorted(ds_names, key=lambda n: (-spread(n), ds_names.index(n)))[:max_images]


@dataclass
class _Opts:
    """Report options and state shared by the per-group and per-image writers."""

    out: Path
    doc: _Doc
    renderer: _Renderer
    notes: list[str]
    figures: list[Path]
    crops: bool
    bitmaps: bool
    crop_size: int
    crop_at: tuple[int, int] | None
    slugs: dict[tuple[str, int], str]


def _summary_facts(recs: list[EvalRecord]) -> str | None:
    fp = next((r for r in recs if r.kind == "fp"), None)
    bic = next((r for r in recs if r.kind == "bicubic"), None)
    quant = [r for r in recs if r.kind == "quant" and math.isfinite(r.psnr)]
    if not quant:
        return None
    best = max(quant, key=lambda r: r.psnr)
    text = f"Best quantized model: `{best.model}` ({best.bits_label} bits, {best.psnr:.2f} dB"
    if fp:
        text += f", {_delta(best.psnr - fp.psnr)} dB vs float"
    if bic:
        text += f", {_delta(best.psnr - bic.psnr)} dB vs bicubic)"
        below = [f"`{r.model}`" for r in quant if r.psnr < bic.psnr]
        text += (
            f"; below bicubic: {', '.join(below)}."
            if below
            else "; every quantized model beats bicubic."
        )
    else:
        text += ")."
    return text


def _plots_section(o: _Opts, recs: list[EvalRecord], ds_name: str, scale: int) -> None:
    slug = o.slugs[(ds_name, scale)]
    short, prefix = _short_names(recs)
    ref = _per_image_reference(recs)
    o.doc.h(3, "PSNR vs bit-width and compute")
    if not any(r.kind == "quant" for r in recs):
        o.doc.p("No quantized model in this group: nothing to plot against bits or BitOPs.")
    for name, x_of, xlabel, log2, what, caption in (
        (
            "psnr_vs_bits",
            lambda r: r.fab,
            "FAB: mean activation bits (log scale; 32 = float)",
            True,
            "PSNR vs FAB",
            "one point per model; dashed: bicubic, dotted: float model",
        ),
        (
            "psnr_vs_bitops",
            lambda r: r.gbitops,
            "GBitOPs per 64×64 LR input",
            False,
            "PSNR vs GBitOPs",
            "one point per model; dashed: bicubic, dotted: float model. The float layers "
            "(head, upsampler, tail) are counted at 32×32 bits, so in a small network they set "
            "a floor that every quantized model shares",
        ),
    ):
        if not any(r.kind == "quant" for r in recs):
            break
        fig = _scatter_plot(
            recs,
            short,
            prefix,
            f"{what}: {ds_name} ×{scale}",
            o.out / f"{slug}_{name}.png",
            x_of=x_of,
            xlabel=xlabel,
            log2=log2,
        )
        if fig:
            o.figures.append(fig)
            o.doc.img(fig, f"{what}, {ds_name} x{scale}", caption)
        else:
            o.notes.append(f"{ds_name} ×{scale}: no {what} plot (no model has that number)")
    o.doc.h(3, "Per-image PSNR")
    fig = _per_image_plot(
        recs, short, prefix, f"Per-image PSNR: {ds_name} ×{scale}", o.out / f"{slug}_per_image.png"
    )
    if fig:
        o.figures.append(fig)
        o.doc.img(
            fig,
            f"per-image PSNR, {ds_name} x{scale}",
            f"bar labels: ΔPSNR over {ref.model} in dB; last group: mean over images"
            if ref
            else "PSNR per image; last group: mean over images",
        )
    _per_image_table(o.doc, recs, short)


def _crop_block(
    o: _Opts,
    recs: list[EvalRecord],
    srs: dict[Path, _SR],
    name: str,
    hr: np.ndarray,
    ds_name: str,
    scale: int,
) -> tuple[Path, str, str]:
    from .metrics import psnr

    short, prefix = _short_names(recs)
    size = min(o.crop_size, hr.shape[0], hr.shape[1])
    if o.crop_at is not None:
        x0, y0 = o.crop_at
        if not (0 <= x0 <= hr.shape[1] - size and 0 <= y0 <= hr.shape[0] - size):
            raise ReportError(
                f"--crop {x0},{y0}: a {size}px crop does not fit in {name} "
                f"({hr.shape[1]}×{hr.shape[0]} HR pixels)"
            )
        how = "set by --crop"
    else:
        avail = [srs[r.path].image for r in recs if srs[r.path].image is not None]
        non_bic = [
            srs[r.path].image for r in recs if r.kind != "bicubic" and srs[r.path].image is not None
        ]
        pool = non_bic if len(non_bic) >= 2 else avail
        y0, x0 = choose_crop(hr, pool, size, border=scale)
        how = (
            "chosen where the models' errors differ most"
            if len(pool) >= 2
            else "chosen at the highest HR gradient energy"
        )
    cy, cx = slice(y0, y0 + size), slice(x0, x0 + size)
    panels: list[tuple[str, np.ndarray | None, str]] = [("HR (ground truth)", hr, "")]
    for r in recs:
        s = srs[r.path]
        row = r.image(name)
        sub = f"{row['psnr']:.2f} dB" if row else "not evaluated"
        if s.image is not None:
            sub += f" | crop {psnr(s.image[cy, cx], hr[cy, cx], crop_border=0):.2f} dB"
        label = short[r.model] + (f" ({r.bits_label})" if r.kind == "quant" else "")
        panels.append((label, s.image, sub))
    fig = _crop_figure(
        name,
        hr,
        panels,
        (y0, x0),
        size,
        f"{ds_name} ×{scale}, {name}: image PSNR | crop PSNR (Y)"
        + (f"; names without '{prefix}'" if prefix else ""),
        o.out / f"{o.slugs[(ds_name, scale)]}_crops_{_slug(name)}.png",
    )
    o.figures.append(fig)
    caption = (
        f"{name}: {size}×{size} HR crop at x={x0}, y={y0} ({how}), enlarged without "
        "interpolation; first number: PSNR of the whole image (from the JSON), second: of "
        "this crop"
    )
    return fig, f"crops of {name}", caption


def _images_section(o: _Opts, recs: list[EvalRecord], ds: Any, picked: list[str]) -> None:
    ds_name, scale = recs[0].dataset, recs[0].scale
    short, _ = _short_names(recs)
    crop_blocks: list[tuple[Path, str, str]] = []
    bit_blocks: list[tuple[Path, str, str]] = []
    bit_rows: list[list[str]] = []
    all_bits: list[np.ndarray] = []
    for name in picked:
        lr, hr = (np.asarray(a) for a in ds.load_pair(ds.names.index(name)))
        srs = {
            r.path: o.renderer.render(r, name, lr, hr)
            for r in recs
            if o.crops or (o.bitmaps and r.dynamic)
        }
        if o.crops:
            crop_blocks.append(_crop_block(o, recs, srs, name, hr, ds_name, scale))
        for r in [r for r in recs if o.bitmaps and r.dynamic]:
            s = srs[r.path]
            if s.bit_map is None or s.image is None:
                o.notes.append(f"{r.model}: no bit map for {name} (the model did not run)")
                continue
            fig = _bitmap_figure(
                short[r.model],
                name,
                s,
                lr.shape[:2],
                f"Granular-DQ bit map: {r.model}, {ds_name} ×{scale}",
                o.out / f"{o.slugs[(ds_name, scale)]}_bits_{_slug(r.model)}_{_slug(name)}.png",
            )
            o.figures.append(fig)
            bits = np.asarray(s.bit_map).ravel()
            all_bits.append(bits)
            cands = sorted(set(s.candidates) | {int(b) for b in bits})
            caption = (
                f"tiles tinted by their activation bits; {len(bits)} tiles, FAB {bits.mean():.2f}"
            )
            bit_blocks.append((fig, f"bit map of {r.model} on {name}", caption))
            counts = ", ".join(f"{b}: {int((bits == b).sum())}" for b in cands)
            bit_rows.append([f"`{r.model}`", name, counts, f"{bits.mean():.2f}"])
    if crop_blocks:
        o.doc.h(3, "Side-by-side crops")
        for block in crop_blocks:
            o.doc.img(*block)
    if bit_blocks:
        o.doc.h(3, "Granular-DQ bit maps")
        o.doc.p(
            "Each LR tile runs at the bit-width the bit controller picks for it; colours: "
            "4 bits blue, 5 green, 6 yellow, 8 red; white lines: the region each tile "
            "contributes to the stitched image."
        )
        for block in bit_blocks:
            o.doc.img(*block)
        o.doc.table(
            ["model", "image", "tiles per bit-width", "FAB"], bit_rows, ["l", "l", "l", "r"]
        )
        used = np.unique(np.concatenate(all_bits))
        if len(used) == 1:
            o.doc.p(
                f"Every tile of the images shown ran at {int(used[0])} bits: on these images the "
                "bit controller never chose another width, so the maps are one colour."
            )


def build_report(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    crops: bool = True,
    bitmaps: bool = True,
    crop_size: int = 120,
    crop_at: tuple[int, int] | None = None,
    images: Sequence[str] | None = None,
    max_images: int = 2,
    dataset: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    device: str = "cpu",
    title: str = "Low-bit super-resolution report",
) -> ReportResult:
    """Write ``report.md``, ``report.html`` and PNG figures for eval JSON results to ``output``.

    Args:
        inputs: eval JSON files and/or folders of them (see :func:`load_eval_results`).
        output: report folder (created).
        crops: draw side-by-side crops (needs the dataset and the SR images or models).
        bitmaps: draw Granular-DQ bit maps (re-runs Granular-DQ models).
        crop_size: crop side in HR pixels (>= 8).
        crop_at: ``(x, y)`` top-left of the crop in HR pixels (default: chosen per image by
            :func:`choose_crop`).
        images: names of the dataset images to show (default: the ``max_images`` images on
            which the models' PSNRs differ most).
        max_images: how many images get crops / bit maps when ``images`` is not given (>= 1).
        dataset: ``SPEC`` (all groups) or ``DATASET=SPEC`` entries overriding the dataset spec
            recorded in the JSON (e.g. when the data moved), in ``lowbitsr eval`` syntax.
        models: ``MODEL=SPEC`` entries: how to load a model the JSON has no spec for.
        device: torch device for re-running models.
        title: the report's title.
    Returns:
        :class:`ReportResult` with the written paths and the notes shown in the report.
    Raises:
        ReportError: bad inputs or options, or matplotlib missing.
    """
    from . import __version__
    from .data import build_dataset
    from .specs import parse_dataset_spec

    _mpl()
    if crop_size < 8:
        raise ReportError(f"--crop-size {crop_size}: use at least 8 HR pixels")
    if max_images < 1:
        raise ReportError(f"--max-images {max_images}: use at least 1")
    records, notes = load_eval_results(inputs)
    ds_over = _parse_pairs([d for d in dataset or [] if "=" in d], "--dataset")
    ds_all = next((d for d in reversed(dataset or []) if "=" not in d), None)
    out = _output_dir(output)  # before any figure is drawn
    o = _Opts(
        out=out,
        doc=_Doc(out),
        renderer=_Renderer(_parse_pairs(models, "--model"), device, notes),
        notes=notes,
        figures=[],
        crops=crops,
        bitmaps=bitmaps,
        crop_size=crop_size,
        crop_at=crop_at,
        slugs={},
    )
    groups = _group(records)
    for key in groups:  # short, unique file-name prefixes
        slug = _group_slug(*key)
        while slug in o.slugs.values():
            slug += "_"
        o.slugs[key] = slug
    formula = next((r.info["formula"] for r in records if r.info.get("formula")), None)
    o.doc.h(1, title)
    o.doc.p(
        f"Generated by lowbitsr {__version__} from {len(records)} eval result file(s) "
        f"({len(groups)} dataset/scale group(s)). PSNR and SSIM on the Y channel (BT.601), "
        "`scale` pixels cropped from each border. **FAB**: feature average bit-width, the mean "
        "activation bit-width over tiles and images (32 = float). **GBitOPs**: per 64×64 LR "
        f"input, {formula or 'sum over convs of MACs × w_bits × a_bits / 64'}."
    )
    for (ds_name, scale), recs in groups.items():
        n_img = len(recs[0].images)
        o.doc.h(2, f"{ds_name} ×{scale} ({n_img} image{'s' if n_img != 1 else ''})")
        o.doc.h(3, "Summary")
        _summary_table(o.doc, recs)
        facts = _summary_facts(recs)
        if facts:
            o.doc.p(facts)
        _plots_section(o, recs, ds_name, scale)
        if not (crops or (bitmaps and any(r.dynamic for r in recs))):
            continue
        spec_text = ds_over.get(ds_name) or ds_all or ds_name
        try:
            ds = build_dataset(parse_dataset_spec(spec_text), scale, "eval")
        except LowbitsrError as exc:
            notes.append(
                f"{ds_name} ×{scale}: no crops or bit maps, dataset `{spec_text}` is not "
                f"available ({exc}); pass `--dataset {ds_name}=SPEC`"
            )
            continue
        picked = _pick_images(recs, ds.names, images, max_images, notes)
        _images_section(o, recs, ds, picked)
    o.doc.h(2, "Notes")
    o.doc.ul(notes or ["none: every model loaded and every figure was drawn"])
    o.doc.h(2, "Inputs")
    o.doc.ul(
        [
            f"`{r.path}`: `{r.model}` on {r.dataset} ×{r.scale}"
            + (f" (spec `{r.info['model_spec']}`)" if r.info.get("model_spec") else "")
            for rs in groups.values()
            for r in rs
        ]
    )
    md_path, html_path = out / "report.md", out / "report.html"
    try:
        md_path.write_text(o.doc.markdown(), encoding="utf-8")
        html_path.write_text(o.doc.html(title), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{exc.filename or out}: cannot write the report ({exc})") from exc
    return ReportResult(md_path, html_path, o.figures, notes)


def _output_dir(output: str | Path) -> Path:
    """The report folder, created; :class:`ReportError` when it cannot be written."""
    from .data.io import check_output_path

    try:
        out = check_output_path(output, folder=True, what="report")
        out.mkdir(parents=True, exist_ok=True)
    except LowbitsrError as exc:
        raise ReportError(str(exc)) from exc
    except OSError as exc:
        raise ReportError(f"{output}: cannot create the report folder ({exc})") from exc
    return out
