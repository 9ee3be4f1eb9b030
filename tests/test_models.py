"""Tests for lowbitsr.models: registry, architectures, state-dict layout and checkpoint loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from lowbitsr.errors import CheckpointError
from lowbitsr.models import (
    canonicalize_state_dict,
    create_model,
    list_models,
    load_weights,
    read_state_dict,
    save_weights,
    supported_scales,
)

DIV2K_MEAN = torch.tensor([0.4488, 0.4371, 0.4040])

# Small hyperparameters per registered model so every (model, scale) pair runs in milliseconds.
TINY: dict[str, dict] = {
    "edsr": {"n_resblocks": 2, "n_feats": 16},
    "edsr_baseline": {"n_resblocks": 2, "n_feats": 16},
    "edsr_tiny": {},
    "rdn": {"G0": 16, "D": 2, "C": 2, "G": 8},
    "srresnet": {"n_resblocks": 2, "n_feats": 16},
}
CASES = [(name, scale) for name in list_models() for scale in supported_scales(name)]


def tiny(name: str, scale: int, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, scale=scale, **{**TINY[name], **extra})
    _randomise_bn_stats(model, seed)
    return model.eval()


def _randomise_bn_stats(model: nn.Module, seed: int) -> None:
    # Fresh BN stats are (0, 1) and would hide a running_mean/var that fails to load.
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            nn.init.normal_(m.weight, 1.0, 0.1, generator=g)
            nn.init.normal_(m.bias, 0.0, 0.1, generator=g)


def lr_image(n: int = 2, h: int = 6, w: int = 5, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- registry
def test_every_registered_model_has_tiny_settings():
    assert set(list_models()) == set(TINY)
    assert supported_scales("srresnet") == (2, 4)
    assert all(supported_scales(n) == (2, 3, 4) for n in ("edsr", "edsr_baseline", "rdn"))


def test_create_model_errors():
    with pytest.raises(ValueError, match=r"available models: .*edsr_baseline"):
        create_model("edsr_huge")
    with pytest.raises(ValueError, match="allowed scales: 2, 4"):
        create_model("srresnet", scale=3)
    with pytest.raises(ValueError, match="allowed scales: 2, 3, 4"):
        create_model("edsr_tiny", scale=8)
    with pytest.raises(ValueError, match=r"'n_blocks'.*allowed overrides: n_resblocks"):
        create_model("edsr_tiny", scale=2, n_blocks=3)
    with pytest.raises(ValueError, match="n_colors must be 3"):
        create_model("edsr_tiny", scale=2, n_colors=1)


@pytest.mark.parametrize(("name", "scale"), CASES)
def test_model_config_rebuilds_same_architecture(name: str, scale: int):
    model = tiny(name, scale)
    cfg = model.model_config
    assert cfg["name"] == name and cfg["scale"] == scale
    for k, v in TINY[name].items():
        assert cfg[k] == v
    json.dumps(cfg)  # the lead stores it as JSON beside the weights
    rebuilt = create_model(**cfg)
    assert shapes(rebuilt) == shapes(model)
    assert rebuilt.model_config == cfg


# -------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize(("name", "scale"), CASES)
def test_forward_shapes_and_forward_features(name: str, scale: int):
    model = tiny(name, scale)
    x = lr_image()
    with torch.no_grad():
        sr, feat = model.forward_features(x)
        out = model(x)
    assert sr.shape == (2, 3, 6 * scale, 5 * scale)
    assert sr.dtype == torch.float32 and torch.isfinite(sr).all()
    assert feat.shape == (2, model.n_feats, 6, 5)
    assert torch.equal(out, sr)


def _conv(sd: dict[str, Tensor], x: Tensor, prefix: str) -> Tensor:
    w = sd[prefix + ".weight"]
    return F.conv2d(x, w, sd.get(prefix + ".bias"), padding=w.shape[-1] // 2)


def _edsr_reference(sd, x, n_blocks, res_scale, shuffles):
    """EDSR-PyTorch's forward restated from the state-dict keys alone."""
    h = _conv(sd, _conv(sd, x, "sub_mean"), "head.0")
    r = h
    for i in range(n_blocks):
        r = _conv(sd, F.relu(_conv(sd, r, f"body.{i}.body.0")), f"body.{i}.body.2") * res_scale + r
    feat = _conv(sd, r, f"body.{n_blocks}") + h
    u = feat
    for j, s in shuffles:
        u = F.pixel_shuffle(_conv(sd, u, f"tail.0.{j}"), s)
    return _conv(sd, _conv(sd, u, "tail.1"), "add_mean"), feat


