"""The ``lowbitsr`` commands: one ``_cmd_<name>(args)`` per sub-command, each checking its
outputs before any work and then calling the library; CLI wording of library messages."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LowbitsrError
from ..specs import load_any_model, parse_dataset_spec

# Library messages advise Python arguments; the command line shows its own flag instead:
# (pattern, flag, text when the command has the flag, text when it has not).
_CLI_HINTS: tuple[tuple[str, str, str, str], ...] = (
    (r"max_pixels=(\d+)", "--max-pixels", r"--max-pixels \1", r"the limit of \1 pixels"),
    (r" or raise max_pixels", "--max-pixels", " or raise --max-pixels", ""),
    (r"pass convert=True to", "--convert", "pass --convert to", "use upscale/eval --convert to"),
    (r"pass recursive=True", "--recursive", "pass --recursive", "use eval --recursive"),
)


def _for_cli(message: str, flags: frozenset[str] = frozenset()) -> str:
    """``message`` with the Python advice of :data:`_CLI_HINTS` replaced by CLI flags."""
    for pattern, flag, with_flag, without in _CLI_HINTS:
        message = re.sub(pattern, with_flag if flag in flags else without, message)
    return message


def _dataset_spec(text: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`parse_dataset_spec` plus the command's ``--recursive`` / ``--convert`` flags."""
    from ..data import DATASET_TYPES

    spec = parse_dataset_spec(text)
    params = inspect.signature(DATASET_TYPES[spec["type"]].__init__).parameters
    if getattr(args, "recursive", False) and "recursive" in params:
        spec["recursive"] = True
    if getattr(args, "convert", False) and "convert" in params:
        spec["convert"] = True
    return spec


