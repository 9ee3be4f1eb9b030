"""Evaluation records: reading the JSON files of ``lowbitsr eval`` (:class:`EvalRecord`),
grouping them, and the provenance an eval records (:func:`eval_provenance`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitsrError

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
    from ..pretrained import list_pretrained

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
