"""DDTB as a ``quantize(model, config)`` transform: structure, calibration, gates, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from conftest import TINY, float_model, lr_batches
from lowbitsr.errors import ConfigError
from lowbitsr.models import load_weights, save_weights
from lowbitsr.quant.apply import (
    bound_parameters,
    config_from_dict,
    config_to_dict,
    dequantize,
    gate_parameters,
    gate_regularizer,
    quantize,
    quantized_convs,
    quantizers,
    set_gates_applied,
)
from lowbitsr.quant.calibrate import attach_gates, calibrate, gated_layer_names
from lowbitsr.quant.ddtb import DDTBConfig
from lowbitsr.quant.functional import percentile_bounds
from lowbitsr.quant.layers import DDTBActQuant, DynamicGate, QuantConv2d, UnsupportedModelError

# Expected activation-quantizer names (forward order) of each tiny model.
QUANT_NAMES = {
    "edsr": [f"body.{i}.quant_act{k}" for i in range(2) for k in (1, 2, 3)],
    "rdn": [
        n
        for i in range(2)
        for n in (f"RDBs.{i}.quant_act1", f"RDBs.{i}.convs.1.quant_act", f"RDBs.{i}.quant_act2")
    ]
    + ["GFF.quant_act"],
    "srresnet": [f"residual.{i}.quant_act{k}" for i in range(2) for k in (1, 2)],
}
CONV_NAMES = {
    "edsr": [f"body.{i}.body.{j}" for i in range(2) for j in (0, 2)],
    "rdn": [
        n
        for i in range(2)
        for n in (f"RDBs.{i}.convs.0.conv.0", f"RDBs.{i}.convs.1.conv.0", f"RDBs.{i}.LFF")
    ]
    + ["GFF.0"],
    "srresnet": [f"residual.{i}.conv{k}" for i in range(2) for k in (1, 2)],
}
FP_CONVS = {
    "edsr": ["head.0", "body.2", "tail.0.0", "tail.1"],
    "rdn": ["SFENet1", "SFENet2", "GFF.1", "UPNet.0", "UPNet.2"],
    "srresnet": ["conv_input", "conv_mid", "upscale.0", "conv_output"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def ddtb_model(arch: str, bits: int = 2, *, calibrated: bool = True, **cfg) -> nn.Module:
    q = quantize(float_model(arch), DDTBConfig(bits=bits, **cfg))
    if calibrated:
        calibrate(q, lr_batches())
    return q


def val(p: Tensor) -> float:
    return float(p.detach())


def perturb_gates(model: nn.Module, seed: int = 5) -> None:
    """Give the gates' BN non-default statistics so that every gate tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DynamicGate):
                m.bn.weight.copy_(1 + 0.3 * torch.randn(m.bn.weight.shape, generator=g))
                m.bn.bias.copy_(0.3 * torch.randn(m.bn.bias.shape, generator=g))
                m.bn.running_mean.copy_(0.2 * torch.randn(m.bn.running_mean.shape, generator=g))
                m.bn.running_var.copy_(0.5 + torch.rand(m.bn.running_var.shape, generator=g))


# --------------------------------------------------------------------------------------- config
def test_config_validation_and_dict_round_trip() -> None:
    cfg = DDTBConfig(bits=3, dynamic_ratio=0.25, compat="official")
    d = config_to_dict(cfg)
    assert d["method"] == "ddtb" and d["bits"] == 3 and d["dynamic_ratio"] == 0.25
    assert config_from_dict(d) == cfg
    assert config_from_dict({"method": "ddtb"}) == DDTBConfig()
    with pytest.raises(ConfigError, match="bits"):
        DDTBConfig(bits=8)
    with pytest.raises(ConfigError, match="bits"):
        DDTBConfig(bits=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dynamic_ratio"):
        DDTBConfig(dynamic_ratio=1.5)
    with pytest.raises(ConfigError, match="compat"):
        DDTBConfig(compat="paper")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="calib_percentile"):
        DDTBConfig(calib_percentile=5)
    with pytest.raises(ConfigError, match=r"quant\.gate_size"):
        config_from_dict({"method": "ddtb", "gate_size": 3})
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_dict({"method": "lsq"})
    with pytest.raises(ConfigError, match="method"):
        config_from_dict({"bits": 2})
    # the QAT recipe stores the calibration result beside the config: accepted, not a setting
    assert config_from_dict({**d, "gated_layers": ["body.0.quant_act1"]}) == cfg


