"""The command line: help texts, one-line errors for bad input, and real runs on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lowbitsr.checkpoint import save_model
from lowbitsr.cli import main, parse_dataset_spec
from lowbitsr.models import create_model


@pytest.fixture
def tiny_saved(tmp_path):
    model = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    save_model(model, tmp_path / "tiny")
    return tmp_path / "tiny"


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbitsr: error:"), err
    assert len(err.splitlines()) == 1, err  # no traceback
    assert needle in err, err
    return err


@pytest.mark.parametrize(
    "cmd", ["demo", "train", "quantize", "eval", "upscale", "convert", "export", "report"]
)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: lowbitsr" in capsys.readouterr().out


def test_dataset_specs():
    assert parse_dataset_spec("bundled") == {"type": "bundled", "split": "test"}
    assert parse_dataset_spec("benchmark:/d/benchmark/Set5") == {
        "type": "benchmark",
        "root": "/d/benchmark",
        "name": "Set5",
    }
    spec = parse_dataset_spec("div2k:/d/DIV2K:801-810")
    assert spec["index_range"] == [801, 810] and spec["split"] == "valid"


def test_upscale_file_and_folder(tiny_saved, image_folder, tmp_path, capsys):
    out = tmp_path / "sr.png"
    assert (
        main(
            [
                "upscale",
                str(tiny_saved),
                str(image_folder / "img0.png"),
                str(out),
                "--tile",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    assert Image.open(out).size == (96, 96)
    assert (
        main(["upscale", str(tiny_saved), str(image_folder), str(tmp_path / "o"), "--quiet"]) == 0
    )
    assert len(list((tmp_path / "o").glob("*_x2.png"))) == 4


def test_upscale_missing_file(tiny_saved, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["upscale", str(tiny_saved), str(missing), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "nope.png")


def test_upscale_corrupt_file(tiny_saved, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    assert main(["upscale", str(tiny_saved), str(bad), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "broken.png")


def test_upscale_greyscale_needs_convert(tiny_saved, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 20), 100, np.uint8)).save(grey)
    assert main(["upscale", str(tiny_saved), str(grey), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "grey.png")
    assert main(["upscale", str(tiny_saved), str(grey), str(tmp_path / "o.png"), "--convert"]) == 0


def test_upscale_rgba_refused(tiny_saved, tmp_path, capsys):
    rgba = tmp_path / "alpha.png"
    arr = np.zeros((12, 12, 4), np.uint8)
    arr[..., 3] = 128
    Image.fromarray(arr).save(rgba)
    assert main(["upscale", str(tiny_saved), str(rgba), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "alpha.png")


def test_folder_with_one_bad_file_keeps_the_others(tiny_saved, image_folder, tmp_path, capsys):
    (image_folder / "zz_bad.png").write_bytes(b"not an image")
    assert (
        main(["upscale", str(tiny_saved), str(image_folder), str(tmp_path / "o"), "--quiet"]) == 1
    )
    assert len(list((tmp_path / "o").glob("*.png"))) == 4
    assert "zz_bad.png" in capsys.readouterr().err


def test_wrong_architecture_checkpoint(tiny_saved, tmp_path, capsys):
    cfg = json.loads((tiny_saved.with_suffix(".json")).read_text())
    cfg["model"]["n_feats"] = 16  # claims another architecture than the weights hold
    (tmp_path / "liar.json").write_text(json.dumps(cfg))
    (tmp_path / "liar.safetensors").write_bytes(tiny_saved.with_suffix(".safetensors").read_bytes())
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["upscale", str(tmp_path / "liar"), str(img), str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "liar.safetensors")


def test_train_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  itrations: 3\n")
    assert main(["train", str(cfg)]) == 2
    one_line_error(capsys, "train.itrations")
    assert main(["quantize", str(tmp_path / "c.yaml"), "--set", "train.itrations=1"]) == 2


def test_eval_folder_json(tiny_saved, image_folder, tmp_path, capsys):
    code = main(
        [
            "eval",
            str(tiny_saved),
            "bicubic",
            "--dataset",
            f"folder:{image_folder}",
            "--json-dir",
            str(tmp_path / "j"),
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "bicubic" in out and "PSNR" in out
    files = sorted((tmp_path / "j").glob("*.json"))
    assert len(files) == 2
    rows = json.loads(files[0].read_text())["images"]
    assert len(rows) == 4 and all(r["psnr"] > 10 for r in rows)


def test_eval_missing_dataset(tiny_saved, tmp_path, capsys):
    assert main(["eval", str(tiny_saved), "--dataset", f"folder:{tmp_path / 'empty'}"]) == 2
    one_line_error(capsys, "empty")


def test_upscale_granular_dq_saves_bitmap(image_folder, tmp_path):
    import torch

    from lowbitsr.quant import GranularDQConfig, quantize
    from lowbitsr.quant.granular_dq import calibrate_granular_dq

    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=16)
    cfg = GranularDQConfig(entropy_thresholds=(2.0, 3.0), tile=16, tile_step=14)
    q = quantize(fp, cfg)
    calibrate_granular_dq(q, torch.rand(2, 3, 16, 16) * 255)
    save_model(q, tmp_path / "gdq")
    out, bm = tmp_path / "sr.png", tmp_path / "bits.png"
    args = ["upscale", str(tmp_path / "gdq"), str(image_folder / "img1.png"), str(out)]
    assert main([*args, "--bitmap", str(bm), "--quiet"]) == 0
    sr, pic = np.asarray(Image.open(out)), np.asarray(Image.open(bm))
    assert sr.shape == (96, 96, 3) and pic.shape[0] > 96 and pic.shape[1] > 2 * 96
    assert np.array_equal(pic[:96, :96], sr)  # the image, untouched, beside its bit map
    assert main(["upscale", str(tmp_path / "gdq").replace("gdq", "nope"), "x", "y"]) == 2

    # the same through the ONNX export: per-tile bits decided in the graph, same tiling
    onnx, out2, bm2 = tmp_path / "gdq.onnx", tmp_path / "sr_onnx.png", tmp_path / "bits_onnx.png"
    assert main(["export", str(tmp_path / "gdq"), "--onnx", str(onnx)]) == 0
    args2 = ["upscale", str(onnx), str(image_folder / "img1.png"), str(out2), "--backend", "onnx"]
    assert main([*args2, "--bitmap", str(bm2), "--quiet"]) == 0
    sr2, pic2 = np.asarray(Image.open(out2)), np.asarray(Image.open(bm2))
    assert np.abs(sr2.astype(int) - sr.astype(int)).max() <= 1
    assert np.abs(pic2.astype(int) - pic.astype(int)).max() <= 1  # same bit map


def test_convert_export_and_onnx_upscale(image_folder, tmp_path, capsys):
    import torch

    from lowbitsr.quant import DDTBConfig, calibrate, quantize

    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=8)
    q = quantize(fp, DDTBConfig(bits=4, dynamic_ratio=0.0))
    calibrate(q, [torch.rand(2, 3, 16, 16) * 255])
    save_model(q, tmp_path / "q")
    packed, onnx_file = tmp_path / "q_packed.safetensors", tmp_path / "q.onnx"
    assert main(["convert", str(tmp_path / "q"), str(packed)]) == 0
    assert packed.stat().st_size < (tmp_path / "q.safetensors").stat().st_size
    assert main(["export", str(packed), "--onnx", str(onnx_file), "--check"]) == 0
    img = image_folder / "img2.png"
    out_t, out_o = tmp_path / "t.png", tmp_path / "o.png"
    assert main(["upscale", str(packed), str(img), str(out_t), "--tile", "0"]) == 0
    assert (
        main(["upscale", str(onnx_file), str(img), str(out_o), "--backend", "onnx", "--tile", "0"])
        == 0
    )
    a = np.asarray(Image.open(out_t)).astype(int)
    b = np.asarray(Image.open(out_o)).astype(int)
    assert a.shape == b.shape == (96, 96, 3)
    assert np.mean(a != b) < 0.05 and np.abs(a - b).max() <= 8
    capsys.readouterr()
    assert (
        main(["upscale", str(tmp_path / "missing.onnx"), str(img), str(out_o), "--backend", "onnx"])
        == 2
    )
    one_line_error(capsys, "missing.onnx")


def test_entropy_table_command(image_folder, tmp_path, capsys):
    out = tmp_path / "table.json"
    args = ["entropy-table", "--dataset", f"folder:{image_folder}", "--scale", "2"]
    assert main([*args, "--patch", "8", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert 0 < printed["H_t1"] <= printed["H_t2"] < 3.47  # entropy of 32 bins <= ln 32
    assert saved["H_t1"] == printed["H_t1"] and saved["n_patches"] == 4 * 9


def test_image_fab_holds_each_image_budget(image_folder, tmp_path, capsys):
    import torch

    from lowbitsr.quant import GranularDQConfig, quantize
    from lowbitsr.quant.granular_dq import calibrate_granular_dq

    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=16)
    q = quantize(fp, GranularDQConfig(use_e2b=False, tile=16, tile_step=14))
    with torch.no_grad():  # a controller that wants 8 bits everywhere
        q.controller.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    calibrate_granular_dq(q, torch.rand(2, 3, 16, 16) * 255)
    save_model(q, tmp_path / "gdq")
    gdq = str(tmp_path / "gdq")

    def fabs(flag: list[str], out: str) -> list[float]:
        argv = ["eval", gdq, "--dataset", f"folder:{image_folder}", "--json-dir", out, "--quiet"]
        assert main([*argv, *flag]) == 0
        (f,) = (tmp_path / out).glob("*.json")
        return [r["extra"]["fab"] for r in json.loads(f.read_text())["images"]]

    assert all(f == 8.0 for f in fabs([], str(tmp_path / "free")))
    held = fabs(["--image-fab", "5"], str(tmp_path / "held"))
    assert all(4.0 < f <= 5.0 for f in held)
    out = tmp_path / "sr.png"
    args = ["upscale", gdq, str(image_folder / "img1.png"), str(out), "--quiet"]
    assert main([*args, "--image-fab", "5"]) == 0 and out.is_file()
    capsys.readouterr()
    # one-line errors: not a Granular-DQ model, a budget outside the bits, E2B on
    assert main([*args[:1], "bicubic", *args[2:], "--scale", "2", "--image-fab", "5"]) == 2
    one_line_error(capsys, "needs a Granular-DQ model")
    assert main([*args, "--image-fab", "3"]) == 2
    one_line_error(capsys, "between 4 and 8")
    q2 = quantize(fp, GranularDQConfig(entropy_thresholds=(2.0, 3.0), tile=16, tile_step=14))
    calibrate_granular_dq(q2, torch.rand(2, 3, 16, 16) * 255)
    save_model(q2, tmp_path / "gdq_e2b")
    argv = ["eval", str(tmp_path / "gdq_e2b"), "--dataset", f"folder:{image_folder}"]
    assert main([*argv, "--image-fab", "5", "--quiet"]) == 2
    one_line_error(capsys, "use_e2b: false")


def test_saved_models_are_named_after_their_run():
    from lowbitsr.specs import _display_name

    assert _display_name("runs/campaign/gdq_s0/model") == "gdq_s0"
    assert _display_name("runs/campaign/gdq_s0/model.json") == "gdq_s0"
    assert _display_name("runs/campaign/gdq_s0/best.safetensors") == "gdq_s0_best"
    assert _display_name("runs/photos.v2") == "photos.v2"
    assert _display_name("exports/my_model.safetensors") == "my_model"
