"""The rate–distortion controller for Granular-DQ (lowbitsr.quant.granular_dq.rd)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbitsr.checkpoint import load_model, save_model
from lowbitsr.models import create_model
from lowbitsr.quant.granular_dq import (
    GranularDQConfig,
    calibrate_granular_dq,
    gdq_super_resolve,
    quantize_granular_dq,
    with_rd_controller,
)
from lowbitsr.quant.granular_dq.rd import (
    calibrate_lambda,
    fit_linear,
    fit_rd_controller,
    image_tiles,
    measure_images,
    measure_tiles,
    rd_choice,
    rd_model,
)


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.rand(3, 28, 40, generator=g) * 255
        img[:, :, : 8 + 8 * i] = img[:, :, : 8 + 8 * i] * 0.05 + 120  # smooth part
        out.append(img)
    return out


def _model(gate: str = "learned") -> object:
    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
    cfg = GranularDQConfig(entropy_thresholds=(2.0, 2.8), tile=16, tile_step=12, gate=gate)
    q = quantize_granular_dq(fp, cfg)
    calibrate_granular_dq(q, torch.stack(_images(2, 1))[:, :, :16, :16])
    return q.eval()


def test_lambda_and_choice() -> None:
    bits = torch.tensor([4, 6, 8])
    q = torch.tensor([[9.0, 2.0, 0.0], [1.0, 0.5, 0.0], [30.0, 1.0, 0.0], [0.1, 0.0, 0.0]])
    assert rd_choice(q, bits, 0.0).tolist() == [2, 2, 2, 1]  # free bits: least error (ties low)
    assert rd_choice(q, bits, 100.0).tolist() == [0, 0, 0, 0]
    lam = calibrate_lambda(q, bits, 5.5)
    chosen = bits[rd_choice(q, bits, lam)]
    assert chosen.double().mean() <= 5.5
    assert chosen.tolist()[2] >= chosen.tolist()[1]  # the tile that gains most keeps its bits
    assert bits[rd_choice(q, bits, lam * 0.999)].double().mean() > 5.5  # smallest such lambda
    with pytest.raises(ValueError, match="below the lowest"):
        calibrate_lambda(q, bits, 3.0)


def test_fit_linear_separates_and_folds_the_standardisation() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 7.0
    score = (s[:, 1] - 7.0) / 10 + (s[:, 3] - 7.0) / 3  # ordinal classes along one direction
    labels = (score > -0.5).long() + (score > 0.7).long()
    w, b = fit_linear(s, labels, loss="labels", l2=1e-4)
    acc = ((s.double() @ w.T + b).argmax(1) == labels).double().mean()
    assert acc > 0.95
    # cost-sensitive: the cost of choosing k is 0 for the right class, and large for the
    # tiles with a big margin: those must come out right even at a small weight on the rest
    cost = torch.ones(200, 3) * (1 + 20 * score.abs())[:, None]
    cost[torch.arange(200), labels] = 0.0
    w, b = fit_linear(s, cost, loss="cost", l2=1e-4)
    chosen = (s.double() @ w.T + b).argmax(1)
    big = score.abs() > 1.0
    assert (chosen[big] == labels[big]).all() and (chosen == labels).double().mean() > 0.9
    with pytest.raises(ValueError, match="loss must be"):
        fit_linear(s, labels, loss="hinge")


def test_rd_controller_reuses_the_quantizers_and_hits_the_target(tmp_path: Path) -> None:
    src = _model()
    images = _images(3, 2)
    new, stats = with_rd_controller(src, images, target_fab=5.0, objective="mse", batch=4)
    assert new.config.use_e2b is False and new.e2b is None
    assert new.config.gbc_bits == src.config.candidates == new.config.candidates
    lr = images[0][None]
    for b in src.config.candidates:  # weights and quantizers untouched: same output per bit
        with torch.no_grad(), src.force_bits(b), new.force_bits(b):
            assert torch.equal(src(lr[..., :16, :16]), new(lr[..., :16, :16]))
    tiles = torch.cat([image_tiles(im, 16, 12) for im in images])
    assert stats["tiles"] == len(tiles)
    decided = new.decide_bits(tiles).double()
    assert decided.mean().item() == pytest.approx(stats["fit_fab"])
    assert stats["fit_fab"] <= 5.0 and stats["label_fab"] <= 5.0
    assert sum(stats["label_bits"].values()) == pytest.approx(1.0, abs=1e-3)
    s, q, e = measure_tiles(new, tiles)
    assert e is None
    assert s.shape == (len(tiles), 48) and q.shape == (len(tiles), 4)
    assert torch.all(q[:, -1] == 0) and torch.all(q[:, 0] >= 0)
    # saved and loaded like any Granular-DQ model, with the same decisions
    save_model(new, tmp_path / "rd", meta={"fit": stats})
    back = load_model(tmp_path / "rd")
    assert torch.equal(back.decide_bits(tiles), new.decide_bits(tiles))
    _, bit_map = gdq_super_resolve(back, images[1][None], 2, 16, 12)
    assert set(bit_map.flatten().tolist()) <= set(src.config.candidates)


def test_rd_controller_from_a_random_gate_model() -> None:
    src = _model(gate="random")
    new, stats = with_rd_controller(src, _images(2, 5), target_fab=6.0, objective="mse")
    assert new.config.gate == "learned" and stats["fit_fab"] <= 6.0


def test_psnr_objective_weighs_tiles_by_their_image() -> None:
    src = _model()
    lrs = _images(2, 3)
    # image 1's HR is its own 8-bit output plus a little noise; image 0's is far off
    hrs = []
    for i, lr in enumerate(lrs):
        with torch.no_grad(), src.force_bits(8):
            sr, _ = gdq_super_resolve(src, lr[None], 2, 16, 12, bits=8)
        noise = torch.randn(sr[0].shape, generator=torch.Generator().manual_seed(i))
        hrs.append(sr[0] + noise * (30.0 if i == 0 else 1.0))
    new = rd_model(src)
    m = measure_images(new, list(zip(lrs, hrs, strict=True)), objective="psnr")
    assert m.weight.mean().item() == pytest.approx(1.0, abs=1e-6)
    w0, w1 = m.weight[m.image == 0], m.weight[m.image == 1]
    assert torch.all(w0 == w0[0]) and w1[0] > 10 * w0[0]  # the near-perfect image weighs more
    plain = measure_images(new, lrs, objective="mse")
    assert torch.equal(plain.q, m.q) and torch.all(plain.weight == 1)
    stats = fit_rd_controller(new, m, 5.0)
    assert stats["fit_cost"] >= stats["label_cost"] - 1e-9 and stats["fit_fab"] <= 5.0
    with pytest.raises(ValueError, match="needs \\(lr, hr\\) pairs"):
        measure_images(new, lrs, objective="psnr")
    with pytest.raises(ValueError, match="rd_model"):
        fit_rd_controller(src, m, 5.0)


def test_tile_statistics_keep_smoothness_and_brightness() -> None:
    from lowbitsr.quant.gdq_layers import tile_statistics

    flat = torch.full((1, 3, 8, 8), 100.0)
    ramp = torch.arange(8.0).repeat(8, 1).expand(1, 3, 8, 8) * 10  # +10 per column
    st = tile_statistics(torch.cat([flat, ramp]))
    assert st.shape == (2, 3)
    assert st[0, 0].item() == pytest.approx(torch.tensor(1e-3).log().item())  # no texture
    # luma gradient of a grey ramp: 10 * (65.481 + 128.553 + 24.966) / 255 per column
    assert st[1, 1].exp().item() == pytest.approx(10 * 219.0 / 255.0, rel=1e-4)
    assert st[0, 2].item() == pytest.approx((16 + 100 * 219.0 / 255.0) / 255.0, rel=1e-5)
    # the range of the input does not matter
    torch.testing.assert_close(tile_statistics(ramp / 255.0, rgb_range=1.0), st[1:])


def test_rd_controller_with_tile_statistics(tmp_path: Path) -> None:
    src = _model()
    images = _images(3, 2)
    new, stats = with_rd_controller(
        src, images, target_fab=5.0, objective="mse", loss="labels", tile_stats=True
    )
    assert new.config.gbc_tile_stats and new.controller.gbc.fc.in_features == 48 + 3
    tiles = torch.cat([image_tiles(im, 16, 12) for im in images])
    assert new.decide_bits(tiles).double().mean().item() == pytest.approx(stats["fit_fab"])
    s, _, _ = measure_tiles(new, tiles)
    assert s.shape == (len(tiles), 51)
    # the statistics matter: a brighter, smoother copy of the same tiles can be decided apart
    w = new.controller.gbc.fc.weight[:, -3:]
    assert w.abs().sum() > 0
    save_model(new, tmp_path / "rd")
    back = load_model(tmp_path / "rd")
    assert back.config.gbc_tile_stats
    assert torch.equal(back.decide_bits(tiles), new.decide_bits(tiles))
    # measurements of the plain GBC do not fit a GBC that reads the statistics
    plain = measure_images(rd_model(src), images, objective="mse")
    with pytest.raises(ValueError, match="inputs per tile"):
        fit_rd_controller(new, plain, 5.0)


def test_tile_statistics_config_is_checked() -> None:
    from lowbitsr.errors import ConfigError

    with pytest.raises(ConfigError, match="gbc_tile_stats"):
        GranularDQConfig(gbc_tile_stats="yes")
    with pytest.raises(ConfigError, match="gbc_tile_stats"):
        GranularDQConfig(gbc_tile_stats=True, compat="official")


def test_rate_controlled_choice_meets_each_target() -> None:
    from lowbitsr.quant.granular_dq.rate import fab_shift, rate_controlled_choice

    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([4, 5, 6, 8])
    logits = torch.randn(40, 4, generator=g) * 3
    logits[:, 3] += 5.0  # left alone the controller picks 8 bits almost everywhere
    assert bits[logits.argmax(1)].double().mean() > 7.0
    means = []
    for target in (4.0, 4.5, 5.0, 6.5, 8.0):
        chosen = bits[rate_controlled_choice(logits, bits, target)].double()
        assert chosen.mean() <= target + 1e-12
        means.append(chosen.mean().item())
    assert means == sorted(means) and means[0] == 4.0 and means[-1] > 7.0
    # the smallest bias: a slightly smaller one misses the target
    d = fab_shift(logits, bits, 5.0)
    assert bits[(logits.double() - (d - 1e-3) * bits.double()).argmax(1)].double().mean() > 5.0
    # a looser controller (every logit equal) still meets it, at the lowest bits if need be
    flat = bits[rate_controlled_choice(torch.zeros(7, 4), bits, 5.0)]
    assert flat.double().mean() <= 5.0
    with pytest.raises(ValueError, match="below the lowest"):
        rate_controlled_choice(logits, bits, 3.0)
    with pytest.raises(ValueError, match="logits must be"):
        rate_controlled_choice(logits[:, :3], bits, 5.0)


def test_image_fab_holds_every_image_at_its_budget(tmp_path: Path) -> None:
    import dataclasses

    src = _model()
    images = _images(3, 2)
    new, _ = with_rd_controller(src, images, target_fab=7.0, objective="mse", tile_stats=True)
    big = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(9)) * 255
    _, free = gdq_super_resolve(new, big, 2, 16, 12)
    assert free.double().mean() > 5.0  # fitted at 7 bits: without rate control above 5
    new.config = dataclasses.replace(new.config, image_fab=5.0)
    sr, bit_map = gdq_super_resolve(new, big, 2, 16, 12)
    assert 4.0 < bit_map.double().mean() <= 5.0  # within budget, not collapsed to 4 bits
    # the one-tile-at-a-time loop decides the tiles together too: the same map and image
    sr1, map1 = gdq_super_resolve(new, big, 2, 16, 12, batched=False)
    assert torch.equal(map1, bit_map)
    torch.testing.assert_close(sr1, sr, atol=1e-3, rtol=0)
    # the rate-controlled map is the same image run with that map forced
    sr_f, _ = gdq_super_resolve(new, big, 2, 16, 12, bits=bit_map)
    assert torch.equal(sr_f, sr)
    # saved with the model; a plain forward of a batch still decides per patch
    save_model(new, tmp_path / "rc")
    back = load_model(tmp_path / "rc")
    assert back.config.image_fab == 5.0
    assert torch.equal(gdq_super_resolve(back, big, 2, 16, 12)[1], bit_map)
    tiles = image_tiles(big[0], 16, 12)
    assert torch.equal(back.decide_bits(tiles), free.flatten())
    assert torch.equal(back.decide_image_bits(tiles), bit_map.flatten())
    # the ONNX graph decides each tile alone: refused rather than silently over budget
    pytest.importorskip("onnx")
    from lowbitsr.deploy import export_onnx
    from lowbitsr.deploy.onnx_ops.graph import ExportError

    with pytest.raises(ExportError, match="per-image rate control"):
        export_onnx(back, tmp_path / "rc.onnx", check=False)


def test_image_fab_config_is_checked() -> None:
    from lowbitsr.errors import ConfigError

    ok = GranularDQConfig(gbc_bits=(4, 6, 8), use_e2b=False, image_fab=5)
    assert ok.image_fab == 5.0 and GranularDQConfig.from_dict(ok.to_dict()) == ok
    with pytest.raises(ConfigError, match=r"image_fab.*use_e2b: false"):
        GranularDQConfig(image_fab=5.0)  # E2B on
    with pytest.raises(ConfigError, match=r"image_fab.*gate: learned"):
        GranularDQConfig(gate="random", use_e2b=False, image_fab=5.0)
    with pytest.raises(ConfigError, match="between 4 and 8"):
        GranularDQConfig(use_e2b=False, image_fab=3.0)
    with pytest.raises(ConfigError, match="image_fab"):
        GranularDQConfig(use_e2b=False, image_fab="5")