def test_unsupported_model_and_double_quantize() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*EDSR, RDN, SRResNet"):
        quantize(nn.Sequential(nn.Conv2d(3, 3, 3)), DDTBConfig())
    with pytest.raises(TypeError):
        quantize(nn.Sequential(nn.Conv2d(3, 3, 3)), DDTBConfig())
    q = quantize(float_model("edsr"), DDTBConfig())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(q, DDTBConfig())
    with pytest.raises(TypeError, match="config"):
        quantize(float_model("edsr"), {"method": "ddtb"})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_structure(arch: str, bits: int) -> None:
    fp = float_model(arch)
    q = quantize(fp, DDTBConfig(bits=bits))
    assert q is not fp
    assert [n for n, _ in quantizers(q)] == QUANT_NAMES[arch]
    assert all(m.bits == bits and m.gate is None for _, m in quantizers(q))
    convs = dict(quantized_convs(q))
    assert sorted(convs) == sorted(CONV_NAMES[arch])
    mode = "minmax" if arch == "rdn" else "percentile"
    assert all(c.w_bits == bits and c.w_mode == mode for c in convs.values())
    modules = dict(q.named_modules())
    for name in FP_CONVS[arch]:
        assert type(modules[name]) is nn.Conv2d, name
    # float weights keep their keys; no parameter is shared with the float model
    fp_keys = set(fp.state_dict())
    assert fp_keys <= set(q.state_dict())
    assert not {id(p) for p in fp.parameters()} & {id(p) for p in q.parameters()}
    assert q.quant_config_dict == config_to_dict(DDTBConfig(bits=bits))
    assert q.model_config == fp.model_config and q.model_config is not fp.model_config
    x = lr_batches(1)[0]
    assert q(x).shape == fp(x).shape
    _, feat = q.forward_features(x)
    assert feat.shape[1] == fp.forward_features(x)[1].shape[1]


def test_official_rdn_quantizes_gff1_weight() -> None:
    q = quantize(float_model("rdn"), DDTBConfig(compat="official"))
    convs = dict(quantized_convs(q))
    assert "GFF.1" in convs and convs["GFF.1"].w_mode == "minmax"


def test_dequantize_gives_back_the_float_model() -> None:
    for arch in TINY:
        fp = float_model(arch)
        q = ddtb_model(arch)
        back = dequantize(q)
        assert not any(isinstance(m, (QuantConv2d, DDTBActQuant)) for m in back.modules())
        assert set(back.state_dict()) == set(fp.state_dict())
        x = lr_batches(1)[0]
        with torch.no_grad():
            assert torch.equal(back(x), fp(x))


def _record_io(model: nn.Module, names: list[str]) -> tuple[dict, dict]:
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            ins[name], outs[name] = args[0], out

        return fn

    for n in names:  # the model is thrown away after one forward: hooks stay on it
        modules[n].register_forward_hook(hook(n))
    return ins, outs


