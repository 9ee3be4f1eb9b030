"""The report itself: :func:`build_report` puts tables, plots, crops and bit maps together."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError
from .document import _delta, _Doc, _fmt, _group_slug, _slug
from .images import _SR, _bitmap_figure, _crop_figure, _Renderer, choose_crop
from .plots import _mpl, _per_image_plot, _per_image_reference, _scatter_plot
from .records import _METHOD_NAMES, EvalRecord, ReportError, _group, _short_names, load_eval_results

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
    from ..metrics import psnr

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
    from .. import __version__
    from ..data import build_dataset
    from ..specs import parse_dataset_spec

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
    from ..data.io import check_output_path

    try:
        out = check_output_path(output, folder=True, what="report")
        out.mkdir(parents=True, exist_ok=True)
    except LowbitsrError as exc:
        raise ReportError(str(exc)) from exc
    except OSError as exc:
        raise ReportError(f"{output}: cannot create the report folder ({exc})") from exc
    return out
