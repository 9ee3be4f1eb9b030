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
Matplotlib (the ``report`` extra) is imported only in this package, with the object-oriented API (no
global backend is changed).

Modules: :mod:`.records` (eval JSON files), :mod:`.plots` (figures), :mod:`.images` (crops, SR
images, bit maps), :mod:`.document` (Markdown + HTML), :mod:`.build` (:func:`build_report`).
"""

from __future__ import annotations

from .build import ReportResult, build_report
from .images import choose_crop
from .records import EvalRecord, ReportError, eval_provenance, load_eval_json, load_eval_results

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