def test_quantizer_wiring_follows_methods_1_5() -> None:
    """Check the data flow of each block against docs/methods.md §1.5 with forward hooks."""
    x = lr_batches(1, seed=17)[0]
    # EDSR: r = QA1(x); h = QConv1(x); h = QA2(relu(h)); out = QA3(QConv2(h) * rs) + r
    q = ddtb_model("edsr")
    names = ["body.0", "body.0.quant_act1", "body.0.body.0", "body.0.body.1"]
    names += ["body.0.quant_act2", "body.0.body.2", "body.0.quant_act3"]
    ins, outs = _record_io(q, names)
    with torch.no_grad():
        q(x)
    assert torch.equal(ins["body.0.body.0"], ins["body.0"])  # conv1 sees the unquantized input
    assert torch.equal(ins["body.0.quant_act1"], ins["body.0"])
    assert torch.equal(ins["body.0.quant_act2"], outs["body.0.body.1"])
    assert torch.equal(ins["body.0.body.2"], outs["body.0.quant_act2"])
    assert torch.equal(ins["body.0.quant_act3"], outs["body.0.body.2"])
    assert torch.equal(outs["body.0"], outs["body.0.quant_act3"] + outs["body.0.quant_act1"])
    # SRResNet: BN2(QConv2(QA2(PReLU(BN1(QConv1(QA1(x))))))) + x
    q = ddtb_model("srresnet")
    p = "residual.0"
    names = [p, f"{p}.quant_act1", f"{p}.conv1", f"{p}.relu", f"{p}.quant_act2", f"{p}.conv2"]
    names.append(f"{p}.in2")
    ins, outs = _record_io(q, names)
    with torch.no_grad():
        q(x)
    assert torch.equal(ins[f"{p}.conv1"], outs[f"{p}.quant_act1"])
    assert torch.equal(ins[f"{p}.quant_act2"], outs[f"{p}.relu"])
    assert torch.equal(ins[f"{p}.conv2"], outs[f"{p}.quant_act2"])
    assert torch.equal(outs[p], outs[f"{p}.in2"] + ins[p])  # FP skip
    # RDN: block input, later dense inputs and the LFF input quantized; GFF input quantized
    q = ddtb_model("rdn")
    p = "RDBs.0"
    names = [p, f"{p}.quant_act1", f"{p}.convs.0.conv.0", f"{p}.convs.1", f"{p}.convs.1.quant_act"]
    names += [f"{p}.convs.1.conv.0", f"{p}.quant_act2", f"{p}.LFF", "GFF.quant_act", "GFF.0"]
    ins, outs = _record_io(q, names)
    with torch.no_grad():
        q(x)
    assert torch.equal(ins[f"{p}.convs.0.conv.0"], outs[f"{p}.quant_act1"])
    assert torch.equal(ins[f"{p}.convs.1.conv.0"], outs[f"{p}.convs.1.quant_act"])
    cin = ins[f"{p}.convs.1.conv.0"].shape[1]
    assert torch.equal(outs[f"{p}.convs.1"][:, :cin], outs[f"{p}.convs.1.quant_act"])
    assert torch.equal(ins[f"{p}.LFF"], outs[f"{p}.quant_act2"])
    assert torch.equal(outs[p], outs[f"{p}.LFF"] + outs[f"{p}.quant_act1"])
    assert torch.equal(ins["GFF.0"], outs["GFF.quant_act"])
    assert ins["GFF.quant_act"].shape[1] == 2 * 8  # D * G0: the concatenated RDB outputs


# ------------------------------------------------------------------------------ training step
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_teacher_untouched_and_bounds_get_gradients(arch: str) -> None:
    teacher = float_model(arch)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = quantize(teacher, DDTBConfig(bits=2, dynamic_ratio=0.5))
    calibrate(student, lr_batches())
    set_gates_applied(student, True)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = lr_batches(1, batch=3, seed=7)[0]
    loss = (student(x) - teacher(x).detach()).abs().mean()
    loss.backward()
    bounds = bound_parameters(student)
    assert len(bounds) == 2 * len(QUANT_NAMES[arch])
    assert all(p.grad is not None for p in bounds)
    assert sum(float(p.grad.abs().sum()) for p in bounds) > 0
    opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------ levels
