"""Issue #11: one-line errors instead of tracebacks, nothing silently accepted, bounded memory
defaults, complete ``--help``, a readable ``--bitmap`` and umask-following output files."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbitsr.checkpoint import save_model
from lowbitsr.cli import build_parser, main
from lowbitsr.models import create_model

needs_non_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions"
)


@pytest.fixture
def tiny_saved(tmp_path: Path) -> Path:
    """A 1-block ×2 EDSR saved as ``tmp_path/tiny.{json,safetensors}``."""
    torch.manual_seed(0)
    model = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    save_model(model, tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def small_png(tmp_path: Path) -> Path:
    """A 12×10 RGB PNG."""
    rng = np.random.default_rng(1)
    p = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file that callers try to use as a folder."""
    p = tmp_path / "plain.txt"
    p.write_text("not a folder")
    return p


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The captured stderr is exactly one ``lowbitsr: error:`` line containing ``needles``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbitsr: error:"), err
    assert len(err.splitlines()) == 1, err  # no traceback
    for needle in needles:
        assert needle in err, err
    return err


def _forbid(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``target`` (``module.attr``) fail the test if it is called: the work must not start."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{target} ran although the output cannot be written")

    module, _, attr = target.rpartition(".")
    # by module object: the package lowbitsr exports a function named like its module evaluate
    monkeypatch.setattr(importlib.import_module(module), attr, boom)