@pytest.mark.parametrize(
    ("scale", "shuffles"), [(2, [(0, 2)]), (3, [(0, 3)]), (4, [(0, 2), (2, 2)])]
)
def test_edsr_matches_functional_reference(scale, shuffles):
    model = tiny("edsr", scale, n_resblocks=3, res_scale=0.1)
    x = lr_image()
    with torch.no_grad():
        sr, feat = model.forward_features(x)
        ref_sr, ref_feat = _edsr_reference(model.state_dict(), x, 3, 0.1, shuffles)
    torch.testing.assert_close(sr, ref_sr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-5, atol=1e-4)


def test_rdn_matches_functional_reference():
    model = tiny("rdn", 4)
    sd, x = model.state_dict(), lr_image()
    f1 = _conv(sd, x, "SFENet1")
    h, outs = _conv(sd, f1, "SFENet2"), []
    for i in range(2):
        d = h
        for j in range(2):
            d = torch.cat((d, F.relu(_conv(sd, d, f"RDBs.{i}.convs.{j}.conv.0"))), 1)
        h = _conv(sd, d, f"RDBs.{i}.LFF") + h
        outs.append(h)
    feat = _conv(sd, _conv(sd, torch.cat(outs, 1), "GFF.0"), "GFF.1") + f1
    u = F.pixel_shuffle(_conv(sd, feat, "UPNet.0"), 2)
    ref = _conv(sd, F.pixel_shuffle(_conv(sd, u, "UPNet.2"), 2), "UPNet.4")
    with torch.no_grad():
        sr, got_feat = model.forward_features(x)
    torch.testing.assert_close(got_feat, feat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sr, ref, rtol=1e-5, atol=1e-4)


