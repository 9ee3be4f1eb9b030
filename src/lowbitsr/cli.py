"""The ``lowbitsr`` command line: parses arguments and calls the library (no logic of its own).

Every user error (bad path, corrupt image, wrong checkpoint, bad config) is printed as one line
``lowbitsr: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import LowbitsrError

__all__ = ["main", "parse_dataset_spec"]

DATASET_HELP = (
    "dataset: bundled[:test|valid|train], div2k:ROOT[:FIRST-LAST], benchmark:ROOT/NAME "
    "(EDSR-PyTorch layout, e.g. benchmark:/data/benchmark/Set5), folder:DIR (HR images; LR made "
    "by bicubic)"
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, unless the default is empty (None/False)
    or the help already tells it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or re.search(r"\(default|default\)|%\(default", text)  # the help tells it already
        ):
            return text
        return text + " (default: %(default)s)"


#: Help of options every command spells the same way (filled in where a command left it out).
_COMMON_HELP = {
    "device": "torch device to run on, e.g. cpu, cuda, cuda:1",
    "quiet": "no progress bars",
}


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


_non_negative = _int_at_least(0)
_positive = _int_at_least(1)


def _overlap_arg(text: str) -> int | None:
    """``auto`` (None: the model's receptive field) or a non-negative number of LR pixels."""
    return None if text == "auto" else _non_negative(text)


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
    from .data import DATASET_TYPES

    spec = parse_dataset_spec(text)
    params = inspect.signature(DATASET_TYPES[spec["type"]].__init__).parameters
    if getattr(args, "recursive", False) and "recursive" in params:
        spec["recursive"] = True
    if getattr(args, "convert", False) and "convert" in params:
        spec["convert"] = True
    return spec


def parse_dataset_spec(spec: str) -> dict[str, Any]:
    """Turn a ``kind:arg`` string into a dataset spec for :func:`lowbitsr.data.build_dataset`."""
    kind, _, rest = spec.partition(":")
    if kind == "bundled":
        return {"type": "bundled", "split": rest or "test"}
    if kind == "div2k":
        root, _, rng = rest.partition(":")
        out: dict[str, Any] = {"type": "div2k", "root": root}
        if rng:
            a, _, b = rng.partition("-")
            out["index_range"] = [int(a), int(b)]
            out["split"] = "valid" if int(a) > 800 else "train"
        return out
    if kind == "benchmark":
        p = Path(rest)
        return {"type": "benchmark", "root": str(p.parent), "name": p.name}
    if kind == "folder":
        return {"type": "folder", "root": rest}
    raise LowbitsrError(f"dataset spec {spec!r} not understood; {DATASET_HELP}")


def _load_any_model(ref: str, scale: int | None) -> tuple[Any, str]:
    """A model from ``bicubic``, ``pretrained:NAME``/a shipped name, or a saved-model path."""
    from .checkpoint import load_model
    from .evaluate import Bicubic
    from .pretrained import list_pretrained, load_pretrained

    if ref == "bicubic":
        if scale is None:
            raise LowbitsrError("the bicubic baseline needs --scale")
        return Bicubic(scale), "bicubic"
    name = ref.split(":", 1)[1] if ref.startswith("pretrained:") else ref
    if name in list_pretrained():
        return load_pretrained(name), name
    if not Path(ref).exists() and not Path(ref + ".json").exists():
        raise LowbitsrError(
            f"{ref}: no such saved model or pretrained name "
            f"(pretrained: {', '.join(list_pretrained())})"
        )
    from .deploy import is_packed_file, load_packed

    if is_packed_file(ref):
        return load_packed(ref), Path(ref).stem
    return load_model(ref), Path(ref).stem


def _cmd_entropy_table(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .data.io import check_output_path
    from .quant.granular_dq import compute_entropy_table, entropy_table_path, save_entropy_table

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
    from .data.io import check_output_path
    from .deploy import format_size_report, save_packed
    from .deploy.pack import packed_path

    check_output_path(packed_path(args.output), what="packed model", example="model.safetensors")
    model, _ = _load_any_model(args.model, None)
    print(format_size_report(save_packed(model, args.output)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .data.io import check_output_path
    from .deploy import export_onnx

    check_output_path(args.onnx, what="ONNX", example="model.onnx")
    model, _ = _load_any_model(args.model, None)
    static_gates: Any = False
    if args.static_gates == "identity":
        static_gates = True
    elif args.static_gates == "mean":
        from .data import BundledDataset
        from .deploy.onnx_export import mean_gate_multipliers

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
    from .demo import run_demo

    run_demo(
        scales=args.scale,
        out_dir=args.out,
        device=args.device,
        progress=not args.quiet,
        all_models=args.all,
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    from .train import check_model_config, train

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
    from .distributed import context

    return context().is_main


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .data.io import check_output_path
    from .evaluate import evaluate, format_table

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
                scale = _load_any_model(ref, None)[0].model_config["scale"]
                break
    for ref in args.models:
        model, name = _load_any_model(ref, scale)
        if model.model_config["scale"] != scale:
            raise LowbitsrError(f"{ref} is a x{model.model_config['scale']} model, not x{scale}")
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
                from .report import eval_provenance

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

    from .evaluate import _to_uint8
    from .quant.granular_dq import gdq_super_resolve

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

    from .data import IMAGE_EXTENSIONS, read_image, write_image
    from .data.io import WRITE_SUFFIXES, check_output_path
    from .evaluate import is_dynamic_bits, upscale_image
    from .quant.bitops import fab
    from .viz import bitmap_panel

    if args.backend == "onnx":
        from .deploy import OnnxSR

        if not Path(args.model).is_file():
            raise LowbitsrError(f"{args.model}: no such ONNX file (make one with lowbitsr export)")
        model = OnnxSR(args.model, threads=args.threads)
        scale = model.scale
        granular = model.granular_dq
    else:
        model, _ = _load_any_model(args.model, args.scale)
        scale = model.model_config["scale"]
        granular = is_dynamic_bits(model)
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
            from .deploy import upscale_image_gdq_onnx

            q = model.quant or {}
            tile_step = (int(q.get("tile", 96)), int(q.get("tile_step", 90)))
            sr, bit_map = upscale_image_gdq_onnx(model, img, *tile_step)
        elif args.backend == "onnx":
            from .deploy import upscale_image_onnx

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
    from .data.io import check_output_path
    from .report import ReportError, build_report

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowbitsr`` command."""
    from .evaluate import DEFAULT_EVAL_TILE

    p = argparse.ArgumentParser(
        prog="lowbitsr",
        description="Ultra-low-bit quantization of super-resolution networks (DDTB, PAMS, "
        "Granular-DQ): train, quantize, evaluate and run SR models.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lowbitsr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="evaluate the shipped models on the bundled test images")
    d.add_argument(
        "--scale", type=_positive, nargs="*", default=None, help="scales (default: all shipped)"
    )
    d.add_argument("--out", default="demo_out", help="folder for the SR images (default demo_out)")
    d.add_argument(
        "--all",
        action="store_true",
        help="every shipped model, also the small edsr_tiny ones kept for tests",
    )
    d.add_argument("--device", default="cpu")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    for name, req_quant, help_text in (
        ("train", False, "train a model from a YAML experiment config"),
        ("quantize", True, "quantization-aware training (QAT) from a YAML config with quant:"),
    ):
        t = sub.add_parser(name, help=help_text)
        t.add_argument("config", help="experiment YAML (see configs/)")
        t.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.iterations=100 (repeatable)",
        )
        t.add_argument(
            "--resume",
            action="store_true",
            help="continue the run from its checkpoint; only train.* schedule keys (iterations, "
            "lr, ...) may differ from the run's config, and they apply from there on",
        )
        t.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an earlier run of the same name (its checkpoints, log and models); "
            "without --resume or --overwrite an existing run is refused",
        )
        t.add_argument("--output-root", default=None, help="override output_root")
        t.add_argument("--device", default="cpu")
        t.add_argument("--quiet", action="store_true")
        t.set_defaults(func=_cmd_train, require_quant=req_quant)

    e = sub.add_parser("eval", help="PSNR/SSIM (Y channel, border = scale) of models on datasets")
    e.add_argument(
        "models",
        nargs="+",
        help="saved model paths (run folder or .safetensors), shipped names, or 'bicubic'",
    )
    e.add_argument("--dataset", action="append", required=True, help=DATASET_HELP)
    e.add_argument(
        "--scale",
        type=_positive,
        default=None,
        help="needed for 'bicubic' when no other model is given (else taken from the models)",
    )
    e.add_argument(
        "--tile",
        type=_non_negative,
        default=DEFAULT_EVAL_TILE,
        help="tile size in LR pixels, 0 = whole image (memory grows with the image). Images up "
        "to the tile size run whole; larger ones give the whole-image result with the automatic "
        "overlap, except DDTB models with dynamic gates (their gates then see each tile)",
    )
    e.add_argument(
        "--overlap",
        type=_overlap_arg,
        default=None,
        metavar="N|auto",
        help="LR context pixels around each tile (default: auto, the model's receptive field)",
    )
    e.add_argument(
        "--recursive", action="store_true", help="folder: datasets: also read sub-folders"
    )
    e.add_argument(
        "--convert", action="store_true", help="accept greyscale/RGBA/16-bit images (made RGB)"
    )
    e.add_argument("--json-dir", default=None, help="write per-image JSON results here")
    e.add_argument("--save-images", default=None, help="write SR images here")
    e.add_argument("--device", default="cpu")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    u = sub.add_parser("upscale", help="super-resolve one image or a folder of images")
    u.add_argument("model", help="saved model path or shipped name")
    u.add_argument("input", help="image file or folder")
    u.add_argument("output", help="output image file (or folder when input is a folder)")
    u.add_argument("--tile", type=_non_negative, default=256, help="LR tile size (0 = whole image)")
    u.add_argument(
        "--overlap", type=_non_negative, default=16, help="LR context pixels around each tile"
    )
    u.add_argument(
        "--convert", action="store_true", help="accept greyscale/RGBA/16-bit images (made RGB)"
    )
    u.add_argument(
        "--max-pixels",
        type=_positive,
        default=100_000_000,
        help="refuse larger images (width x height) before decoding them",
    )
    u.add_argument(
        "--recursive",
        action="store_true",
        help="input folder: also upscale the images of its sub-folders (same layout in OUTPUT)",
    )
    u.add_argument(
        "--bitmap",
        default=None,
        help="Granular-DQ models: save the SR image beside its per-tile bit map (colour and "
        "number per tile, with a legend) here (for a folder: <name>.bits.png beside each output)",
    )
    u.add_argument(
        "--scale",
        type=_positive,
        default=None,
        help="upscaling factor: needed for 'bicubic'; for a model, refused unless it is the "
        "model's own",
    )
    u.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: MODEL is an .onnx file from 'lowbitsr export' run by onnxruntime",
    )
    u.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="onnxruntime intra-op threads (default: onnxruntime's, one per physical core)",
    )
    u.add_argument("--device", default="cpu")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=_cmd_upscale)
    h = sub.add_parser(
        "entropy-table",
        help="Granular-DQ E2B: entropy quantile thresholds of a training set's LR patches",
    )
    h.add_argument("--dataset", default="bundled:train", help=DATASET_HELP)
    h.add_argument(
        "--recursive", action="store_true", help="folder: datasets: also read sub-folders"
    )
    h.add_argument(
        "--convert", action="store_true", help="accept greyscale/RGBA/16-bit images (made RGB)"
    )
    h.add_argument(
        "--scale",
        type=_positive,
        default=4,
        help="upscaling factor of the model the table is for (LR patches are HR / scale)",
    )
    h.add_argument("--patch", type=int, default=48, help="LR patch side (the training crop)")
    h.add_argument("--t1", type=float, default=0.5, help="quantile of the 4/5-bit threshold")
    h.add_argument("--t2", type=float, default=0.9, help="quantile of the 5/8-bit threshold")
    h.add_argument(
        "--output",
        default="entropy_table.json",
        help="JSON file to write (a checkpoint path: the table goes beside it)",
    )
    h.set_defaults(func=_cmd_entropy_table)

    c = sub.add_parser("convert", help="freeze a DDTB/PAMS model into a bit-packed integer file")
    c.add_argument("model", help="saved model path or shipped name (DDTB/PAMS)")
    c.add_argument("output", help="packed .safetensors file to write")
    c.set_defaults(func=_cmd_convert)

    x = sub.add_parser("export", help="export a model to ONNX (QCDQ for static low-bit layers)")
    x.add_argument("model", help="saved model, packed file or shipped name")
    x.add_argument("--onnx", required=True, help="output .onnx file")
    x.add_argument(
        "--opset", type=int, default=17, help="ONNX default-domain opset version (13..21)"
    )
    x.add_argument(
        "--check",
        action="store_true",
        help="run onnxruntime against PyTorch on test inputs: parity, fused ops and a PASS/FAIL "
        "verdict (exit status 1 on FAIL)",
    )
    x.add_argument(
        "--min-psnr",
        type=float,
        default=None,
        help="--check passes when every test output is at least this close to PyTorch's, in dB "
        f"(default: {DEFAULT_MIN_PSNR:g}; --static-gates exports are judged only when given)",
    )
    x.add_argument(
        "--float-convs",
        action="store_true",
        help="keep every conv in float (no int32 bias / QLinearConv): parity to float noise",
    )
    x.add_argument(
        "--act-container",
        choices=["uint8", "int8"],
        default="uint8",
        help="8-bit type of the activation codes: uint8 (x86 onnxruntime fuses it into integer "
        "QLinearConv) or int8 (fused on ARM builds only)",
    )
    x.add_argument(
        "--float-conv-weights",
        choices=["float", "codes"],
        default="float",
        help="weights of the convs that run in float: float32 (fast NCHWc kernels, default) or "
        "int8 codes + DequantizeLinear (smaller file, slower)",
    )
    x.add_argument(
        "--static-gates",
        choices=["identity", "mean"],
        help="APPROXIMATION (changes outputs, off by default): export DDTB's gated quantizers "
        "with static bounds, the gate's identity or its mean multiplier on the bundled train "
        "images; measure the PSNR before using it",
    )
    x.add_argument(
        "--pixel-shuffle",
        choices=["transpose", "depth_to_space"],
        default="transpose",
        help="pixel shuffle as Reshape/Transpose (faster in onnxruntime) or one DepthToSpace",
    )
    x.set_defaults(func=_cmd_export)

    r = sub.add_parser(
        "report",
        help="Markdown/HTML report (tables, plots, crops, Granular-DQ bit maps) from eval JSON",
    )
    r.add_argument("inputs", nargs="+", help="eval JSON files or folders (eval --json-dir)")
    r.add_argument("--output", "-o", required=True, help="report folder (report.md, report.html)")
    r.add_argument(
        "--crops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="side-by-side crops of HR, bicubic, float and quantized outputs",
    )
    r.add_argument(
        "--bitmaps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Granular-DQ bit maps",
    )
    r.add_argument("--crop-size", type=int, default=120, help="crop side in HR pixels")
    r.add_argument("--crop", default=None, metavar="X,Y", help="crop top-left (default: auto)")
    r.add_argument(
        "--image", action="append", help="image to show (repeatable; default: most different)"
    )
    r.add_argument("--max-images", type=int, default=2, help="images shown when no --image")
    r.add_argument(
        "--dataset",
        action="append",
        metavar="[NAME=]SPEC",
        help="dataset to read the images from, overriding the JSON's (e.g. data moved)",
    )
    r.add_argument(
        "--model",
        action="append",
        metavar="NAME=SPEC",
        help="how to load a model whose JSON records no spec (saved path or shipped name)",
    )
    r.add_argument("--title", default="Low-bit super-resolution report", help="the report's title")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=_cmd_report)
    _finish(sub)
    return p


def _finish(sub: argparse._SubParsersAction) -> None:
    """Per command: defaults shown in ``--help``, the shared help texts, its flags (for
    :func:`_for_cli`)."""
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
        for action in command._actions:
            if not action.help and action.dest in _COMMON_HELP:
                action.help = _COMMON_HELP[action.dest]
        flags = frozenset(o for a in command._actions for o in a.option_strings)
        command.set_defaults(cli_flags=flags)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbitsr`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    flags: frozenset[str] = args.cli_flags
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
            from .distributed import init_from_env

            if not init_from_env(getattr(args, "device", "cpu")).is_main:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone prints
        status = int(args.func(args))
        _leave_process_group()
        return status
    except LowbitsrError as exc:
        print(f"lowbitsr: error: {_for_cli(str(exc), flags)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks above could not foresee (disk full, races, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lowbitsr: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lowbitsr: interrupted (a resumable checkpoint is kept for train/quantize)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