# ----------------------------------------------------------------------- one-line errors
def test_garbage_onnx_is_a_one_line_error(tmp_path, small_png, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    out = tmp_path / "o.png"
    assert main(["upscale", str(bad), str(small_png), str(out), "--backend", "onnx"]) == 2
    one_line_error(capsys, "garbage.onnx", "export")


def test_export_unwritable_output(a_file, tmp_path, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.deploy.export_onnx")
    assert main(["export", "edsr_tiny_x4_fp", "--onnx", str(a_file / "m.onnx")]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")
    assert main(["export", "edsr_tiny_x4_fp", "--onnx", str(tmp_path)]) == 2
    one_line_error(capsys, "is a folder", ".onnx")


@needs_non_root
def test_export_permission_denied(tmp_path, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.deploy.export_onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["export", "edsr_tiny_x4_fp", "--onnx", str(ro / "m.onnx")]) == 2
    finally:
        ro.chmod(0o700)
    one_line_error(capsys, "ro", "permission")


def test_convert_unwritable_output(a_file, tmp_path, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.deploy.save_packed")
    assert main(["convert", "edsr_tiny_x4_ddtb_w4a4", str(a_file / "sub" / "p")]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")


def test_eval_json_dir_unwritable(tiny_saved, image_folder, a_file, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.evaluate.evaluate")
    base = ["eval", str(tiny_saved), "--dataset", f"folder:{image_folder}", "--quiet"]
    assert main([*base, "--json-dir", str(a_file)]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")
    assert main([*base, "--save-images", str(a_file / "x")]) == 2
    one_line_error(capsys, "plain.txt")


def test_report_unwritable_output(tiny_saved, image_folder, tmp_path, a_file, capsys):
    jdir = tmp_path / "j"
    args = ["eval", str(tiny_saved), "--dataset", f"folder:{image_folder}", "--quiet"]
    assert main([*args, "--json-dir", str(jdir)]) == 0
    capsys.readouterr()
    assert main(["report", str(jdir), "-o", str(a_file), "--no-crops"]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")
    assert main(["report", str(jdir), "-o", str(a_file / "r"), "--no-crops"]) == 2
    one_line_error(capsys, "plain.txt")


def test_upscale_checks_outputs_before_the_work(
    tiny_saved, small_png, image_folder, tmp_path, a_file, capsys, monkeypatch
):
    _forbid(monkeypatch, "lowbitsr.evaluate.upscale_image")
    model = str(tiny_saved)
    assert main(["upscale", model, str(small_png), str(a_file / "o.png")]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")
    assert main(["upscale", model, str(small_png), str(tmp_path / "o.xyz")]) == 2
    one_line_error(capsys, "o.xyz", ".png")
    assert main(["upscale", model, str(image_folder), str(a_file)]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")
    bm = ["--bitmap", str(a_file / "b.png")]
    assert main(["upscale", "edsr_tiny_x4_gdq", str(small_png), str(tmp_path / "o.png"), *bm]) == 2
    one_line_error(capsys, "plain.txt")


def test_demo_checks_output_before_the_work(a_file, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.demo.evaluate")
    assert main(["demo", "--out", str(a_file), "--quiet"]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")


def test_entropy_table_checks_output_before_the_work(a_file, capsys, monkeypatch):
    _forbid(monkeypatch, "lowbitsr.quant.granular_dq.compute_entropy_table")
    assert main(["entropy-table", "--output", str(a_file / "t.json")]) == 2
    one_line_error(capsys, "plain.txt", "not a folder")


def test_demo_unknown_scale_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--scale", "3", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    one_line_error(capsys, "scale(s) 3", "shipped scales")


def test_oserror_safety_net_is_one_line(tiny_saved, small_png, tmp_path, capsys, monkeypatch):
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr("lowbitsr.data.write_image", denied)
    assert main(["upscale", str(tiny_saved), str(small_png), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "locked.png", "Permission denied")


# ---------------------------------------------------------------------- silently accepted
@pytest.mark.parametrize(
    "argv",
    [
        ["upscale", "m", "i", "o", "--tile", "-5"],
        ["upscale", "m", "i", "o", "--overlap", "-1"],
        ["upscale", "m", "i", "o", "--scale", "0"],
        ["eval", "m", "--dataset", "bundled", "--tile", "-5"],
        ["upscale", "m", "i", "o", "--max-pixels", "0"],
    ],
)
def test_negative_numbers_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --" in err and argv[-2] in err


def test_upscale_scale_must_match_the_model(small_png, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["upscale", "edsr_tiny_x4_fp", str(small_png), str(out), "--scale", "2"]) == 2
    one_line_error(capsys, "x4", "--scale 2")
    assert not out.exists()
    assert main(["upscale", "edsr_tiny_x4_fp", str(small_png), str(out), "--scale", "4"]) == 0
    assert Image.open(out).size == (48, 40)


def test_upscale_output_is_an_existing_folder(tiny_saved, small_png, tmp_path, capsys):
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["upscale", str(tiny_saved), str(small_png), str(folder)]) == 2
    err = one_line_error(capsys, "outdir", "is a folder")
    assert "suffix ''" not in err and ".png" in err


def test_write_image_to_a_folder_says_so(tmp_path):
    from lowbitsr.data import write_image
    from lowbitsr.errors import ImageError

    with pytest.raises(ImageError, match="is a folder"):
        write_image(tmp_path, np.zeros((4, 4, 3), np.uint8))


def test_max_pixels_hint_names_the_flag(tiny_saved, small_png, tmp_path, capsys):
    from lowbitsr.data import read_image
    from lowbitsr.errors import ImageError

    with pytest.raises(ImageError, match="max_pixels"):  # library users get the argument
        read_image(small_png, max_pixels=10)
    args = ["upscale", str(tiny_saved), str(small_png), str(tmp_path / "o.png")]
    assert main([*args, "--max-pixels", "10"]) == 2
    err = one_line_error(capsys, "--max-pixels")
    assert "max_pixels=" not in err and "raise max_pixels" not in err
    assert main([*args, "--max-pixels", "120"]) == 0


def test_convert_hint_names_the_flag(tiny_saved, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((9, 9), 80, np.uint8)).save(grey)
    assert main(["upscale", str(tiny_saved), str(grey), str(tmp_path / "o.png")]) == 2
    err = one_line_error(capsys, "--convert")
    assert "convert=True" not in err


def test_recursive_hint_and_flag(tiny_saved, image_folder, tmp_path, capsys):
    top = tmp_path / "nested"
    (top / "sub").mkdir(parents=True)
    for f in sorted(image_folder.glob("*.png"))[:2]:
        (top / "sub" / f.name).write_bytes(f.read_bytes())
    args = ["eval", str(tiny_saved), "--dataset", f"folder:{top}", "--quiet"]
    assert main(args) == 2
    err = one_line_error(capsys, "--recursive")
    assert "recursive=True" not in err
    assert main([*args, "--recursive"]) == 0
    assert "| 2 " in capsys.readouterr().out  # two images evaluated
    out = tmp_path / "up"
    assert main(["upscale", str(tiny_saved), str(top), str(out), "--quiet"]) == 2
    one_line_error(capsys, "--recursive")
    assert main(["upscale", str(tiny_saved), str(top), str(out), "--quiet", "--recursive"]) == 0
    assert len(list((out / "sub").glob("*_x2.png"))) == 2


def test_upscale_folder_reports_skipped_count(tiny_saved, image_folder, tmp_path, capsys):
    (image_folder / "zz_bad.png").write_bytes(b"not an image")
    out = tmp_path / "o"
    assert main(["upscale", str(tiny_saved), str(image_folder), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "skipped 1 of 5 images" in err and "zz_bad.png" in err
    assert len(list(out.glob("*.png"))) == 4


def test_eval_folder_skips_bad_files(tiny_saved, image_folder, tmp_path, capsys):
    (image_folder / "zz_bad.png").write_bytes(b"not an image")
    jdir = tmp_path / "j"
    args = ["eval", str(tiny_saved), "--dataset", f"folder:{image_folder}", "--quiet"]
    assert main([*args, "--json-dir", str(jdir)]) == 1
    cap = capsys.readouterr()
    assert "PSNR" in cap.out
    assert "skipped 1 of 5 images" in cap.err and "zz_bad" in cap.err
    (saved,) = jdir.glob("*.json")
    data = json.loads(saved.read_text())
    assert len(data["images"]) == 4 and data["info"]["skipped"][0]["name"] == "zz_bad"


# ------------------------------------------------------------------------------- memory
def test_eval_tiles_by_default_with_exact_overlap(image_folder):
    from lowbitsr.data import build_dataset
    from lowbitsr.evaluate import DEFAULT_EVAL_TILE, evaluate, receptive_radius

    args = build_parser().parse_args(["eval", "m", "--dataset", "bundled"])
    assert args.tile == DEFAULT_EVAL_TILE > 0 and args.overlap is None  # None: automatic
    assert inspect.signature(evaluate).parameters["tile"].default == DEFAULT_EVAL_TILE
    torch.manual_seed(0)
    model = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=8)
    assert receptive_radius(model) >= 1 + 2 * 2 + 1  # head, 2 blocks of 2 convs, body end
    ds = build_dataset({"type": "folder", "root": str(image_folder)}, 2, "eval")
    whole = evaluate(model, ds, 2, tile=0, progress=False)
    tiled = evaluate(model, ds, 2, tile=7, progress=False)  # overlap: the receptive field
    assert [r.psnr for r in tiled.images] == [r.psnr for r in whole.images]
    short = evaluate(model, ds, 2, tile=7, overlap=1, progress=False)
    assert [r.psnr for r in short.images] != [r.psnr for r in whole.images]


def test_eval_notes_when_tiling_changes_a_gated_model(image_folder, capsys):
    from lowbitsr.evaluate import has_input_wide_statistics
    from lowbitsr.pretrained import load_pretrained

    assert has_input_wide_statistics(load_pretrained("edsr_tiny_x4_ddtb_w4a4"))
    assert not has_input_wide_statistics(load_pretrained("edsr_tiny_x4_pams_w2a2"))
    args = ["eval", "edsr_tiny_x4_ddtb_w4a4", "--dataset", f"folder:{image_folder}", "--quiet"]
    assert main(args) == 0  # 12x12 LR images: one tile each, the whole-image protocol
    assert "DDTB dynamic gates" not in capsys.readouterr().err
    assert main([*args, "--tile", "8"]) == 0
    assert "4 image(s)" in capsys.readouterr().err


def test_gdq_onnx_batches_are_small_by_default(tmp_path):
    from lowbitsr.deploy import OnnxSR, export_onnx, upscale_image_gdq_onnx
    from lowbitsr.deploy.runtime import GDQ_MAX_BATCH
    from lowbitsr.pretrained import load_pretrained

    assert GDQ_MAX_BATCH <= 4
    assert inspect.signature(upscale_image_gdq_onnx).parameters["max_batch"].default == 4
    export_onnx(load_pretrained("edsr_tiny_x4_gdq"), tmp_path / "g.onnx", check=False)
    sess = OnnxSR(tmp_path / "g.onnx", threads=1)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    a, bits_a = upscale_image_gdq_onnx(sess, img, 32, 30, max_batch=16)
    b, bits_b = upscale_image_gdq_onnx(sess, img, 32, 30)
    assert np.array_equal(a, b) and np.array_equal(bits_a, bits_b)  # batch size: same result


# ---------------------------------------------------------------------------------- CLI
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_has_help_and_defaults_are_shown(capsys):
    for name, sp in _subparsers(build_parser()).items():
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    for cmd, needle in (
        ("upscale", "(default: 256)"),
        ("eval", f"(default: {build_parser().parse_args(['eval', 'm', '--dataset', 'b']).tile})"),
        ("entropy-table", "(default: 4)"),
        ("export", "(default: 17)"),
    ):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert needle in text, (cmd, text)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys):
    from lowbitsr import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_export_check_prints_a_verdict(tmp_path, capsys, monkeypatch):
    onnx_file = str(tmp_path / "m.onnx")
    assert main(["export", "edsr_tiny_x4_fp", "--onnx", onnx_file, "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: PASS" in out and "40 dB" in out
    args = ["export", "edsr_tiny_x4_fp", "--onnx", onnx_file, "--check", "--min-psnr", "1e9"]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert "check: FAIL" in cap.out and "1e+09 dB" in cap.out


# ------------------------------------------------------------------------------- bitmap
def test_bitmap_has_legend_and_true_image():
    from lowbitsr.viz import BIT_COLOURS, bitmap_panel

    rng = np.random.default_rng(0)
    sr = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    bits = np.array([[4, 8], [5, 6]])
    pic = bitmap_panel(sr, bits, (30, 40), 24, 16)
    assert np.array_equal(pic[:120, :160], sr)  # the image itself is not recoloured
    rest = pic[120:].reshape(-1, 3), pic[:120, 160:].reshape(-1, 3)
    for b in (4, 5, 6, 8):
        colour = np.array(BIT_COLOURS[b], np.uint8)
        for part in rest:  # in the map and in the legend
            assert (part == colour).all(axis=1).any(), b


def test_upscale_bitmap_keeps_the_image(tmp_path):
    rng = np.random.default_rng(2)
    img = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    out, bm = tmp_path / "sr.png", tmp_path / "bits.png"
    assert main(["upscale", "edsr_tiny_x4_gdq", str(img), str(out), "--bitmap", str(bm)]) == 0
    sr, pic = np.asarray(Image.open(out)), np.asarray(Image.open(bm))
    assert pic.shape[0] > sr.shape[0] and pic.shape[1] > sr.shape[1]
    assert np.array_equal(pic[: sr.shape[0], : sr.shape[1]], sr)


# ----------------------------------------------------------------------------- file modes
def test_saved_files_follow_the_umask(tmp_path, image_folder):
    from lowbitsr.checkpoint import save_training_state
    from lowbitsr.deploy import save_packed
    from lowbitsr.models.loading import save_weights
    from lowbitsr.pretrained import load_pretrained

    old = os.umask(0o022)
    try:
        model = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
        weights = save_model(model, tmp_path / "m")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = tmp_path / "state.safetensors"
        save_training_state(state, model=model, optimizer=opt, scheduler=None, step=1)
        packed = save_packed(load_pretrained("edsr_tiny_x4_ddtb_w4a4"), tmp_path / "p")["path"]
        raw = save_weights(model, tmp_path / "w.safetensors")
        for p in (weights, weights.with_suffix(".json"), state, Path(packed), Path(raw)):
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old)
