"""``lowbitsr report``: eval JSON → Markdown/HTML with plots, crops and Granular-DQ bit maps.

Tiny saved models (float, DDTB 4-bit, Granular-DQ) are evaluated on three 48×48 images at ×2 by
the real ``lowbitsr eval`` once per module; the reports are then built from those JSON files.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbitsr.checkpoint import save_model
from lowbitsr.cli import main
from lowbitsr.errors import LowbitsrError
from lowbitsr.models import create_model
from lowbitsr.report import build_report, choose_crop, load_eval_json

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(3):
        low = rng.random((8, 8, 3))
        img = np.asarray(
            Image.fromarray((low * 255).astype(np.uint8)).resize((48, 48), Image.BICUBIC),
            dtype=float,
        )
        img[:, 24:] += rng.normal(0, 25, (48, 24, 3))  # texture on the right half
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(tmp dir, json dir, {model name: saved path}) after one real ``lowbitsr eval`` run."""
    from lowbitsr.quant import DDTBConfig, GranularDQConfig, calibrate, quantize
    from lowbitsr.quant.granular_dq import calibrate_granular_dq

    root = tmp_path_factory.mktemp("report")
    _images(root / "imgs")
    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    ddtb = quantize(fp, DDTBConfig(bits=4, dynamic_ratio=0.0))
    calibrate(ddtb, [torch.rand(2, 3, 16, 16) * 255])
    gdq = quantize(fp, GranularDQConfig(entropy_thresholds=(2.0, 3.0), tile=16, tile_step=14))
    calibrate_granular_dq(gdq, torch.rand(2, 3, 16, 16) * 255)
    paths = {}
    for name, model in (("tiny_fp", fp), ("tiny_ddtb_w4a4", ddtb), ("tiny_gdq", gdq)):
        save_model(model, root / name)
        paths[name] = root / name
    args = ["eval", *map(str, paths.values()), "bicubic", "--dataset", f"folder:{root / 'imgs'}"]
    args += ["--json-dir", str(root / "json"), "--save-images", str(root / "sr"), "--quiet"]
    assert main(args) == 0
    return root, root / "json", paths


def _json_files(json_dir: Path) -> list[Path]:
    files = sorted(json_dir.glob("*.json"))
    assert len(files) == 4
    return files


def _table_row(md: str, model: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith(f"| `{model}` |")]
    assert rows, f"{model} missing from the summary table"
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _check_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_eval_json_records_how_to_reload_the_model(evaluated):
    root, json_dir, paths = evaluated
    info = {r.model: r.info for r in map(load_eval_json, _json_files(json_dir))}
    assert info["bicubic"]["model_spec"] == "bicubic"
    assert info["tiny_fp"]["model_spec"] == str(paths["tiny_fp"].resolve())
    assert (info["tiny_fp"]["method"], info["tiny_fp"]["bits"]) == ("fp", "32/32")
    assert (info["tiny_ddtb_w4a4"]["method"], info["tiny_ddtb_w4a4"]["bits"]) == ("ddtb", "4/4")
    assert info["tiny_gdq"]["method"] == "granular_dq"
    assert info["tiny_gdq"]["bits"].startswith("8/")
    assert info["tiny_fp"]["sr_dir"] == str((root / "sr" / "tiny_fp").resolve())


