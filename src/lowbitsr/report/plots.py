"""The report's matplotlib figures: PSNR vs FAB/GBitOPs scatter plots and per-image bars
(object-oriented API; no global backend is changed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .document import _delta
from .records import _DPI, _METHOD_NAMES, _METHOD_STYLE, EvalRecord, ReportError

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
