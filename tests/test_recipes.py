"""QAT recipes through the shared training loop: calibration, stages, save/load, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbitsr.checkpoint import load_model, save_model
from lowbitsr.config import load_config
from lowbitsr.errors import ConfigError
from lowbitsr.losses import attention_map, attention_transfer
from lowbitsr.models import create_model
from lowbitsr.quant import gated_layer_names, quantizers
from lowbitsr.train import train


@pytest.fixture
def fp_init(tmp_path):
    torch.manual_seed(0)
    model = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=8)
    return save_model(model, tmp_path / "fp")


def qat_cfg(folder, out, init, name="q", method="ddtb", bits=2, iters=6, extra=()):
    return load_config(
        None,
        [
            f"name={name}",
            f"output_root={out}",
            "model.name=edsr_tiny",
            "model.scale=2",
            "model.overrides={n_resblocks: 2, n_feats: 8}",
            f"model.init={init}",
            f"data.train={{type: folder, root: {folder}, lr_patch: 8, repeat: 4}}",
            f"data.val={{type: folder, root: {folder}}}",
            f"train.iterations={iters}",
            "train.batch_size=4",
            "train.checkpoint_every=2",
            "train.val_every=2",
            "train.log_every=1",
            f"quant={{method: {method}, bits: {bits}}}",
            "quant.recipe={gate_stage_iters: 3, calib_batches: 1}",
            *extra,
        ],
    )


def test_attention_transfer_properties():
    a = torch.randn(2, 4, 5, 5)
    assert attention_transfer(a, a) == 0
    assert attention_transfer(a, 3 * a) < 1e-12  # scale-invariant (L2-normalised maps)
    m = attention_map(a)
    assert m.shape == (2, 25)
    torch.testing.assert_close(m.norm(dim=1), torch.ones(2))
    assert attention_transfer(a, torch.randn(2, 4, 5, 5)) > 0


def test_qat_requires_float_init(image_folder, tmp_path):
    cfg = qat_cfg(image_folder, tmp_path, init="null")
    with pytest.raises(ConfigError, match=r"model\.init"):
        train(cfg, progress=False)


def test_unknown_recipe_key(image_folder, tmp_path, fp_init):
    cfg = qat_cfg(image_folder, tmp_path, fp_init, extra=["quant.recipe.bound_rate=1"])
    with pytest.raises(ConfigError, match=r"quant\.recipe\.bound_rate"):
        train(cfg, progress=False)


@pytest.mark.parametrize("method,bits", [("ddtb", 2), ("pams", 3)])
def test_qat_run_saves_a_model_that_reloads_identically(
    image_folder, tmp_path, fp_init, method, bits
):
    cfg = qat_cfg(image_folder, tmp_path, fp_init, name=f"{method}{bits}", method=method, bits=bits)
    res = train(cfg, progress=False)
    header = json.loads((res.run_dir / "model.json").read_text())
    assert header["quant"]["method"] == method and header["quant"]["bits"] == bits
    log = [json.loads(x) for x in (res.run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "l1" in r]
    assert all("kd" in r for r in losses)  # distillation is on
    if method == "ddtb":
        # first stage (steps 1-3) carries the gate regulariser, later steps do not
        assert all("gate_reg" in r for r in losses if r["step"] <= 3)
        assert not any("gate_reg" in r for r in losses if r["step"] > 3)
    model = load_model(res.run_dir)
    assert len(quantizers(model)) == 6
    x = torch.rand(2, 3, 12, 12) * 255
    with torch.no_grad():
        out = model(x)
        levels = {len(torch.unique(t)) for t in _quantized_inputs(model, x)}
    assert out.shape == (2, 3, 24, 24)
    assert max(levels) <= 2**bits
    if method == "ddtb":
        assert gated_layer_names(model) == header["quant"]["gated_layers"]
        assert len(gated_layer_names(model)) == int(6 * 0.3)


def _quantized_inputs(model, x):
    outs = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: outs.append(o[0])) for _, m in quantizers(model)
    ]
    model(x[:1])
    for h in hooks:
        h.remove()
    return outs


def test_qat_resume_equals_uninterrupted(image_folder, tmp_path, fp_init):
    ref = train(qat_cfg(image_folder, tmp_path, fp_init, name="ref"), progress=False)
    cfg = qat_cfg(image_folder, tmp_path, fp_init, name="cut")
    train(cfg, progress=False, stop_after=4)  # stops after the gate stage switched
    done = train(cfg, progress=False, resume=True)
    assert done.step == 6
    a = load_file(str(ref.run_dir / "checkpoint.safetensors"))
    b = load_file(str(done.run_dir / "checkpoint.safetensors"))
    keys = [k for k in a if k.startswith("model.")]
    assert any(".gate." in k for k in keys)
    assert set(keys) == {k for k in b if k.startswith("model.")}
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_model_init_accepts_a_run_folder(tmp_path):
    from lowbitsr.train import build_model

    torch.manual_seed(0)
    model = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    (tmp_path / "run").mkdir()
    save_model(model, tmp_path / "run")  # a run folder holds model.safetensors + model.json
    overrides = "model.overrides={n_resblocks: 1, n_feats: 8}"
    cfg = load_config(
        None, ["model.name=edsr_tiny", "model.scale=2", overrides, f"model.init={tmp_path / 'run'}"]
    )
    built = build_model(cfg)
    for a, b in zip(model.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_output_distillation_term(image_folder, tmp_path, fp_init):
    from lowbitsr.checkpoint import load_model as load
    from lowbitsr.quant.recipes import QATRecipe

    cfg = qat_cfg(image_folder, tmp_path, fp_init, extra=["quant.recipe.output_kd_weight=0.5"])
    recipe = QATRecipe(cfg)
    torch.manual_seed(0)
    lr = torch.rand(4, 3, 8, 8) * 255
    hr = torch.rand(4, 3, 16, 16) * 255
    student = recipe.prepare(load(fp_init), iter([{"lr": lr}]))
    loss, logs = recipe.loss(student, {"lr": lr, "hr": hr}, step=10)  # after the gate stage
    with torch.no_grad():
        sr = student(lr)
        sr_t = recipe.teacher(lr)
    okd = torch.nn.functional.l1_loss(sr, sr_t)
    assert okd > 0  # the 2-bit student differs from its float teacher
    assert logs["okd"] == pytest.approx(float(okd), rel=1e-5)
    want = logs["l1"] + 1000.0 * logs["kd"] + 0.5 * logs["okd"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    # off by default: the papers' loss, no teacher output computed
    plain = QATRecipe(qat_cfg(image_folder, tmp_path, fp_init, name="plain"))
    student = plain.prepare(load(fp_init), iter([{"lr": lr}]))
    assert "okd" not in plain.loss(student, {"lr": lr, "hr": hr}, step=10)[1]


def test_recipe_weights_must_be_non_negative(image_folder, tmp_path, fp_init):
    cfg = qat_cfg(image_folder, tmp_path, fp_init, extra=["quant.recipe.output_kd_weight=-1"])
    with pytest.raises(ConfigError, match=r"quant\.recipe\.output_kd_weight"):
        train(cfg, progress=False)
