"""``lowbitsr demo``: the shipped models against bicubic on the bundled test images (no download).

For each scale that has shipped weights, every shipped model of that scale (float first, then the
quantized ones) and the bicubic baseline are evaluated on the bundled test split with the standard
protocol (Y-channel PSNR/SSIM, border = scale); the table is printed and written, with per-image
JSON and the SR images, to the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import BundledDataset
from .errors import LowbitsrError
from .evaluate import Bicubic, evaluate, format_table
from .pretrained import list_pretrained, load_pretrained, pretrained_info

__all__ = ["demo_rows", "run_demo"]


#: the architecture the demo shows when it is shipped for a scale (the papers' network); the
#: small ``edsr_tiny`` models serve the tests and are shown with ``all_models=True``
DEMO_ARCH = "edsr_baseline"


def _shipped_by_scale(all_models: bool = False) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in list_pretrained():
        out.setdefault(int(pretrained_info(name)["model"]["scale"]), []).append(name)
    if not all_models:
        for s, names in out.items():
            main = [n for n in names if pretrained_info(n)["model"]["name"] == DEMO_ARCH]
            out[s] = main or names
    # float model first, then by name (method/bits)
    return {s: sorted(v, key=lambda n: (not n.endswith("_fp"), n)) for s, v in sorted(out.items())}


def _bits_label(name: str) -> str:
    q = pretrained_info(name).get("quant")
    if not q:
        return "32/32"
    if "bits" in q:
        label = f"{q['bits']}/{q['bits']}"
        if q.get("layout") == "integer":
            stream = q.get("stream_bits")
            label += f" integer layout{f', {stream}-bit stream' if stream else ''}"
        return label
    fab = q.get("image_fab")
    per_image = f", <= {fab:g} per image" if fab is not None else ""
    return f"{q.get('weight_bits', '?')}/patch-wise{per_image}"


def demo_rows(
    scales: list[int] | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
    out_dir: str | Path | None = None,
    all_models: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate bicubic and the shipped models; returns one row per (scale, model).

    Per scale, the shipped models of :data:`DEMO_ARCH` when there are any (else every shipped
    model of that scale); ``all_models=True`` shows every shipped model.
    """
    shipped = _shipped_by_scale(all_models)
    if scales:
        missing = [s for s in scales if s not in shipped]
        if missing:
            raise LowbitsrError(
                f"no shipped models for scale(s) {', '.join(map(str, missing))}; "
                f"shipped scales: {', '.join(map(str, sorted(shipped)))}"
            )
        shipped = {s: shipped[s] for s in scales}
    rows: list[dict[str, Any]] = []
    for scale, names in shipped.items():
        ds = BundledDataset("test", scale, mode="eval")
        candidates: list[tuple[str, str, Any]] = [("bicubic", "-", Bicubic(scale))]
        candidates += [(n, _bits_label(n), load_pretrained(n)) for n in names]
        for name, bits, model in candidates:
            model = model.to(device)
            tag = name if name != "bicubic" else f"bicubic_x{scale}"
            res = evaluate(
                model,
                ds,
                scale,
                model_name=name,
                dataset_name="bundled:test",
                device=device,
                progress=progress,
                save_dir=None if out_dir is None else Path(out_dir) / tag,
            )
            rows.append(
                {
                    "scale": f"x{scale}",
                    "model": name,
                    "bits (W/A)": bits,
                    "PSNR": res.psnr,
                    "SSIM": res.ssim,
                    "FAB": "-" if name == "bicubic" else res.fab,
                    "GBitOPs/64x64": res.info.get("gbitops", "-"),
                }
            )
            if out_dir is not None:
                res.save_json(Path(out_dir) / f"{tag}.json")
    return rows


def run_demo(
    scales: list[int] | None = None,
    out_dir: str | Path = "demo_out",
    device: str = "cpu",
    progress: bool = True,
    all_models: bool = False,
) -> list[dict[str, Any]]:
    """Run the demo, print the table and save results/images under ``out_dir``.

    Raises:
        LowbitsrError: ``out_dir`` cannot be written (checked before anything is computed).
    """
    from .data.io import check_output_path

    check_output_path(out_dir, folder=True, what="demo results")
    rows = demo_rows(
        scales, device=device, progress=progress, out_dir=out_dir, all_models=all_models
    )
    table = format_table(rows)
    print(
        "Bundled test split (scikit-image photos: astronaut, chelsea); PSNR/SSIM on Y, border=scale"
    )
    print(table)
    print("FAB = feature average bit-width (32 = float); BitOPs = sum over convs of")
    print("MACs x w_bits x a_bits / 64 for one 64x64 LR input (float layers count 32 x 32).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_table.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    print(f"SR images (one folder per model) and per-image JSON written to {out}/")
    return rows