def _level_hooks(model: nn.Module, store: dict[str, Tensor]) -> list:
    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            store[name] = out.detach()

        return fn

    return [m.register_forward_hook(hook(n)) for n, m in quantizers(model)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_at_most_2k_levels(arch: str, bits: int) -> None:
    q = ddtb_model(arch, bits, dynamic_ratio=0.5)
    set_gates_applied(q, True)
    assert any(m.gate is not None for _, m in quantizers(q))
    outs: dict[str, Tensor] = {}
    handles = _level_hooks(q, outs)
    with torch.no_grad():
        q(lr_batches(1, batch=3, seed=3)[0])
    for h in handles:
        h.remove()
    assert set(outs) == set(QUANT_NAMES[arch])
    for name, out in outs.items():
        for sample in out:
            assert sample.unique().numel() <= 2**bits, name
    for name, conv in quantized_convs(q):
        assert conv.quantized_weight().unique().numel() <= 2**bits, name


# ------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_gated_layers_are_the_most_dynamic(arch: str) -> None:
    q = quantize(float_model(arch), DDTBConfig())
    summary = calibrate(q, lr_batches())
    ratio = {"edsr": 0.3, "rdn": 0.5, "srresnet": 0.1}[arch]
    n_quant = len(QUANT_NAMES[arch])
    assert summary["num_quantizers"] == n_quant
    assert summary["num_gated"] == int(n_quant * ratio) == len(summary["gated"])
    intensity = summary["intensity"]
    ranked = sorted(intensity, key=lambda n: -intensity[n])
    assert summary["gated"] == ranked[: summary["num_gated"]]
    gated_modules = [n for n, m in quantizers(q) if m.gate is not None]
    assert sorted(gated_modules) == sorted(summary["gated"])
    assert all(not m.gate_applied for _, m in quantizers(q))


def test_intensity_is_population_variance_of_per_sample_extremes() -> None:
    """Recompute EDSR's intensities from the float model with hooks (per sample, population)."""
    fp = float_model("edsr")
    inputs: dict[str, list[Tensor]] = {n: [] for n in QUANT_NAMES["edsr"]}
    handles = []
    for i, block in enumerate(fp.body[:2]):

        def pre(m, args, i=i):
            inputs[f"body.{i}.quant_act1"].append(args[0])

        def relu(m, args, out, i=i):
            inputs[f"body.{i}.quant_act2"].append(out)

        def conv2(m, args, out, i=i, rs=block.res_scale):
            inputs[f"body.{i}.quant_act3"].append(out * rs)

        handles += [
            block.register_forward_pre_hook(pre),
            block.body[1].register_forward_hook(relu),
            block.body[2].register_forward_hook(conv2),
        ]
    batches = lr_batches(4)
    with torch.no_grad():
        for b in batches:
            fp(b)
    for h in handles:
        h.remove()
    expected = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double().flatten(1)
        expected[name] = float(x.amax(1).var(unbiased=False) + x.amin(1).var(unbiased=False))

    q = quantize(fp, DDTBConfig())
    summary = calibrate(q, batches)
    for name, value in expected.items():
        assert summary["intensity"][name] == pytest.approx(value, rel=1e-9), name
    top = sorted(expected, key=lambda n: -expected[n])[: int(6 * 0.3)]
    assert summary["gated"] == top

    # official: one max/min per batch
    q_off = quantize(fp, DDTBConfig(compat="official"))
    s_off = calibrate(q_off, batches)
    for name, xs in inputs.items():
        mx = torch.stack([t.double().max() for t in xs])
        mn = torch.stack([t.double().min() for t in xs])
        ref = float(mx.var(unbiased=False) + mn.var(unbiased=False))
        assert s_off["intensity"][name] == pytest.approx(ref, rel=1e-9), name


@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_calibration_sets_percentile_bounds_in_forward_order(arch: str) -> None:
    q = quantize(float_model(arch), DDTBConfig(bits=3))
    seen: dict[str, Tensor] = {}

    def capture(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            seen[name] = args[0].detach().clone()

        return fn

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in quantizers(q)]
    batches = lr_batches()
    summary = calibrate(q, batches)
    m = 95.0 if arch == "rdn" else 99.0
    calib_inputs = dict(seen)
    for name, module in quantizers(q):
        lo, hi = percentile_bounds(calib_inputs[name], 100 - m, m)
        assert torch.equal(module.lower.detach(), lo), name
        assert torch.equal(module.upper.detach(), hi), name
        assert summary["bounds"][name] == (float(lo), float(hi))
    # the bound pass ran on the first batch, every layer seeing its predecessors quantized with
    # their final bounds: rerunning that batch now reproduces exactly the inputs it saw
    with torch.no_grad():
        q(batches[0])
    for h in handles:
        h.remove()
    for name in calib_inputs:
        assert torch.equal(seen[name], calib_inputs[name]), name


def test_official_init_is_fixed_at_3_and_4_bits_and_percentile_at_2() -> None:
    for bits in (3, 4):
        q = ddtb_model("edsr", bits, compat="official")
        for _, m in quantizers(q):
            assert val(m.lower) == -10.0 and val(m.upper) == 10.0
    q2 = ddtb_model("edsr", 2, compat="official")
    assert all(val(m.upper) != 10.0 for _, m in quantizers(q2))
    q3 = ddtb_model("edsr", 3)  # default: data-driven at every bit-width
    assert all(val(m.upper) != 10.0 for _, m in quantizers(q3))


def test_calibrate_twice_recalibrates_and_leaves_weights_alone() -> None:
    q = quantize(float_model("srresnet"), DDTBConfig(dynamic_ratio=0.5))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.train()
    s1 = calibrate(q, lr_batches())
    assert q.training and all(m.training for m in q.modules())  # mode restored (gates too)
    after = q.state_dict()
    for k, v in before.items():
        if not k.endswith((".lower", ".upper")):
            assert torch.equal(after[k], v), k  # incl. BN running statistics
    s2 = calibrate(q, iter(lr_batches()))  # a one-shot iterator works too
    assert s1["gated"] == s2["gated"] and s1["bounds"] == s2["bounds"]
    assert len([m for m in q.modules() if isinstance(m, DynamicGate)]) == s2["num_gated"]
    with pytest.raises(ValueError, match="no batches"):
        calibrate(q, [])
    with pytest.raises(ConfigError, match="not quantized"):
        calibrate(float_model("edsr"), lr_batches(1))


# ------------------------------------------------------------------------------------- gates
@pytest.mark.parametrize("compat", ["default", "official"])
def test_gate_gradients(compat: str) -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=1.0, compat=compat)
    set_gates_applied(q, True)
    q.train()
    q(lr_batches(1, batch=4, seed=9)[0]).abs().mean().backward()
    gates = [m for m in q.modules() if isinstance(m, DynamicGate)]
    assert len(gates) == 6
    assert len(gate_parameters(q)) == 6 * 4  # conv1, bn weight/bias, conv2

    def nonzero(p: Tensor) -> bool:
        return p.grad is not None and bool(p.grad.abs().sum() > 0)

    assert all(nonzero(g.conv2.weight) for g in gates)
    if compat == "default":
        for g in gates:
            assert nonzero(g.conv1.weight) and nonzero(g.bn.weight) and nonzero(g.bn.bias)
    else:
        for g in gates:
            assert not any(nonzero(p) for p in (g.conv1.weight, g.bn.weight, g.bn.bias))


