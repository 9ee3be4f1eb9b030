"""Granular-DQ (docs/methods.md §2): entropy, config, layer invariance, gate gradients, tiles, ATC,
save/load, the training recipe."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbitsr.config import load_config
from lowbitsr.data import ImageFolderDataset
from lowbitsr.errors import ConfigError
from lowbitsr.models import create_model, load_weights, save_weights
from lowbitsr.quant.bitops import count_bitops, fab
from lowbitsr.quant.functional import lsq_fake_quant
from lowbitsr.quant.gdq_layers import (
    EntropyToBit,
    GDQActQuantizer,
    GDQConv2d,
    interp_quantile_curve,
    patch_entropy,
    quantile_curve_cdf,
)
from lowbitsr.quant.granular_dq import (
    EntropyTable,
    GranularDQConfig,
    GranularDQModel,
    GranularDQRecipe,
    build_entropy_table,
    calibrate_granular_dq,
    compute_entropy_table,
    entropy_table_path,
    gdq_super_resolve,
    gdq_tile_regions,
    gdq_tile_starts,
    load_entropy_table,
    quantize_granular_dq,
    save_entropy_table,
)
from lowbitsr.train import train

THRESHOLDS = (2.8, 3.18)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: on a loaded 2-core machine a second intra-op thread makes every op
    # wait for a core (about 100x slower here), so run this module single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lr(n: int, size: int = 16, seed: int = 0) -> Tensor:
    """Smooth-ish LR patches in [0, 255] with varied content (so entropies differ)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = img * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    return (img * 255 + torch.randn(n, 3, size, size, generator=g) * 4).clamp(0, 255)


def _tiny(arch: str = "edsr", **cfg: object) -> GranularDQModel:
    torch.manual_seed(0)
    if arch == "edsr":
        m = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
    elif arch == "rdn":
        m = create_model("rdn", scale=2, G0=16, D=2, C=2, G=8)
    else:
        m = create_model("srresnet", scale=2, n_resblocks=2, n_feats=16)
    cfg.setdefault("entropy_thresholds", THRESHOLDS)
    q = quantize_granular_dq(m, GranularDQConfig(**cfg))
    calibrate_granular_dq(q, _lr(4, 16, seed=1))
    return q


# --------------------------------------------------------------------------------- entropy (E2B)
def test_entropy_sanity_values() -> None:
    flat = torch.full((3, 3, 48, 48), 128.0)
    flat[1] = 0.0
    flat[2] = 255.0
    h = patch_entropy(flat)
    assert h[0].item() == pytest.approx(1.184, abs=1e-3)
    assert h[1].item() == pytest.approx(0.73, abs=4e-3)  # 0.7315
    assert h[2].item() == pytest.approx(0.73, abs=4e-3)  # 0.7330 (grey weights sum to 0.9999)

    def by_hand(v: float) -> float:  # the §2.2 formula for a flat patch, in plain Python
        k = [math.exp(-0.5 * ((v - j / 31) / 0.0255) ** 2) for j in range(32)]
        p = [x / sum(k) for x in k]
        return -sum(x * math.log(x) for x in p if x > 0)

    assert h[0].item() == pytest.approx(by_hand(128 * 0.9999 / 255), abs=1e-5)
    assert h[1].item() == pytest.approx(by_hand(0.0), abs=1e-5)
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(1, 1, 256, 256, generator=g) * 255).expand(1, 3, 256, 256)
    assert patch_entropy(noise).item() == pytest.approx(3.456, abs=1e-3)
    ramp = torch.linspace(0, 255, 96).view(1, 1, 1, 96).expand(1, 3, 96, 96)
    assert patch_entropy(ramp).item() == pytest.approx(3.459, abs=1e-3)
    assert patch_entropy(noise).item() < math.log(32)