def test_srresnet_matches_functional_reference_in_eval():
    model = tiny("srresnet", 2)
    sd, x = model.state_dict(), lr_image()

    def bn(t, p):
        return F.batch_norm(
            t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"]
        )

    def prelu(t, p):
        return F.prelu(t, sd[p + ".weight"])

    h = prelu(_conv(sd, x, "conv_input"), "relu")
    r = h
    for i in range(2):
        b = f"residual.{i}"
        t = prelu(bn(_conv(sd, r, f"{b}.conv1"), f"{b}.in1"), f"{b}.relu")
        r = bn(_conv(sd, t, f"{b}.conv2"), f"{b}.in2") + r
    feat = bn(_conv(sd, r, "conv_mid"), "bn_mid") + h
    ref = _conv(
        sd, prelu(F.pixel_shuffle(_conv(sd, feat, "upscale.0"), 2), "upscale.2"), "conv_output"
    )
    with torch.no_grad():
        sr, got_feat = model.forward_features(x)
    torch.testing.assert_close(got_feat, feat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sr, ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------- EDSR-PyTorch key layout
def _edsr_expected_keys(n_blocks: int, up_convs: list[int]) -> set[str]:
    keys = {f"{m}.{p}" for m in ("sub_mean", "add_mean", "head.0") for p in ("weight", "bias")}
    for i in range(n_blocks):
        keys |= {f"body.{i}.body.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    keys |= {f"body.{n_blocks}.weight", f"body.{n_blocks}.bias", "tail.1.weight", "tail.1.bias"}
    keys |= {f"tail.0.{j}.{p}" for j in up_convs for p in ("weight", "bias")}
    return keys


def test_edsr_baseline_x4_state_dict_matches_edsr_pytorch():
    with torch.device("meta"):
        sd = shapes(create_model("edsr_baseline", scale=4))
    assert len(sd) == 78
    assert set(sd) == _edsr_expected_keys(16, [0, 2])
    expected = {
        "sub_mean.weight": (3, 3, 1, 1),
        "sub_mean.bias": (3,),
        "add_mean.weight": (3, 3, 1, 1),
        "head.0.weight": (64, 3, 3, 3),
        "body.0.body.0.weight": (64, 64, 3, 3),
        "body.15.body.2.bias": (64,),
        "body.16.weight": (64, 64, 3, 3),
        "tail.0.0.weight": (256, 64, 3, 3),
        "tail.0.2.weight": (256, 64, 3, 3),
        "tail.1.weight": (3, 64, 3, 3),
        "tail.1.bias": (3,),
    }
    assert {k: sd[k] for k in expected} == expected


def test_edsr_other_scales_and_full_size_layout():
    with torch.device("meta"):
        x2 = shapes(create_model("edsr_baseline", scale=2))
        x3 = shapes(create_model("edsr_baseline", scale=3))
        big = shapes(create_model("edsr", scale=4))
    assert set(x2) == _edsr_expected_keys(16, [0]) and x2["tail.0.0.weight"] == (256, 64, 3, 3)
    assert set(x3) == _edsr_expected_keys(16, [0]) and x3["tail.0.0.weight"] == (576, 64, 3, 3)
    assert set(big) == _edsr_expected_keys(32, [0, 2]) and len(big) == 142
    assert big["tail.0.0.weight"] == (1024, 256, 3, 3) and big["body.32.weight"][0] == 256


def test_mean_shift_values_and_not_trainable():
    model = create_model("edsr_tiny", scale=2, rgb_range=1.0)
    sd = model.state_dict()
    assert torch.equal(sd["sub_mean.weight"], torch.eye(3).view(3, 3, 1, 1))
    torch.testing.assert_close(sd["sub_mean.bias"], -DIV2K_MEAN)
    torch.testing.assert_close(sd["add_mean.bias"], DIV2K_MEAN)
    for name in list_models():
        m = tiny(name, supported_scales(name)[0])
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert not any("mean" in n for n in trainable), name
    # a full training step leaves the mean shift untouched
    before = model.sub_mean.bias.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(lr_image() / 255).square().mean().backward()
    opt.step()
    assert torch.equal(model.sub_mean.bias, before)


def test_rdn_x2_state_dict_matches_edsr_pytorch():
    with torch.device("meta"):
        sd = shapes(create_model("rdn", scale=2))
    expected_keys = {
        f"{m}.{p}"
        for m in ("SFENet1", "SFENet2", "GFF.0", "GFF.1", "UPNet.0", "UPNet.2")
        for p in ("weight", "bias")
    }
    for i in range(16):
        expected_keys |= {f"RDBs.{i}.LFF.{p}" for p in ("weight", "bias")}
        expected_keys |= {
            f"RDBs.{i}.convs.{j}.conv.0.{p}" for j in range(8) for p in ("weight", "bias")
        }
    assert len(sd) == 300
    assert set(sd) == expected_keys
    expected = {
        "SFENet1.weight": (64, 3, 3, 3),
        "SFENet2.weight": (64, 64, 3, 3),
        "RDBs.0.convs.0.conv.0.weight": (64, 64, 3, 3),
        "RDBs.3.convs.7.conv.0.weight": (64, 512, 3, 3),
        "RDBs.15.LFF.weight": (64, 576, 1, 1),
        "GFF.0.weight": (64, 1024, 1, 1),
        "GFF.1.weight": (64, 64, 3, 3),
        "UPNet.0.weight": (256, 64, 3, 3),
        "UPNet.2.weight": (3, 64, 3, 3),
    }
    assert {k: sd[k] for k in expected} == expected
    with torch.device("meta"):
        x4 = shapes(create_model("rdn", scale=4))
    assert x4["UPNet.2.weight"] == (256, 64, 3, 3) and x4["UPNet.4.weight"] == (3, 64, 3, 3)


def test_srresnet_state_dict_matches_ddtb_bnsrresnet():
    with torch.device("meta"):
        x4 = shapes(create_model("srresnet", scale=4))
        x2 = shapes(create_model("srresnet", scale=2))
    assert len(x4) == 221 and len(x2) == 219
    expected = {
        "conv_input.weight": (64, 3, 9, 9),
        "relu.weight": (1,),
        "residual.0.conv1.weight": (64, 64, 3, 3),
        "residual.0.in1.running_var": (64,),
        "residual.15.relu.weight": (1,),
        "residual.15.in2.num_batches_tracked": (),
        "conv_mid.weight": (64, 64, 3, 3),
        "bn_mid.weight": (64,),
        "upscale.0.weight": (256, 64, 3, 3),
        "upscale.2.weight": (1,),
        "upscale.3.weight": (256, 64, 3, 3),
        "upscale.5.weight": (1,),
        "conv_output.weight": (3, 64, 9, 9),
    }
    assert {k: x4[k] for k in expected} == expected
    assert not any(k.endswith("bias") and "conv" in k for k in x4)  # DDTB's convs are bias-free
    assert "upscale.3.weight" not in x2 and x2["upscale.2.weight"] == (1,)


def test_resblock_aliases_replace_in_place():
    model = tiny("edsr_tiny", 2)
    block = model.body[0]
    assert block.conv1 is block.body[0] and block.conv2 is block.body[2]
    assert isinstance(block.act, nn.ReLU)
    assert block.act is not model.body[1].act  # distinct modules per position
    keys = set(model.state_dict())
    new = nn.Conv2d(32, 32, 3, padding=1)
    block.conv1 = new
    assert block.body[0] is new and set(model.state_dict()) == keys


# ------------------------------------------------------------------------- save / load round trip
@pytest.mark.parametrize(("name", "scale"), [("edsr_tiny", 4), ("rdn", 3), ("srresnet", 2)])
def test_safetensors_round_trip(tmp_path: Path, name: str, scale: int):
    src, dst = tiny(name, scale, seed=1), tiny(name, scale, seed=2)
    x = lr_image()
    assert not torch.equal(src(x), dst(x))
    path = save_weights(src, tmp_path / "sub" / "w.safetensors")
    assert load_weights(dst, path) is dst
    assert torch.equal(src(x), dst(x))
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["lowbitsr.model_config"]) == src.model_config


@pytest.mark.parametrize("zip_format", [True, False])  # False: pre-1.6 files like EDSR's zoo
def test_pth_with_wrapper_and_module_prefix_round_trip(tmp_path: Path, zip_format: bool):
    src, dst = tiny("edsr_tiny", 3, seed=1), tiny("edsr_tiny", 3, seed=2)
    path = tmp_path / "model_best.pth.tar"
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    ckpt = {"epoch": 7, "state_dict": wrapped, "optimizer": {"state": {}}}
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    load_weights(dst, path)
    x = lr_image()
    assert torch.equal(src(x), dst(x))


def test_canonicalize_prefers_params_ema_and_strips_compile_prefix():
    real = {"_orig_mod.head.0.weight": torch.ones(2), "body._orig_mod.x": torch.ones(1)}
    other = {"head.0.weight": torch.zeros(2)}
    sd = canonicalize_state_dict({"params": other, "params_ema": real, "iter": 5})
    assert set(sd) == {"head.0.weight", "body.x"} and torch.equal(
        sd["head.0.weight"], torch.ones(2)
    )
    nested = canonicalize_state_dict({"model": {"net": {"module.module.a": torch.ones(1)}}})
    assert set(nested) == {"a"}
    with pytest.raises(CheckpointError, match="two entries for 'a'"):
        canonicalize_state_dict({"a": torch.ones(1), "module.a": torch.ones(1)})


def test_missing_bn_counter_still_loads_strictly(tmp_path: Path):
    src, dst = tiny("srresnet", 4, seed=1), tiny("srresnet", 4, seed=2)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    load_weights(dst, tmp_path / "old.pt")
    x = lr_image()
    assert torch.equal(src(x), dst(x))


def test_adapt_state_dict_hook(tmp_path: Path):
    src, dst = tiny("edsr_tiny", 2, seed=1), tiny("edsr_tiny", 2, seed=2)
    torch.save({"foreign." + k: v for k, v in src.state_dict().items()}, tmp_path / "f.pth")
    dst.adapt_state_dict = lambda sd: {k.removeprefix("foreign."): v for k, v in sd.items()}
    load_weights(dst, tmp_path / "f.pth")
    x = lr_image()
    assert torch.equal(src(x), dst(x))


# ------------------------------------------------------------------------------ error handling
class _Evil:
    """Unpickling this object calls ``open(marker, "w")``, i.e. creates a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path):
    # Guards the next test: the payload really does create its marker if executed.
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch_zip", "pickle_protocol_2", "pickle_protocol_4"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, fmt: str):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "torch_zip":
        good = tiny("edsr_tiny", 2).state_dict()
        torch.save({"state_dict": good, "extra": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=int(fmt[-1])))
    model = tiny("edsr_tiny", 2)
    with pytest.raises(
        CheckpointError, match=r"not a plain tensor checkpoint.*refused for safety"
    ) as e:
        load_weights(model, path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_wrong_architecture_is_rejected_and_model_untouched(tmp_path: Path):
    path = save_weights(tiny("edsr_tiny", 4), tmp_path / "tiny.safetensors")
    torch.manual_seed(0)
    target = create_model("edsr_baseline", scale=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(target, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not match edsr_baseline x4 (")
    assert "missing keys e.g. 'body.4.body.0.weight'" in msg
    assert "shape mismatches e.g. 'head.0.weight' file (32,3,3,3) vs model (64,3,3,3)" in msg
    assert "another architecture or scale" in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_wrong_scale_and_non_strict(tmp_path: Path):
    path = save_weights(tiny("edsr_tiny", 2), tmp_path / "x2.safetensors")
    with pytest.raises(CheckpointError, match=r"\(2 missing keys e\.g\. 'tail\.0\.2\.weight'\)"):
        load_weights(tiny("edsr_tiny", 4), path)
    # strict=False tolerates the missing second upsampler conv but never a shape mismatch
    x4 = tiny("edsr_tiny", 4)
    load_weights(x4, path, strict=False)
    assert torch.equal(x4.head[0].weight, read_state_dict(path)["head.0.weight"])
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(tiny("edsr_tiny", 3), path, strict=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path: Path, suffix: str):
    full = tmp_path / f"full{suffix}"
    model = tiny("edsr_tiny", 2)
    if suffix == ".safetensors":
        save_weights(model, full)
    else:
        torch.save(model.state_dict(), full)
    cut = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_weights(model, cut)
    assert str(cut) in str(e.value)


def test_missing_empty_and_unknown_files(tmp_path: Path):
    model = tiny("edsr_tiny", 2)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "nope.pt")
    torch.save({"epoch": 3, "best_psnr": 30.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt: contains no named tensors"):
        read_state_dict(tmp_path / "meta.pt")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        read_state_dict(tmp_path / "w.h5")
    with pytest.raises(CheckpointError, match=r"\.safetensors extension"):
        save_weights(model, tmp_path / "w.pt")


# ------------------------------------------------------------------------------- BasicSR files
def _to_basicsr(sd: dict[str, Tensor], n_blocks: int) -> dict[str, Tensor]:
    """Rename an EDSR state dict into BasicSR's edsr_arch names (written independently)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in ("sub_mean", "add_mean"):
            continue  # BasicSR does not save its mean
        if parts[0] == "head":
            out["conv_first." + parts[-1]] = v
        elif parts[0] == "body" and parts[1] == str(n_blocks):
            out["conv_after_body." + parts[-1]] = v
        elif parts[0] == "body":
            conv = {"0": "conv1", "2": "conv2"}[parts[3]]
            out[f"body.{parts[1]}.{conv}.{parts[-1]}"] = v
        elif parts[:2] == ["tail", "0"]:
            out[f"upsample.{parts[2]}.{parts[-1]}"] = v
        elif parts[:2] == ["tail", "1"]:
            out["conv_last." + parts[-1]] = v
        else:
            raise AssertionError(k)
    return out


def _basicsr_forward(sd: dict[str, Tensor], x01: Tensor, n_blocks: int, img_range: float):
    """BasicSR's EDSR forward (input and output in [0, 1]) restated from its key names."""
    mean = DIV2K_MEAN.view(1, 3, 1, 1)
    h = _conv(sd, (x01 - mean) * img_range, "conv_first")
    r = h
    for i in range(n_blocks):
        r = r + _conv(sd, F.relu(_conv(sd, r, f"body.{i}.conv1")), f"body.{i}.conv2")
    u = _conv(sd, r, "conv_after_body") + h
    for j in (0, 2):
        u = F.pixel_shuffle(_conv(sd, u, f"upsample.{j}"), 2)
    return _conv(sd, u, "conv_last") / img_range + mean


def test_basicsr_edsr_file_loads_and_matches(tmp_path: Path):
    src, dst = tiny("edsr_tiny", 4, seed=1), tiny("edsr_tiny", 4, seed=2)
    basic = _to_basicsr(src.state_dict(), n_blocks=4)
    assert "conv_first.weight" in basic and "upsample.2.weight" in basic
    path = tmp_path / "EDSR_Lx4.pth"
    junk = {k: torch.zeros_like(v) for k, v in basic.items()}
    torch.save({"params": junk, "params_ema": basic}, path)
    load_weights(dst, path)
    x = lr_image()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
        # and the same function BasicSR computes on [0, 1] images, scaled by img_range = 255
        ref = _basicsr_forward(basic, x / 255.0, n_blocks=4, img_range=255.0)
        torch.testing.assert_close(dst(x) / 255.0, ref, rtol=1e-4, atol=1e-5)


def test_basicsr_mean_tensor_is_used(tmp_path: Path):
    src = tiny("edsr_tiny", 2)
    basic = _to_basicsr(src.state_dict(), n_blocks=4)
    basic["mean"] = torch.full((1, 3, 1, 1), 0.5)
    torch.save(basic, tmp_path / "b.pth")
    dst = load_weights(tiny("edsr_tiny", 2), tmp_path / "b.pth")
    torch.testing.assert_close(dst.sub_mean.bias, torch.full((3,), -127.5))
    torch.testing.assert_close(dst.add_mean.bias, torch.full((3,), 127.5))


def test_mean_shift_built_for_other_rgb_range_is_rejected(tmp_path: Path):
    # EDSR-PyTorch files carry sub_mean built for 255; a model built for [0, 1] must not take it
    path = save_weights(tiny("edsr_tiny", 2), tmp_path / "r255.safetensors")
    with pytest.raises(
        CheckpointError, match=r"rgb_range 255 .* create the model with rgb_range=255"
    ):
        load_weights(tiny("edsr_tiny", 2, rgb_range=1.0), path)


def test_basicsr_file_into_wrong_model_names_it(tmp_path: Path):
    basic = _to_basicsr(tiny("edsr_tiny", 4).state_dict(), n_blocks=4)
    torch.save({"params": basic}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="read as a BasicSR EDSR file"):
        load_weights(tiny("edsr_baseline", 4), tmp_path / "b.pth")


@pytest.mark.parametrize("name", ["edsr_tiny", "rdn", "srresnet"])
def test_features_equal_forward_features_feat(name):
    small = {
        "edsr_tiny": {},
        "rdn": {"D": 2, "C": 2, "G": 8, "G0": 8},
        "srresnet": {"n_resblocks": 2, "n_feats": 8},
    }[name]
    torch.manual_seed(0)
    model = create_model(name, scale=2, **small).eval()
    x = torch.rand(1, 3, 10, 9) * 255
    torch.testing.assert_close(model.features(x), model.forward_features(x)[1], rtol=0, atol=0)
