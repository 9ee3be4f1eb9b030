"""The argument parser of the ``lowbitsr`` command (:func:`build_parser`): sub-commands,
options, their types and the ``--help`` formatting."""

from __future__ import annotations

import argparse
import re
from typing import Any

from .. import __version__
from ..specs import DATASET_HELP
from .commands import (
    DEFAULT_MIN_PSNR,
    _cmd_convert,
    _cmd_demo,
    _cmd_entropy_table,
    _cmd_eval,
    _cmd_export,
    _cmd_report,
    _cmd_train,
    _cmd_upscale,
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


def _add_image_fab(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-fab",
        type=float,
        default=None,
        metavar="F",
        help="Granular-DQ models with a learned controller and E2B off (e.g. a rate-distortion "
        "refit): hold every image's mean bits at most F (per-image rate control)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowbitsr`` command."""
    from ..evaluate import DEFAULT_EVAL_TILE

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
    _add_image_fab(e)
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
    _add_image_fab(u)
    u.add_argument(
        "--backend",
        choices=["torch", "onnx", "openvino", "torch-int8"],
        default="torch",
        help="onnx / openvino: MODEL is an .onnx file from 'lowbitsr export' run by onnxruntime "
        "/ OpenVINO (f32 precision; pip install openvino); torch-int8: an integer-layout "
        "DDTB/PAMS model (quant.layout: integer) on PyTorch's int8 kernels",
    )
    u.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="onnxruntime/OpenVINO/PyTorch threads (default: the runtime's own)",
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
        "--target",
        choices=["onnxruntime", "openvino"],
        default="onnxruntime",
        help="runtime the graph is tuned for (same numbers): its pixel shuffle form; with "
        "--check, openvino also checks OpenVINO's parity",
    )
    x.add_argument(
        "--pixel-shuffle",
        choices=["transpose", "depth_to_space"],
        default=None,
        help="pixel shuffle as Reshape/Transpose (faster in onnxruntime) or one DepthToSpace "
        "(faster in OpenVINO); default: the --target's",
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