def _cmd_entropy_table(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..data.io import check_output_path
    from ..quant.granular_dq import compute_entropy_table, entropy_table_path, save_entropy_table

    out = Path(args.output)
    check_output_path(out if out.suffix == ".json" else entropy_table_path(out), what="table")
    ds = build_dataset(_dataset_spec(args.dataset, args), args.scale, "eval")
    table = compute_entropy_table(ds, patch=args.patch, t1=args.t1, t2=args.t2)
    save_entropy_table(table, args.output)
    h1, h2 = table.thresholds
    print(
        json.dumps(
            {
                "output": args.output,
                "dataset": args.dataset,
                "patch": args.patch,
                "t1": args.t1,
                "t2": args.t2,
                "H_t1": h1,
                "H_t2": h2,
            }
        )
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..data.io import check_output_path
    from ..deploy import format_size_report, save_packed
    from ..deploy.pack import packed_path

    check_output_path(packed_path(args.output), what="packed model", example="model.safetensors")
    model, _ = load_any_model(args.model, None)
    print(format_size_report(save_packed(model, args.output)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..data.io import check_output_path
    from ..deploy import export_onnx

    check_output_path(args.onnx, what="ONNX", example="model.onnx")
    model, _ = load_any_model(args.model, None)
    static_gates: Any = False
    if args.static_gates == "identity":
        static_gates = True
    elif args.static_gates == "mean":
        from ..data import BundledDataset
        from ..deploy.onnx_export import mean_gate_multipliers

        scale = int(model.model_config["scale"])
        ds = BundledDataset("train", scale, mode="eval")
        static_gates = mean_gate_multipliers(model, (ds[i]["lr"][None] for i in range(len(ds))))
    report = export_onnx(
        model,
        args.onnx,
        opset=args.opset,
        check=args.check,
        integer_convs=not args.float_convs,
        act_container=args.act_container,
        float_conv_weights=args.float_conv_weights,
        static_gates=static_gates,
        pixel_shuffle=args.pixel_shuffle,
        target=args.target,
    )
    print(report.summary())
    if not args.check:
        return 0
    if static_gates is not False and args.min_psnr is None:  # an approximation by request
        worst = min((p["psnr"] for p in report.parity), default=float("nan"))
        print(
            f"check: not judged (--static-gates approximation: lowest PSNR {worst:.1f} dB vs "
            "PyTorch; give --min-psnr to judge it)"
        )
        return 0
    min_psnr = DEFAULT_MIN_PSNR if args.min_psnr is None else args.min_psnr
    return _check_verdict(report.parity, min_psnr)


#: ``export --check`` passes when every test output is at least this close to PyTorch's (dB).
DEFAULT_MIN_PSNR = 40.0


def _check_verdict(parity: list[dict[str, Any]], min_psnr: float) -> int:
    """Print ``export --check``'s verdict (PASS/FAIL against ``min_psnr``); the exit status."""
    worst = min((p["psnr"] for p in parity), default=float("nan"))
    bits_ok = all(p.get("bits") == p.get("bits_torch") for p in parity)
    ok = bool(parity) and worst >= min_psnr and bits_ok
    why = f"lowest PSNR {worst:.1f} dB vs PyTorch, threshold {min_psnr:g} dB (--min-psnr)"
    if not bits_ok:
        why += "; Granular-DQ bit-widths differ from PyTorch's"
    print(f"check: {'PASS' if ok else 'FAIL'} ({why})")
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        scales=args.scale,
        out_dir=args.out,
        device=args.device,
        progress=not args.quiet,
        all_models=args.all,
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training import check_model_config, train

    overrides = list(args.set or [])
    if args.output_root:
        overrides.append(f"output_root={args.output_root}")
    cfg = load_config(args.config, overrides)
    if args.require_quant and not cfg.quant:
        raise LowbitsrError(f"{args.config}: 'lowbitsr quantize' needs a 'quant:' section")
    try:
        check_model_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    res = train(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
    )
    print(
        json.dumps({"run_dir": str(res.run_dir), "step": res.step, "best_val_psnr": res.best_psnr})
    )
    return 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _is_main() -> bool:
    from ..distributed import context

    return context().is_main


def _set_image_fab(model: object, image_fab: float, ref: str) -> None:
    """``--image-fab``: per-image rate control on a Granular-DQ model (one-line errors)."""
    from ..evaluate import is_dynamic_bits

    if not is_dynamic_bits(model):
        raise LowbitsrError(f"--image-fab needs a Granular-DQ model; {ref} is not one")
    try:
        model.set_image_fab(image_fab)  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise LowbitsrError(f"{ref}: --image-fab {image_fab:g}: {exc}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data import build_dataset
    from ..data.io import check_output_path
    from ..evaluate import evaluate, format_table, is_dynamic_bits

    for folder, what in ((args.json_dir, "JSON results"), (args.save_images, "SR images")):
        if folder:
            check_output_path(folder, folder=True, what=what)
    rows = []
    skipped: dict[str, list[str]] = {}  # dataset → report lines (the same files fail per model)
    notes: list[str] = []
    scale = args.scale
    if scale is None:  # 'bicubic' takes the scale of the first real model given
        for ref in args.models:
            if ref != "bicubic":
                scale = load_any_model(ref, None)[0].model_config["scale"]
                break
    loaded = []  # every model loaded and checked once, before any evaluation
    for ref in args.models:
        model, name = load_any_model(ref, scale)
        if model.model_config["scale"] != scale:
            raise LowbitsrError(f"{ref} is a x{model.model_config['scale']} model, not x{scale}")
        loaded.append((ref, model, name))
    if args.image_fab is not None:
        gdq = [(r, m) for r, m, _ in loaded if is_dynamic_bits(m)]
        if not gdq:
            raise LowbitsrError("--image-fab needs a Granular-DQ model; none of the models is one")
        for r, m in gdq:
            _set_image_fab(m, args.image_fab, r)
    for ref, model, name in loaded:
        for spec_text in args.dataset:
            spec = _dataset_spec(spec_text, args)
            ds = build_dataset(spec, scale, "eval")
            res = evaluate(
                model.to(args.device) if hasattr(model, "to") else model,
                ds,
                scale,
                model_name=name,
                dataset_name=spec_text,
                tile=args.tile,
                overlap=args.overlap,
                device=args.device,
                progress=not args.quiet,
                save_dir=(Path(args.save_images) / name) if args.save_images else None,
                skip_unreadable=True,
            )
            approx = res.info.get("tiled_approximately")
            if approx:
                notes.append(
                    f"note: {name} has DDTB dynamic gates, which pool over their whole input: "
                    f"{len(approx)} image(s) of {spec_text} larger than --tile {args.tile} ran "
                    "tile by tile, which changes its numbers slightly (--tile 0: whole images, "
                    "more memory)"
                )
            bad = res.info.get("skipped", [])
            if bad and spec_text not in skipped:
                total, names = len(res.images) + len(bad), ", ".join(b["name"] for b in bad)
                skipped[spec_text] = [
                    f"lowbitsr: skipped {len(bad)} of {total} images of {spec_text}: {names}",
                    *(f"  {_for_cli(b['error'], args.cli_flags)}" for b in bad),
                ]
            rows.append(
                {
                    "model": name,
                    "dataset": spec_text,
                    "scale": scale,
                    "images": len(res.images),
                    "PSNR": res.psnr,
                    "SSIM": res.ssim,
                    "FAB": "-" if name == "bicubic" else res.fab,
                    "GBitOPs/64x64": res.info.get("gbitops", "-"),
                }
            )
            if args.json_dir and _is_main():
                from ..report import eval_provenance

                sr_dir = (Path(args.save_images) / name) if args.save_images else None
                res.info.update(eval_provenance(ref, model, tile=args.tile, save_dir=sr_dir))
                safe = spec_text.replace("/", "_").replace(":", "_")
                res.save_json(Path(args.json_dir) / f"{name}__{safe}.json")
    print(format_table(rows))
    print(
        "FAB: feature average bit-width (32 = float). BitOPs per 64x64 LR input: "
        "sum over convs of MACs * w_bits * a_bits / 64 (float layers 32x32)."
    )
    for line in notes:
        print(line, file=sys.stderr)
    for lines in skipped.values():
        print("\n".join(lines), file=sys.stderr)
    return 1 if skipped else 0


def _gdq_upscale(model: Any, img: Any, scale: int, device: str) -> tuple[Any, Any]:
    """Granular-DQ tiled inference of one uint8 image → (uint8 SR image, bit map)."""
    import torch

    from ..evaluate import _to_uint8
    from ..quant.granular_dq import gdq_super_resolve

    lr = torch.from_numpy(img).permute(2, 0, 1)[None].float().to(device)
    model = model.to(device).eval()
    sr, bit_map = gdq_super_resolve(model, lr, scale, model.config.tile, model.config.tile_step)
    return _to_uint8(sr[0]), bit_map


_PNG = "image.png"  # the file name suggested when an image output names a folder


def _refuse_overwriting_inputs(pairs: list[tuple[Path, Path]], bitmap: str | None) -> None:
    """Raise, before any work, when an output image (or ``--bitmap`` file) of ``upscale`` is one
    of its input images: the same path, another spelling of it (``./in.png``) or a link to it."""

    def identity(p: Path) -> tuple[int, int] | None:
        try:
            st = p.stat()  # follows symbolic links
        except OSError:
            return None  # not there (yet): cannot be an input
        return st.st_dev, st.st_ino

    inputs = {identity(f): f for f, _ in pairs}
    inputs.pop(None, None)
    outputs = [(out, "output") for _, out in pairs]
    if bitmap:
        one = len(pairs) == 1
        bitmaps = [Path(bitmap)] if one else [o.with_suffix(".bits.png") for o, _ in outputs]
        outputs += [(b, "--bitmap") for b in bitmaps]
    for out, what in outputs:
        src = inputs.get(identity(out))
        if src is not None:
            same = "" if str(out) == str(src) else f" (the input image {src})"
            raise LowbitsrError(
                f"{out}: is an input image{same}; refusing to overwrite it, "
                f"give another {what} path"
            )


def _cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data import IMAGE_EXTENSIONS, read_image, write_image
    from ..data.io import WRITE_SUFFIXES, check_output_path
    from ..evaluate import is_dynamic_bits, upscale_image
    from ..quant.bitops import fab
    from ..viz import bitmap_panel

    if args.backend in ("onnx", "openvino"):
        model, _ = load_any_model(args.model, backend=args.backend, threads=args.threads)
        scale = model.scale
        granular = model.granular_dq
    elif args.backend == "torch-int8":
        import torch

        from ..deploy.torch_int8 import to_torch_int8

        if args.threads:
            torch.set_num_threads(args.threads)
        fq, _ = load_any_model(args.model, args.scale)
        model = to_torch_int8(fq)
        scale = model.model_config["scale"]
        granular = False
    else:
        model, _ = load_any_model(args.model, args.scale)
        scale = model.model_config["scale"]
        granular = is_dynamic_bits(model)
        if args.image_fab is not None:
            _set_image_fab(model, args.image_fab, args.model)
    if args.image_fab is not None and args.backend != "torch":
        raise LowbitsrError(f"--image-fab runs on --backend torch, not {args.backend}")
    if args.scale is not None and args.scale != scale:
        raise LowbitsrError(
            f"{args.model} is a x{scale} model; it cannot upscale by --scale {args.scale} "
            f"(leave --scale out, or give a x{args.scale} model)"
        )
    if args.bitmap and not granular:
        raise LowbitsrError(f"--bitmap needs a Granular-DQ model; {args.model} is not one")
    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        found = src.rglob("*") if args.recursive else src.iterdir()
        files = sorted(
            p
            for p in found
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(src).parts)
        )
        if not files:
            where = " or its sub-folders" if args.recursive else ""
            hint = "" if args.recursive else " (pass --recursive to search sub-folders)"
            raise LowbitsrError(f"{src}: no images found in this folder{where}{hint}")
        pairs = [(f, dst / f.relative_to(src).parent / f"{f.stem}_x{scale}.png") for f in files]
        check_output_path(dst, folder=True, what="upscaled images")
    else:
        pairs = [(src, dst)]
        check_output_path(dst, suffixes=WRITE_SUFFIXES, what="upscaled image", example=_PNG)
        if args.bitmap:
            check_output_path(args.bitmap, suffixes=WRITE_SUFFIXES, what="bit map", example=_PNG)
    _refuse_overwriting_inputs(pairs, args.bitmap)
    failed: list[tuple[Path, str]] = []
    for f, out in tqdm(pairs, desc="upscale", disable=args.quiet or len(pairs) == 1):
        try:
            img = read_image(f, convert=args.convert, max_pixels=args.max_pixels)
        except LowbitsrError as exc:
            if len(pairs) == 1:
                raise
            failed.append((f, str(exc)))  # keep going: one bad file must not lose the rest
            continue
        bit_map = None
        if args.backend == "onnx" and granular:  # per-tile bits decided in the graph
            from ..deploy import upscale_image_gdq_onnx

            q = model.quant or {}
            tile_step = (int(q.get("tile", 96)), int(q.get("tile_step", 90)))
            sr, bit_map = upscale_image_gdq_onnx(model, img, *tile_step)
        elif args.backend in ("onnx", "openvino"):
            from ..deploy import upscale_image_onnx

            sr = upscale_image_onnx(model, img, tile=args.tile, overlap=args.overlap)
        elif granular:  # Granular-DQ: its own tiling, one bit-width per tile
            sr, bit_map = _gdq_upscale(model, img, scale, args.device)
            tile_step = (model.config.tile, model.config.tile_step)
        else:
            sr = upscale_image(
                model.to(args.device),
                img,
                scale,
                tile=args.tile,
                overlap=args.overlap,
                device=args.device,
            )
        write_image(out, sr)
        print(f"{f} -> {out} ({sr.shape[1]}x{sr.shape[0]})")
        if args.bitmap and bit_map is not None:
            bm_path = Path(args.bitmap) if len(pairs) == 1 else out.with_suffix(".bits.png")
            write_image(bm_path, bitmap_panel(sr, bit_map, img.shape[:2], *tile_step))
            print(f"bit map -> {bm_path} (FAB {fab(bit_map):.2f}; left: the image, right: bits)")
    if failed:
        names = ", ".join(str(f.relative_to(src)) for f, _ in failed)
        print(
            f"lowbitsr: skipped {len(failed)} of {len(pairs)} images (unreadable): {names}",
            file=sys.stderr,
        )
        for _, msg in failed:
            print(f"  {_for_cli(msg, args.cli_flags)}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..data.io import check_output_path
    from ..report import ReportError, build_report

    check_output_path(args.output, folder=True, what="report")
    crop_at = None
    if args.crop:
        x, sep, y = args.crop.partition(",")
        if not (sep and x.strip().isdigit() and y.strip().isdigit()):
            raise ReportError(f"--crop {args.crop!r}: write X,Y (top-left, HR pixels)")
        crop_at = (int(x), int(y))
    res = build_report(
        args.inputs,
        args.output,
        crops=args.crops,
        bitmaps=args.bitmaps,
        crop_size=args.crop_size,
        crop_at=crop_at,
        images=args.image,
        max_images=args.max_images,
        dataset=args.dataset,
        models=args.model,
        device=args.device,
        title=args.title,
    )
    print(f"report -> {res.markdown} and {res.html} ({len(res.figures)} figures)")
    for note in res.notes:
        print(_for_cli(f"note: {note}".replace("`", ""), args.cli_flags), file=sys.stderr)
    return 0