def test_full_report(evaluated, tmp_path, capsys):
    _, json_dir, _ = evaluated
    out = tmp_path / "rep"
    assert main(["report", str(json_dir), "-o", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    for kind in ("psnr_vs_bits", "psnr_vs_bitops", "per_image"):
        assert (out / f"folder_imgs_x2_{kind}.png") in pngs
    crops = [p for p in pngs if "_crops_" in p.name]
    bitmaps = [p for p in pngs if "_bits_tiny_gdq_" in p.name]
    assert len(crops) == 2 and len(bitmaps) == 2  # --max-images defaults to 2
    for p in pngs:
        w, h = _check_png(p)
        assert w > 300 and h > 200
        assert f"]({p.name})" in md  # linked from the Markdown
    assert page.count("data:image/png;base64,") == len(pngs)  # embedded in the HTML
    # the summary table lists every model with the numbers of its JSON
    for f in _json_files(json_dir):
        data = json.loads(f.read_text())
        row = _table_row(md, data["model"])
        assert row[5].strip("*") == f"{data['psnr']:.2f}", row
        assert row[6] == f"{data['ssim']:.4f}", row
        if data["model"] != "bicubic":
            assert row[3] == f"{data['fab']:.2f}" and row[4] == f"{data['info']['gbitops']:.2f}"
    assert "<table>" in page and "tiny_ddtb_w4a4" in page
    assert "none: every model loaded" in md  # no failures, and the re-run PSNRs matched
    assert "-0.00" not in md


def test_gdq_bitmap_matches_eval_fab(evaluated, tmp_path):
    _, json_dir, _ = evaluated
    gdq_json = next(f for f in _json_files(json_dir) if f.name.startswith("tiny_gdq"))
    res = build_report([gdq_json], tmp_path / "rep", crops=False, images=["img1"])
    bitmaps = [p for p in res.figures if "_bits_" in p.name]
    assert len(bitmaps) == 1 and "img1" in bitmaps[0].name
    assert not any("_crops_" in p.name for p in res.figures)
    _check_png(bitmaps[0])
    md = res.markdown.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `tiny_gdq` | img1 |"))
    fab_in_report = float(row.strip("|").split("|")[-1])
    fab_in_json = load_eval_json(gdq_json).image("img1")["fab"]
    assert fab_in_report == pytest.approx(fab_in_json, abs=0.005)
    counts = re.findall(r"(\d+): (\d+)", row.split("|")[3])
    assert sum(int(n) for _, n in counts) == 4  # 24×24 LR, 16-px tiles every 14 px: 2×2 tiles


def test_saved_images_stand_in_for_a_missing_model(evaluated, tmp_path):
    _, json_dir, paths = evaluated
    moved = tmp_path / "tiny_fp"
    for f in paths["tiny_fp"].parent.glob("tiny_fp.*"):
        shutil.copy(f, tmp_path / f.name)
    fp_json = next(f for f in _json_files(json_dir) if f.name.startswith("tiny_fp"))
    data = json.loads(fp_json.read_text())
    data["info"]["model_spec"] = str(tmp_path / "gone")  # the model file is gone ...
    f1 = tmp_path / "fp.json"
    f1.write_text(json.dumps(data))
    res = build_report([f1], tmp_path / "rep", images=["img0"])
    assert not res.notes  # ... but eval --save-images kept its SR images
    assert any("_crops_img0" in p.name for p in res.figures)
    data["info"].pop("sr_dir")  # no images and no model: the report still renders, with a note
    f1.write_text(json.dumps(data))
    res = build_report([f1], tmp_path / "rep2", images=["img0"])
    assert any("cannot load" in n and "gone" in n for n in res.notes)
    assert "cannot load" in res.markdown.read_text() and res.html.is_file()
    assert any("_crops_img0" in p.name for p in res.figures)  # drawn, panel marked missing
    # an old JSON without a spec can be told how to load the model
    del data["info"]["model_spec"]
    f1.write_text(json.dumps(data))
    res = build_report([f1], tmp_path / "rep3", images=["img0"], models=[f"tiny_fp={moved}"])
    assert not res.notes


def test_missing_and_corrupt_inputs(tmp_path, capsys):
    out = str(tmp_path / "rep")
    assert main(["report", str(tmp_path / "nope.json"), "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbitsr: error:") and "nope.json" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x", "images": [')
    assert main(["report", str(bad), "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.json" in err and "not valid JSON" in err and len(err.splitlines()) == 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "x", "dataset": "bundled:test", "images": []}))
    with pytest.raises(LowbitsrError, match=r"other\.json.*scale"):
        build_report([other], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LowbitsrError, match=r"empty.*no \.json"):
        build_report([empty], out)
    assert not (tmp_path / "rep" / "report.md").exists()


def test_folder_skips_non_results_and_duplicates(evaluated, tmp_path):
    _, json_dir, _ = evaluated
    d = tmp_path / "j"
    shutil.copytree(json_dir, d)
    (d / "demo.json").write_text(json.dumps([{"model": "x"}]))  # lowbitsr demo's row list
    fp = next(f for f in _json_files(json_dir) if f.name.startswith("tiny_fp"))
    shutil.copy(fp, d / "zz_copy.json")
    res = build_report([d], tmp_path / "rep", crops=False, bitmaps=False)
    assert any("demo.json" in n and "not an eval result" in n for n in res.notes)
    assert any("zz_copy.json" in n and "already read" in n for n in res.notes)
    assert len(res.figures) == 3


def test_choose_crop_finds_where_models_differ():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    good = hr.copy()
    bad = hr.copy()
    bad[40:56, 8:24] = 255 - bad[40:56, 8:24]  # one model fails in this 16×16 block
    y, x = choose_crop(hr, [good, bad], 16, border=2)
    assert (y, x) == (40, 8)
    flat = np.full((64, 80, 3), 128, np.uint8)
    flat[4:20, 50:66] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # texture only here
    y, x = choose_crop(flat, [], 16)
    assert abs(y - 4) <= 2 and abs(x - 50) <= 2


def test_missing_matplotlib_is_a_clear_error(evaluated, tmp_path, monkeypatch):
    _, json_dir, _ = evaluated
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LowbitsrError, match=r'pip install "lowbitsr\[report\]"'):
        build_report([json_dir], tmp_path / "rep")


def test_report_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    assert "--no-crops" in capsys.readouterr().out