def test_entropy_is_vectorised_and_official_scores_top_left_square() -> None:
    x = _lr(5, 20)
    batch = patch_entropy(x)
    one_by_one = torch.cat([patch_entropy(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, one_by_one)
    wide = torch.cat([torch.full((1, 3, 16, 16), 128.0), _lr(1, 16)], dim=3)  # 16 x 32
    assert patch_entropy(wide, official=True).item() == pytest.approx(1.184, abs=1e-3)
    assert patch_entropy(wide).item() > 1.5  # ours scores the whole patch


# --------------------------------------------------------------------------------------- config
def test_config_round_trip_and_defaults() -> None:
    c = GranularDQConfig()
    assert (c.gbc_bits, c.e2b_bits, c.candidates) == ((4, 6, 8), (4, 5, 8), (4, 5, 6, 8))
    assert c.resolved_atc_gamma == 0.9997
    assert GranularDQConfig(compat="official").resolved_atc_gamma == 0.99997
    d = GranularDQConfig(gate="random", random_probs=[0.5, 0.3, 0.2], entropy_thresholds=[2, 3])
    dd = json.loads(json.dumps(d.to_dict()))  # JSON/YAML turn tuples into lists
    assert dd["method"] == "granular_dq"
    assert GranularDQConfig.from_dict(dd) == d
    assert GranularDQConfig.from_dict({"method": "granular_dq"}) == GranularDQConfig()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gate": "learnt"}, "'learned'"),
        ({"gate": "fixed"}, "fixed_bits"),
        ({"gate": "fixed", "fixed_bits": 7}, "(4, 5, 6, 8)"),
        ({"fixed_bits": 8}, "only used with gate: fixed"),
        ({"gbc_bits": (8, 4, 6)}, "increasing order"),
        ({"e2b_bits": (4, 8)}, "exactly 3"),
        ({"gate": "random", "random_probs": (0.5, 0.5, 0.5)}, "summing to 1"),
        ({"entropy_thresholds": (3.2, 2.8)}, "H_t1 <= H_t2"),
        ({"tile": 32, "tile_step": 40}, "<= tile"),
        ({"compat": "paper"}, "'official'"),
    ],
)
def test_config_validation_says_what_to_write(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        GranularDQConfig(**kwargs)
    assert needle in str(exc.value)


def test_config_from_dict_rejects_unknown_key_and_other_method() -> None:
    with pytest.raises(ConfigError, match="valid keys"):
        GranularDQConfig.from_dict({"method": "granular_dq", "bitz": 4})
    with pytest.raises(ConfigError, match="method: granular_dq"):
        GranularDQConfig.from_dict({"method": "ddtb"})


# ------------------------------------------------------------------------------ swap and layers
def test_swap_positions_and_repr() -> None:
    for arch, n_q in (("edsr", 4), ("rdn", 6), ("srresnet", 4)):
        q = _tiny(arch)
        convs = [m for m in q.modules() if isinstance(m, GDQConv2d)]
        assert len(convs) == n_q
        # head, upsampler and tail stay float
        plain = [m for m in q.net.modules() if type(m) is nn.Conv2d]
        assert len(plain) >= 3
        text = str(q)
        assert "method=granular_dq" in text and "w_bits=8" in text and "gate=learned" in text
        sr = q.eval()(_lr(2, 12))
        assert sr.shape == (2, 3, 24, 24) and torch.isfinite(sr).all()
        assert q.last_bits is not None and q.last_bits.shape == (2,)


def test_float_model_untouched_and_uninitialised_eval_raises() -> None:
    m = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = quantize_granular_dq(m, {"method": "granular_dq", "entropy_thresholds": [2.8, 3.2]})
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError, match="calibrate_granular_dq"):
        q.eval()(_lr(1, 8))


def _act_io(model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[GDQActQuantizer]]:
    ins: list[Tensor] = []
    outs: list[Tensor] = []
    mods: list[GDQActQuantizer] = []
    for m in model.modules():
        if isinstance(m, GDQActQuantizer):

            def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
                ins.append(inp[0].detach())
                outs.append(out.detach())
                mods.append(mod)

            m.register_forward_hook(hook)
    return ins, outs, mods


