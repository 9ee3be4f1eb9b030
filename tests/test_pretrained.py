"""Shipped weights: they load, they were made by a repo command, and they beat bicubic."""

from __future__ import annotations

import json

import pytest
import torch

from lowbitsr.data import BundledDataset
from lowbitsr.demo import run_demo
from lowbitsr.errors import CheckpointError
from lowbitsr.evaluate import Bicubic, evaluate
from lowbitsr.pretrained import list_pretrained, load_pretrained, pretrained_info

SHIPPED = list_pretrained()
FLOAT = [n for n in SHIPPED if n.endswith("_fp")]


def test_float_models_are_shipped():
    assert "edsr_tiny_x4_fp" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_records_its_origin(name):
    info = pretrained_info(name)
    made_by = info["meta"]["made_by"]
    # a lowbitsr command, or the evidence campaign followed by the shipping script
    assert made_by.startswith(("lowbitsr ", "python bench/campaign.py "))
    assert name in made_by
    model = load_pretrained(name)
    scale = info["model"]["scale"]
    out = model(torch.rand(1, 3, 12, 10) * 255)
    assert out.shape == (1, 3, 12 * scale, 10 * scale)
    assert not model.training


@pytest.mark.parametrize("name", FLOAT)
def test_float_model_beats_bicubic_on_bundled_test(name):
    scale = pretrained_info(name)["model"]["scale"]
    ds = BundledDataset("test", scale, mode="eval")
    sr = evaluate(load_pretrained(name), ds, scale, progress=False)
    bic = evaluate(Bicubic(scale), ds, scale, progress=False)
    assert sr.psnr > bic.psnr + 0.3, (sr.psnr, bic.psnr)


def test_unknown_name_lists_available():
    with pytest.raises(CheckpointError, match="edsr_tiny_x4_fp"):
        load_pretrained("no_such_model")


def test_demo_runs_and_writes_table(tmp_path, capsys):
    rows = run_demo(scales=[4], out_dir=tmp_path, progress=False)
    names = [r["model"] for r in rows]
    assert names[0] == "bicubic" and "edsr_baseline_x4_fp" in names
    assert not any(n.startswith("edsr_tiny") for n in names)  # the papers' network is shown
    assert (tmp_path / "demo_table.md").read_text().count("\n") == len(rows) + 2
    assert "PSNR" in capsys.readouterr().out
    assert (tmp_path / "edsr_baseline_x4_fp" / "astronaut.png").is_file()
    # the rate-controlled Granular-DQ model holds its budget on every image
    (rc,) = [r for r in rows if r["model"] == "edsr_baseline_x4_gdq_rc"]
    assert rc["bits (W/A)"] == "8/patch-wise, <= 5 per image" and rc["FAB"] <= 5.0
    per_image = json.loads((tmp_path / "edsr_baseline_x4_gdq_rc.json").read_text())["images"]
    assert all(im["extra"]["fab"] <= 5.0 for im in per_image)


def test_packed_shipped_model_loads_bit_exactly(tmp_path, monkeypatch):
    """A quantized model shipped as bit-packed codes loads back with identical outputs."""
    import json
    from pathlib import Path

    import lowbitsr.pretrained as pre
    from lowbitsr.deploy.pack import PACKED_FORMAT, save_packed

    float_file = Path(pre.__file__).parent / "edsr_tiny_x4_ddtb_w2a2.safetensors"
    model = load_pretrained("edsr_tiny_x4_ddtb_w2a2")
    header = pretrained_info("edsr_tiny_x4_ddtb_w2a2")
    save_packed(model, tmp_path / "packed_x4.safetensors")
    header["format"] = PACKED_FORMAT
    (tmp_path / "packed_x4.json").write_text(json.dumps(header))
    monkeypatch.setattr(pre, "_DIR", tmp_path)
    assert pre.list_pretrained() == ["packed_x4"]
    packed = pre.load_pretrained("packed_x4")
    assert (tmp_path / "packed_x4.safetensors").stat().st_size < float_file.stat().st_size
    lr = torch.rand(1, 3, 16, 14) * 255
    with torch.no_grad():
        assert torch.equal(packed(lr), model(lr))


def test_demo_shows_the_papers_network_when_shipped(monkeypatch):
    """Per scale the demo shows the edsr_baseline models when any is shipped, else all."""
    import lowbitsr.demo as demo

    names = ["edsr_tiny_x4_fp", "edsr_baseline_x4_fp", "edsr_baseline_x4_ddtb_w2a2"]
    names.append("edsr_tiny_x2_fp")
    info = {
        n: {"model": {"name": n.rsplit("_x", 1)[0], "scale": int(n.split("_x")[1][0])}}
        for n in names
    }
    monkeypatch.setattr(demo, "list_pretrained", lambda: names)
    monkeypatch.setattr(demo, "pretrained_info", lambda n: info[n])
    assert demo._shipped_by_scale() == {
        2: ["edsr_tiny_x2_fp"],
        4: ["edsr_baseline_x4_fp", "edsr_baseline_x4_ddtb_w2a2"],
    }
    assert demo._shipped_by_scale(all_models=True)[4] == [
        "edsr_baseline_x4_fp",
        "edsr_tiny_x4_fp",
        "edsr_baseline_x4_ddtb_w2a2",
    ]
