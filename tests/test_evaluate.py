"""Tiled inference and evaluation plumbing."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbitsr.evaluate import (
    Bicubic,
    EvalResult,
    ImageResult,
    format_table,
    super_resolve,
    tile_boxes,
    upscale_image,
)


class LocalSR(nn.Module):
    """Receptive field radius 2 LR pixels: tiled output must equal whole-image output exactly."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.up(self.c2(torch.relu(self.c1(x)))) + 128


def test_tile_boxes_cover_exactly_once():
    boxes = tile_boxes(37, 50, 16)
    cover = np.zeros((37, 50), int)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert tile_boxes(10, 10, 0) == [(0, 10, 0, 10)]


def test_tiled_equals_whole_when_overlap_covers_receptive_field():
    model = LocalSR(3).eval()
    lr = torch.rand(2, 3, 29, 35) * 255
    whole = super_resolve(model, lr, 3)
    tiled = super_resolve(model, lr, 3, tile=8, overlap=2)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-4)
    # too little overlap changes seams (so the test above can fail)
    seams = super_resolve(model, lr, 3, tile=8, overlap=0)
    assert (seams - whole).abs().max() > 1e-2


def test_upscale_image_streams_uint8():
    model = LocalSR(2).eval()
    img = (np.random.default_rng(0).random((21, 30, 3)) * 255).astype(np.uint8)
    out = upscale_image(model, img, 2, tile=7, overlap=2)
    ref = upscale_image(model, img, 2)
    assert out.dtype == np.uint8 and out.shape == (42, 60, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_bicubic_baseline_shapes_and_range():
    lr = torch.rand(1, 3, 10, 12) * 255
    out = Bicubic(4)(lr)
    assert out.shape == (1, 3, 40, 48)
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


def test_eval_result_and_table(tmp_path):
    r = EvalResult("m", "d", 4, [ImageResult("a", 30.0, 0.9), ImageResult("b", 32.0, 0.8)])
    assert r.psnr == 31.0 and abs(r.ssim - 0.85) < 1e-12
    r.save_json(tmp_path / "x" / "r.json")
    assert (tmp_path / "x" / "r.json").read_text().count('"name"') == 2
    table = format_table([{"model": "m", "PSNR": 31.0, "SSIM": 0.85}])
    assert "31.00" in table and "0.8500" in table and table.count("\n") == 2


def test_evaluate_reports_fab_and_bitops_for_every_kind_of_model(image_folder):
    from lowbitsr.data import build_dataset
    from lowbitsr.evaluate import evaluate
    from lowbitsr.models import create_model
    from lowbitsr.quant import DDTBConfig, GranularDQConfig, calibrate, quantize
    from lowbitsr.quant.granular_dq import calibrate_granular_dq

    torch.manual_seed(0)
    ds = build_dataset({"type": "folder", "root": str(image_folder)}, 2, "eval")
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=16)
    lr = torch.stack([ds[i]["lr"] for i in range(len(ds))])
    ddtb = quantize(fp, DDTBConfig(bits=2))
    calibrate(ddtb, [lr])
    gdq = quantize(fp, GranularDQConfig(entropy_thresholds=(2.0, 3.0), tile=16, tile_step=14))
    calibrate_granular_dq(gdq, lr)
    res = {
        name: evaluate(m, ds, 2, progress=False)
        for name, m in (("fp", fp), ("ddtb", ddtb), ("gdq", gdq))
    }
    assert res["fp"].fab == 32 and res["ddtb"].fab == 2
    assert 4 <= res["gdq"].fab <= 8
    g = {k: r.info["gbitops"] for k, r in res.items()}
    assert g["ddtb"] < g["gdq"] < g["fp"]
    assert "MACs" in res["fp"].info["formula"]
    assert all(np.isfinite(r.psnr) for r in res.values())