def test_layer_invariance_one_bit_width_per_sample_at_every_layer() -> None:
    q = _tiny("edsr").eval()
    ins, outs, mods = _act_io(q)
    bits = [4, 8, 6, 5]
    with q.force_bits(bits):
        q(_lr(4, 16, seed=3))
    assert q.last_bits.tolist() == bits
    assert len(outs) == 4  # every quantized layer saw the batch
    for x, out, mod in zip(ins, outs, mods, strict=True):
        for i, b in enumerate(bits):
            levels = torch.unique(out[i]).numel()
            assert levels <= 2**b
            # exactly the LSQ quantizer of that sample's bit-width (selected term only, y = 1)
            j = mod.candidates.index(b)
            signed = bool(mod.signed)
            ref = lsq_fake_quant(x[i : i + 1] + mod.shift, mod.alpha[j : j + 1], b, signed)
            assert torch.equal(out[i : i + 1], ref)
        assert torch.unique(out[1]).numel() > 16  # the 8-bit sample really has more levels


def test_gate_gradient_reaches_gbc_in_default_and_not_in_official() -> None:
    lr = _lr(4, 16, seed=5)
    q = _tiny("edsr").train()
    q(lr).abs().mean().backward()
    grad = q.controller.gbc.fc.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    alpha_grads = [m.alpha.grad for m in q.modules() if isinstance(m, GDQActQuantizer)]
    assert all(g is not None and g.abs().sum() > 0 for g in alpha_grads)

    o = _tiny("edsr", compat="official").train()
    o(lr).abs().mean().backward()
    g2 = o.controller.gbc.fc.weight.grad
    assert g2 is None or g2.abs().sum() == 0
    assert o.controller.gbc.norms is None  # no GroupNorm in the released GBC


def test_straight_through_selection_is_exact_in_training() -> None:
    # The straight-through one-hot must leave the forward value exactly Q_b(x).
    q = _tiny("edsr").train()
    lr = _lr(3, 16, seed=7)
    torch.manual_seed(11)
    sr = q(lr)
    bits = q.last_bits.clone()
    with torch.no_grad(), q.force_bits(bits):
        sr_forced = q(lr)
    assert torch.equal(sr.detach(), sr_forced)


def test_fixed_and_random_gates() -> None:
    q = _tiny("edsr", gate="fixed", fixed_bits=5).eval()
    q(_lr(3, 12))
    assert q.last_bits.tolist() == [5, 5, 5]
    assert q.controller.gbc is None and q.e2b is None
    r = _tiny("edsr", gate="random", random_probs=(0.0, 1.0, 0.0)).eval()
    r(_lr(6, 12))
    assert r.last_bits.tolist() == [6] * 6  # all 6-bit: E2B only touches the 8-bit patches
    r8 = _tiny("edsr", gate="random", random_probs=(0.0, 0.0, 1.0)).eval()
    r8(torch.full((2, 3, 12, 12), 128.0))  # flat patches: entropy 1.18 <= H_t1 -> 4 bits
    assert r8.last_bits.tolist() == [4, 4]


# ----------------------------------------------------------------------------------- E2B / ATC
def test_e2b_buckets_and_default_atc_update() -> None:
    curve = torch.linspace(0.0, 3.4, 201)
    e2b = EntropyToBit((0.5, 0.9), gamma=0.9)
    e2b.set_curve(curve, keep_thresholds=False)
    torch.testing.assert_close(e2b.thresholds, torch.tensor([1.7, 3.06]))
    lr = torch.stack([torch.full((3, 16, 16), 128.0), torch.zeros(3, 16, 16), _lr(1, 16)[0]])
    top = torch.tensor([True, False, True])
    h = patch_entropy(lr)
    # no ATC: fixed thresholds
    expected = (h > 1.7).long() + (h > 3.06).long()
    assert torch.equal(e2b(lr, top, atc=False), expected)
    torch.testing.assert_close(e2b.levels, torch.tensor([0.5, 0.9]))
    # one ATC step: t <- g t + (1 - g) mean(minmax(H)); thresholds = curve(t)
    m = ((h - h.min()) / (h.max() - h.min())).mean()
    want = 0.9 * torch.tensor([0.5, 0.9]) + 0.1 * m
    e2b(lr, top, atc=True)
    torch.testing.assert_close(e2b.levels, want)
    torch.testing.assert_close(e2b.thresholds, interp_quantile_curve(curve, want))
    # a batch of equal entropies leaves the levels alone (min-max undefined)
    e2b(torch.zeros(2, 3, 8, 8), torch.tensor([True, True]), atc=True)
    torch.testing.assert_close(e2b.levels, want)