@pytest.mark.parametrize("compat", ["default", "official"])
def test_per_sample_gate_independence(compat: str) -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=1.0, compat=compat)
    perturb_gates(q)
    set_gates_applied(q, True)
    a, b = lr_batches(1, batch=2, seed=11)[0]
    with torch.no_grad():
        y1 = q(torch.stack([a, b]))
        y2 = q(torch.stack([a, b * 0.1]))
    if compat == "default":
        assert torch.equal(y1[0], y2[0])
    else:
        assert not torch.equal(y1[0], y2[0])


def test_gate_regularizer_and_first_stage() -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=0.5)
    assert float(gate_regularizer(q)) == 0.0  # nothing ran yet
    x = lr_batches(1, batch=3, seed=4)[0]
    q.train()  # first stage: gates computed (logits kept) but not applied
    y_stage1 = q(x)
    gated = [m for _, m in quantizers(q) if m.gate is not None]
    assert len(gated) == 3 and all(m.last_logits is not None for m in gated)
    by_hand = torch.stack([(m.last_logits**2).mean() for m in gated]).mean()
    reg = gate_regularizer(q)
    assert torch.equal(reg, by_hand) and reg.requires_grad
    # not applying the gates means the static quantizer: same as a model without gates
    ungated = quantize(float_model("edsr"), DDTBConfig(dynamic_ratio=0.5))
    ungated.load_state_dict({k: v for k, v in q.state_dict().items() if ".gate." not in k})
    assert all(m.gate is None for _, m in quantizers(ungated))
    ungated.train()
    assert torch.equal(ungated(x), y_stage1)
    q.eval()
    with torch.no_grad():
        q(x)
    assert float(gate_regularizer(q)) == 0.0  # eval + not applied: the gates do not run


def test_gate_handles_single_sample_and_constant_input() -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=1.0)
    set_gates_applied(q, True)
    q.train()
    y = q(lr_batches(1, batch=1)[0])  # BN over a 1×1 map of one sample
    assert torch.isfinite(y).all()
    y.mean().backward()
    q.eval()
    with torch.no_grad():
        y = q(torch.full((2, 3, 12, 12), 128.0))
    assert torch.isfinite(y).all()