def test_official_atc_is_the_sequential_per_patch_ema() -> None:
    curve = torch.linspace(1.0, 3.4, 201)
    e2b = EntropyToBit((0.5, 0.9), gamma=0.6, official=True)
    e2b.set_curve(curve, keep_thresholds=False)
    lr = _lr(5, 16, seed=2)
    top = torch.tensor([True, False, True, True, False])
    got = e2b(lr, top, atc=True)
    # reference: the released loop, one update per top patch, then judge that patch
    t = torch.tensor([0.5, 0.9], dtype=torch.float64)
    h = patch_entropy(lr, official=True).double()
    want = []
    for i in range(5):
        if top[i]:
            t = 0.6 * t + 0.4 * (h[i] - 1.2) / 2.2
        lv = (torch.floor(t * 10 + 0.5) / 10).clamp(0.05, 1.0)
        thr = interp_quantile_curve(curve.double(), lv)
        want.append(int(h[i] > thr[0]) + int(h[i] > thr[1]))
    assert got.tolist() == want
    torch.testing.assert_close(e2b.levels.double(), t, rtol=0, atol=1e-6)


def test_atc_only_when_enabled_in_training() -> None:
    q = _tiny("edsr")
    q.set_entropy_table(torch.linspace(0.5, 3.4, 201))
    before = q.e2b.levels.clone()
    q.train()
    q(_lr(4, 16, seed=9))
    assert torch.equal(q.e2b.levels, before)  # ATC off by default
    q.set_atc(True)
    q(_lr(4, 16, seed=9))
    assert not torch.equal(q.e2b.levels, before)
    after = q.e2b.levels.clone()
    q.eval()
    q(_lr(4, 16, seed=9))
    assert torch.equal(q.e2b.levels, after)  # frozen at eval


def test_quantile_curve_helpers_invert() -> None:
    curve = torch.tensor([0.0, 1.0, 1.0, 3.0, 4.0])
    lv = torch.tensor([0.0, 0.125, 0.625, 1.0])
    vals = interp_quantile_curve(curve, lv)
    torch.testing.assert_close(vals, torch.tensor([0.0, 0.5, 2.0, 4.0]))
    torch.testing.assert_close(quantile_curve_cdf(curve, torch.tensor([0.5, 2.0, 4.0])), lv[1:])


# -------------------------------------------------------------------------------- entropy table
def test_entropy_table_matches_quantiles_and_round_trips(tmp_path: Path) -> None:
    imgs = [_lr(1, 40, seed=s)[0] for s in range(3)]  # 40x40 -> 4 patches of 16 each
    table = compute_entropy_table(imgs, patch=16)
    assert table.n_patches == 12
    patches = torch.cat(
        [img[:, y : y + 16, x : x + 16][None] for img in imgs for y in (0, 16) for x in (0, 16)]
    )
    h = patch_entropy(patches).double()
    want = torch.quantile(h, torch.tensor([0.5, 0.9], dtype=torch.float64))
    assert table.thresholds == pytest.approx(tuple(want.tolist()), abs=1e-6)
    assert build_entropy_table(imgs, patch=16) == table.thresholds
    # batches of dicts (a training stream) give the same table
    assert compute_entropy_table([{"lr": torch.stack(imgs)}], patch=16) == table
    p = save_entropy_table(table, tmp_path / "run" / "model.safetensors")
    assert p == entropy_table_path(tmp_path / "run" / "model")
    assert p == tmp_path / "run" / "model.entropy.json"
    assert load_entropy_table(tmp_path / "run" / "model") == table
    # the released E2B.json format (percent -> entropy) is read too
    official = {"0.5": 1.0, "50.0": 2.8, "90.0": 3.2, "99.5": 3.4}
    (tmp_path / "E2B.json").write_text(json.dumps(official))
    t2 = load_entropy_table(tmp_path / "E2B.json")
    assert t2.thresholds == pytest.approx((2.8, 3.2))