def test_attach_gates_rebuilds_structure_for_resume() -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=0.5)
    names = gated_layer_names(q)
    assert names == [n for n, m in quantizers(q) if m.gate is not None] and len(names) == 3
    fresh = quantize(float_model("edsr"), DDTBConfig(dynamic_ratio=0.5))
    attach_gates(fresh, names)
    assert gated_layer_names(fresh) == names
    assert set(fresh.state_dict()) == set(q.state_dict())
    attach_gates(fresh, names[:1])
    assert gated_layer_names(fresh) == names[:1]
    with pytest.raises(ConfigError, match="not a DDTB activation quantizer"):
        attach_gates(fresh, ["body.0.body.0"])


# ------------------------------------------------------------------------------------- print
def test_print_shows_method_bits_and_bounds() -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=0.5)
    text = str(q)
    assert "method=ddtb" in text and "bits=2" in text
    m = dict(quantizers(q))["body.0.quant_act1"]
    assert f"lower={val(m.lower):.6g}" in text and f"upper={val(m.upper):.6g}" in text
    assert "w_bits=2, w_mode=percentile" in text and "DynamicGate" in text


# ------------------------------------------------------------------------------ weight cache
def test_eval_weight_cache_matches_uncached_and_is_invalidated() -> None:
    q = ddtb_model("edsr", 2, dynamic_ratio=0.5)
    set_gates_applied(q, True)
    x = lr_batches(1, seed=13)[0]
    conv = dict(quantized_convs(q))["body.0.body.0"]
    q.eval()
    with torch.no_grad():
        cached = q(x)
        assert conv._wq_cache is not None
        assert torch.equal(conv.quantized_weight(), conv._quantize(conv.weight))
    uncached = q(x)  # grad enabled: recomputed with graph, no cache use
    assert uncached.requires_grad and torch.equal(cached, uncached.detach())

    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    q.train()
    assert conv._wq_cache is None
    opt.zero_grad()
    q(x).abs().mean().backward()
    opt.step()
    q.eval()
    with torch.no_grad():
        after_step = q(x)
    assert not torch.equal(after_step, cached)
    assert torch.equal(after_step, q(x).detach())

    # an in-place weight change while staying in eval mode also invalidates it
    with torch.no_grad():
        conv.weight.mul_(-1)
        flipped = q(x)
        assert torch.equal(conv.quantized_weight(), conv._quantize(conv.weight))
    assert torch.equal(flipped, q(x).detach())


# ------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_state_dict_round_trip_with_gates(arch: str, tmp_path: Path) -> None:
    q = ddtb_model(arch, 2, dynamic_ratio=0.5)
    perturb_gates(q)
    set_gates_applied(q, True)
    x = lr_batches(1, batch=3, seed=21)[0]
    with torch.no_grad():
        ref = q(x)
    gated = sorted(n for n, m in quantizers(q) if m.gate is not None)
    assert gated

    path = save_weights(q, tmp_path / "ddtb.safetensors")
    fresh = quantize(float_model(arch, seed=99), config_from_dict(q.quant_config_dict))
    load_weights(fresh, path)
    assert sorted(n for n, m in quantizers(fresh) if m.gate is not None) == gated
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)

    plain = quantize(float_model(arch, seed=98), DDTBConfig(dynamic_ratio=0.5))
    plain.load_state_dict(q.state_dict())  # a plain load attaches the gates too
    assert sorted(n for n, m in quantizers(plain) if m.gate is not None) == gated
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ref)


# Reverse of lowbitsr.quant.compat: our layout -> the DDTB authors' layout (test-only).
def _their_prefix(arch: str, ours: str) -> str:
    if arch == "srresnet":
        return re.sub(r"\.quant_act(\d)$", r".act\1", ours)
    if arch == "rdn":
        if ours == "GFF.quant_act":
            return "act"
        return re.sub(r"\.quant_act(\d?)$", r".act\1", ours)
    return ours


def _random_gate(prefix: str, channels: int, g: torch.Generator) -> dict[str, Tensor]:
    return {
        f"{prefix}.atten_c.1.weight": torch.randn(32, channels, 1, 1, generator=g),
        f"{prefix}.atten_c.2.weight": torch.randn(32, generator=g),
        f"{prefix}.atten_c.2.bias": torch.randn(32, generator=g),
        f"{prefix}.atten_c.2.running_mean": torch.randn(32, generator=g),
        f"{prefix}.atten_c.2.running_var": torch.rand(32, generator=g) + 0.5,
        f"{prefix}.atten_c.2.num_batches_tracked": torch.tensor(7),
        f"{prefix}.atten_c.5.weight": torch.randn(2, 32, 1, 1, generator=g),
    }


def to_official(model: nn.Module, arch: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    quants = dict(quantizers(model))
    sub_map = {"gate.conv1.": "atten_c.1.", "gate.bn.": "atten_c.2.", "gate.conv2.": "atten_c.5."}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if arch == "edsr" and (m := re.match(r"^(body\.\d+)\.body\.2\.(.+)$", key)):
            out[f"{m.group(1)}.body.3.{m.group(2)}"] = value
            continue
        prefix = next((p for p in quants if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        sub = key[len(prefix) + 1 :]
        sub = {"lower": "alpha_lower", "upper": "alpha_upper"}.get(sub, sub)
        for ours, theirs in sub_map.items():
            sub = sub.replace(ours, theirs) if sub.startswith(ours) else sub
        out[f"{_their_prefix(arch, prefix)}.{sub}"] = value
    for prefix, q in quants.items():
        theirs = _their_prefix(arch, prefix)
        out[f"{theirs}.is_dynamic"] = torch.ones(1) if q.gate is not None else torch.zeros(1)
        out[f"{theirs}.max_val"] = torch.tensor(3.0)
        out[f"{theirs}.min_val"] = torch.tensor(-3.0)
        if q.gate is None:  # their static layers carry unused gate tensors too
            out.update(_random_gate(theirs, q.channels, g))
    if arch == "edsr":  # their quant_act2 is also body.2 of the block's Sequential
        for key in list(out):
            if m := re.match(r"^(body\.\d+)\.quant_act2\.(.+)$", key):
                out[f"{m.group(1)}.body.2.{m.group(2)}"] = out[key].clone()
    if arch == "rdn":  # their first dense layer owns a quantizer its forward never runs
        for i in range(2):
            p = f"RDBs.{i}.convs.0.act"
            out.update(
                {f"{p}.alpha_lower": torch.tensor([-10.0]), f"{p}.alpha_upper": torch.ones(1)}
            )
            out[f"{p}.is_dynamic"] = torch.zeros(1)
            out.update(_random_gate(p, 8, g))
    return out


@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_official_checkpoint_loads_with_identical_outputs(arch: str, tmp_path: Path) -> None:
    src = ddtb_model(arch, 2, compat="official", dynamic_ratio=0.5)
    perturb_gates(src)
    set_gates_applied(src, True)
    gated = sorted(n for n, m in quantizers(src) if m.gate is not None)
    assert 0 < len(gated) < len(QUANT_NAMES[arch])
    x = lr_batches(1, batch=3, seed=31)[0]
    with torch.no_grad():
        ref = src(x)

    official = to_official(src, arch)
    assert any(k.endswith(".alpha_lower") for k in official)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": official, "epoch": 12}, path)

    fresh = quantize(float_model(arch, seed=123), DDTBConfig(bits=2, compat="official"))
    load_weights(fresh, path)
    assert sorted(n for n, m in quantizers(fresh) if m.gate is not None) == gated
    assert all(m.gate_applied for _, m in quantizers(fresh))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)


def test_official_edsr_inconsistent_duplicate_is_refused(tmp_path: Path) -> None:
    src = ddtb_model("edsr", 2, compat="official")
    official = to_official(src, "edsr")
    official["body.0.body.2.alpha_upper"] = official["body.0.body.2.alpha_upper"] + 1
    path = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": official}, path)
    fresh = quantize(float_model("edsr"), DDTBConfig(compat="official"))
    with pytest.raises(Exception, match=r"body\.0\.body\.2\.alpha_upper"):
        load_weights(fresh, path)


def test_quantizers_round_in_float32_under_bf16_autocast() -> None:
    # A conv under bf16 autocast hands on bf16; the codes must not depend on that precision.
    from lowbitsr.quant.layers import DDTBActQuant, PAMSActQuant

    x = (torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 40).bfloat16()
    d = DDTBActQuant(2, 4)
    d.reset_bounds(-37.3, 51.7)
    p = PAMSActQuant(4)
    with torch.no_grad():
        p.alpha.fill_(33.3)
        for q in (d, p):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = q(x)
            assert y.dtype == torch.float32
            assert torch.equal(y, q(x.float()))