def test_entropy_table_from_a_dataset_uses_whole_lr_images(image_folder: Path) -> None:
    ds = ImageFolderDataset(image_folder, 2, mode="train", lr_patch=8, repeat=5)
    table = compute_entropy_table(ds, patch=8)  # 4 images, LR 24x24 -> 9 patches each
    assert table.n_patches == 36 and table.patch == 8
    assert compute_entropy_table(ds, patch=8, max_patches=10).n_patches == 10


def test_set_entropy_table_keeps_user_thresholds() -> None:
    q = _tiny("edsr", entropy_thresholds=(2.0, 3.0))
    q.set_entropy_table(EntropyTable(tuple(torch.linspace(1.0, 3.0, 201).tolist())))
    assert q.entropy_thresholds == pytest.approx((2.0, 3.0))
    torch.testing.assert_close(q.e2b.levels, torch.tensor([0.5, 1.0]))
    q2 = _tiny("edsr", entropy_thresholds=None)
    assert q2.entropy_thresholds is None
    q2.set_entropy_table(torch.linspace(1.0, 3.0, 201))
    assert q2.entropy_thresholds == pytest.approx((2.0, 2.8))


# --------------------------------------------------------------------------------- tiled (§2.4)
class _NearestStub(nn.Module):
    """SR = nearest upsampling; the LR pixel ring at each tile's border comes out NaN (an
    unreliable seam); bits depend on the tile's brightness, to form several groups."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.forced: Tensor | None = None
        self.calls: list[tuple[int, int | None]] = []

    def decide_bits(self, lr: Tensor) -> Tensor:
        return torch.where(lr.mean(dim=(1, 2, 3)) > 127.5, 8, 4)

    @contextlib.contextmanager
    def force_bits(self, bits: int) -> Iterator[None]:
        self.forced = bits
        try:
            yield
        finally:
            self.forced = None

    def forward(self, lr: Tensor) -> Tensor:
        self.calls.append((lr.shape[0], self.forced))
        out = lr.clone()
        out[..., 0, :] = out[..., -1, :] = float("nan")
        out[..., :, 0] = out[..., :, -1] = float("nan")
        return F.interpolate(out, scale_factor=self.scale, mode="nearest")


def test_tile_starts_align_last_tile_to_border() -> None:
    assert gdq_tile_starts(200, 96, 90) == [0, 90, 104]
    assert gdq_tile_starts(186, 96, 90) == [0, 90]
    assert gdq_tile_starts(50, 96, 90) == [0]


def test_stitching_reconstructs_and_each_tile_keeps_its_own_region() -> None:
    s = 2
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 37, 45, generator=g) * 255
    img[..., :, :20] *= 0.3  # dark left, bright right -> two bit-width groups
    img[..., :, 24:] = img[..., :, 24:] * 0.3 + 170
    stub = _NearestStub(s)
    sr, bit_map = gdq_super_resolve(stub, img, s, tile=16, step=12, max_batch=3)
    ref = F.interpolate(img, scale_factor=s, mode="nearest")
    inner = (slice(None), slice(None), slice(s, -s), slice(s, -s))
    assert torch.equal(sr[inner], ref[inner])  # no tile seam leaks a tile's border pixels
    assert torch.isnan(sr).any()  # (the outer ring is each border tile's own border)
    ys, xs = gdq_tile_starts(37, 16, 12), gdq_tile_starts(45, 16, 12)
    assert bit_map.shape == (len(ys), len(xs))
    want = [[int(stub.decide_bits(img[..., y : y + 16, x : x + 16])) for x in xs] for y in ys]
    assert bit_map.tolist() == want and set(bit_map.flatten().tolist()) == {4, 8}
    assert all(n <= 3 and b in (4, 8) for n, b in stub.calls)  # batched by bit-width
    one, bm1 = gdq_super_resolve(_NearestStub(s), img, s, tile=16, step=12, batched=False)
    assert torch.equal(sr.nan_to_num(), one.nan_to_num())
    assert fab(bm1) == 32.0  # a model without bits runs (and is counted) at 32


@pytest.mark.parametrize(("arch", "dtype"), [("edsr", torch.float64), ("srresnet", torch.float32)])
def test_batched_and_one_by_one_tiles_are_identical(arch: str, dtype: torch.dtype) -> None:
    q = _tiny(arch).eval().to(dtype)
    with torch.no_grad():
        q.controller.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))  # GBC: all 8 bits
    q.e2b.set_thresholds((1.5, 2.0))  # E2B: flat patches (H = 1.18) -> 4, textured -> 8
    img = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(4)) * 255
    img = torch.cat([img, torch.full_like(img, 128.0)], dim=3).to(dtype)  # flat right half
    sr_b, bits_b = gdq_super_resolve(q, img, 2, tile=16, step=12, max_batch=4)
    sr_1, bits_1 = gdq_super_resolve(q, img, 2, tile=16, step=12, batched=False)
    assert torch.equal(bits_b, bits_1)
    assert len(set(bits_b.flatten().tolist())) > 1
    if dtype == torch.float64:
        assert torch.equal(sr_b, sr_1)
    else:  # float32 convs round differently for batch 1 and batch 4 (about 1e-7 relative)
        torch.testing.assert_close(sr_b, sr_1, rtol=0, atol=0.05)
    assert fab(bits_b) == pytest.approx(bits_b.double().mean().item())


def test_given_bit_map_and_tile_regions() -> None:
    q = _tiny("edsr").double().eval()
    with torch.no_grad():
        q.controller.gbc.fc.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))  # GBC: all 8 bits
    q.e2b.set_thresholds((1.5, 2.0))
    img = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(4)) * 255
    img = torch.cat([img, torch.full_like(img, 128.0)], dim=3).double()
    sr, bit_map = gdq_super_resolve(q, img, 2, tile=16, step=12)
    again, same = gdq_super_resolve(q, img, 2, tile=16, step=12, bits=bit_map)
    assert torch.equal(sr, again) and torch.equal(bit_map, same)  # a bit map reproduces a run
    sr4, map4 = gdq_super_resolve(q, img, 2, tile=16, step=12, bits=4)
    assert set(map4.flatten().tolist()) == {4} and not torch.equal(sr4, sr)
    flipped = torch.where(bit_map == 4, 8, 4)
    mixed, _ = gdq_super_resolve(q, img, 2, tile=16, step=12, bits=flipped)
    sr8, _ = gdq_super_resolve(q, img, 2, tile=16, step=12, bits=8)
    regions = gdq_tile_regions(40, 80, 16, 12)
    assert len(regions) == bit_map.numel()
    cover = torch.zeros(40, 80, dtype=torch.long)
    for (y0, y1, x0, x1), b in zip(regions, flipped.flatten().tolist(), strict=True):
        cover[y0:y1, x0:x1] += 1
        ref = sr4 if b == 4 else sr8  # each region comes from its own tile's forward
        box = (..., slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1))
        assert torch.equal(mixed[box], ref[box])
    assert torch.equal(cover, torch.ones_like(cover))  # the regions partition the image
    with pytest.raises(ValueError, match="tile grid"):
        gdq_super_resolve(q, img, 2, tile=16, step=12, bits=torch.full((2, 2), 4))
    with pytest.raises(ValueError, match="batched"):
        gdq_super_resolve(q, img, 2, tile=16, step=12, bits=4, batched=False)


def test_fab_all_8_bit_and_fp() -> None:
    q = _tiny("edsr", gate="fixed", fixed_bits=8).eval()
    _, bits = gdq_super_resolve(q, _lr(1, 30), 2, tile=16, step=12)
    assert fab(bits) == 8.0
    assert count_bitops(q, lr=_lr(2, 12))["fab"] == 8.0
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    assert count_bitops(fp, (1, 3, 12, 12))["fab"] == 32.0
    assert fab(None) == 32.0


# ------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("compat", ["default", "official"])
def test_save_load_identical_outputs(tmp_path: Path, compat: str) -> None:
    q = _tiny("rdn", compat=compat, entropy_thresholds=None)
    q.set_entropy_table(torch.linspace(0.8, 3.4, 201))
    q.train()
    q.set_atc(True)
    q(_lr(4, 16, seed=8)).mean().backward()  # move ATC levels and make gradients exist
    q.eval()
    save_weights(q, tmp_path / "w.safetensors")
    quant = json.loads(json.dumps(q.quant_config_dict))
    assert quant["entropy_thresholds"] == pytest.approx(list(q.entropy_thresholds))
    # what lowbitsr.load_model does: build from the saved dicts, then load the weights
    fresh = create_model("rdn", scale=2, G0=16, D=2, C=2, G=8)
    r = quantize_granular_dq(fresh, GranularDQConfig.from_dict(quant), inplace=True)
    load_weights(r, tmp_path / "w.safetensors")
    r.eval()
    lr = _lr(3, 16, seed=12)
    torch.manual_seed(0)
    a = q(lr)
    torch.manual_seed(0)
    b = r(lr)
    assert torch.equal(a, b) and torch.equal(q.last_bits, r.last_bits)
    assert torch.equal(q.e2b.levels, r.e2b.levels) and torch.equal(q.e2b.curve, r.e2b.curve)
    # quantizers come back initialised (no lazy init would run again in training)
    assert all(not m._needs_init for m in r.modules() if isinstance(m, GDQActQuantizer))


# ------------------------------------------------------------------------------------- recipe
def _cfg(folder: Path, out: Path, iters: int, **quant: object):
    q = {"method": "granular_dq", "atc_iterations": 2, **quant}
    return load_config(
        None,
        [
            "name=gdq",
            f"output_root={out}",
            "model.name=edsr_tiny",
            "model.scale=2",
            "model.overrides={n_resblocks: 1, n_feats: 8}",
            f"data.train={{type: folder, root: {folder}, lr_patch: 12, repeat: 8}}",
            "data.val=null",
            f"train.iterations={iters}",
            "train.batch_size=4",
            "train.lr=1e-3",
            "train.checkpoint_every=2",
            f"quant={json.dumps(q)}",
        ],
    )


def test_recipe_trains_calibrates_and_resumes(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "a", 4)
    recipe = GranularDQRecipe(cfg)
    train(cfg, progress=False, recipe=recipe)
    m = recipe.model
    assert isinstance(m, GranularDQModel)
    thr = m.entropy_thresholds
    assert thr is not None and thr[0] <= thr[1]
    table = json.loads((cfg.run_dir / "entropy_table.json").read_text())
    assert table["n_patches"] >= 64
    saved = json.loads((cfg.run_dir / "model.json").read_text())
    assert saved["quant"]["method"] == "granular_dq"
    assert saved["quant"]["entropy_thresholds"] == pytest.approx(list(thr))
    assert recipe.state()["calibrated"] is True

    # interrupted + resumed == uninterrupted
    cfg_b = _cfg(image_folder, tmp_path / "b", 4)
    train(cfg_b, progress=False, recipe=GranularDQRecipe(cfg_b), stop_after=2)
    resumed = GranularDQRecipe(cfg_b)
    train(cfg_b, progress=False, recipe=resumed, resume=True)
    a = recipe.model.state_dict()
    b = resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
