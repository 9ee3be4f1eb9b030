"""Deployment: bit-packed artifacts, ONNX export (float / QCDQ / gated), onnxruntime tiling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbitsr.deploy.pack import (
    PackedConv2d,
    PackError,
    convert,
    format_size_report,
    is_packed_file,
    load_packed,
    pack_codes,
    save_packed,
    unpack_codes,
    weight_codes,
)
from lowbitsr.evaluate import upscale_image
from lowbitsr.models import create_model
from lowbitsr.quant import (
    DDTBConfig,
    PAMSConfig,
    calibrate,
    quantize,
    quantized_convs,
    set_gates_applied,
)
from lowbitsr.quant.functional import asym_fake_quant
from lowbitsr.quant.layers import DDTBActQuant, QuantConv2d

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbitsr.deploy.onnx_export import _act, _Graph, export_onnx  # noqa: E402
from lowbitsr.deploy.runtime import OnnxSR, upscale_image_onnx  # noqa: E402

TINY = {
    "edsr_tiny": {"n_resblocks": 2, "n_feats": 8},
    "srresnet": {"n_resblocks": 2, "n_feats": 8},
    "rdn": {"G0": 8, "D": 2, "C": 2, "G": 4},
}


def _train_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm trained-looking statistics and affine parameters.

    Freshly attached gates have identity BNs; their ternary convs then put the gate's ``Q2``
    inputs on a lattice where rounding ties are systematic and any one-ulp difference between
    two implementations flips a gate decision. Trained gates do not have that structure.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


def _tiny(cfg: DDTBConfig | PAMSConfig | None, arch: str = "edsr_tiny", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, scale=2, **TINY[arch])
    if cfg is not None:
        model = quantize(model, cfg)
        calibrate(model, [torch.rand(2, 3, 20, 20) * 255])
        set_gates_applied(model, True)
    return _train_like(model, seed).eval()


def _lr(n: int = 2, h: int = 19, w: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


# ------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_codes_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 9, 1000):
        u = rng.integers(0, 2**bits, size=n)
        packed = pack_codes(u, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
        assert np.array_equal(unpack_codes(packed, bits, n), u)


def test_pack_codes_layout() -> None:
    # 2-bit: four per byte, first element in the low bits.
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 4-bit: low nibble first.
    assert pack_codes(np.array([0xA, 0x5, 0x3]), 4).tolist() == [0x5A, 0x03]
    # 3-bit: dense, eight codes in three bytes (LSB-first bit stream).
    u = np.arange(8)
    stream = sum(int(v) << (3 * i) for i, v in enumerate(u))
    assert pack_codes(u, 3).tolist() == [stream & 255, (stream >> 8) & 255, stream >> 16]
    with pytest.raises(ValueError):
        pack_codes(np.array([4]), 2)


CONFIGS = [
    pytest.param(DDTBConfig(bits=2, dynamic_ratio=0.5), id="ddtb2-gated"),
    pytest.param(DDTBConfig(bits=3, dynamic_ratio=0.5), id="ddtb3-gated"),
    pytest.param(DDTBConfig(bits=4, dynamic_ratio=0.5), id="ddtb4-gated"),
    pytest.param(DDTBConfig(bits=3, dynamic_ratio=0.5, compat="official"), id="ddtb3-official"),
    pytest.param(PAMSConfig(bits=2), id="pams2"),
    pytest.param(PAMSConfig(bits=4), id="pams4"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_pack_round_trip_is_bit_exact(cfg: DDTBConfig | PAMSConfig, tmp_path: Path) -> None:
    model = _tiny(cfg)
    report = save_packed(model, tmp_path / "m")
    assert report["path"].endswith(".safetensors") and report["file_bytes"] < report["fp32_bytes"]
    assert is_packed_file(tmp_path / "m") and "packed" in format_size_report(report)
    loaded = load_packed(tmp_path / "m.safetensors")
    lr = _lr()
    with torch.no_grad():
        assert torch.equal(loaded(lr), model(lr))
    orig = dict((n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d))
    new = dict((n, m) for n, m in loaded.named_modules() if isinstance(m, QuantConv2d))
    assert orig.keys() == new.keys() and all(isinstance(m, PackedConv2d) for m in new.values())
    with torch.no_grad():
        for name, conv in orig.items():
            assert torch.equal(new[name].quantized_weight(), conv.quantized_weight()), name
    gated = [n for n, q in model.named_modules() if isinstance(q, DDTBActQuant) and q.gate]
    assert gated == [n for n, q in loaded.named_modules() if isinstance(q, DDTBActQuant) and q.gate]
    if isinstance(cfg, DDTBConfig):
        assert gated, "the round trip should cover gated layers"
    # Re-packing the loaded model gives the same payload.
    again = convert(loaded)["tensors"]
    first = convert(model)["tensors"]
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_packed_codes_are_k_bit(tmp_path: Path) -> None:
    model = _tiny(DDTBConfig(bits=3, dynamic_ratio=0.5))
    layout = convert(model)["layout"]
    for key, e in layout["tensors"].items():
        expect = 2 if ".gate." in key else 3
        assert e["bits"] == expect and e["pack_bits"] == expect, key
    for _, conv in quantized_convs(model):
        c = weight_codes(conv)
        assert c.scheme == "asym" and -4 <= int(c.codes.min()) <= int(c.codes.max()) <= 3


@pytest.mark.parametrize(("bits", "limit"), [(4, 1 / 7), (2, 1 / 14)])
def test_packed_body_size_ratio(bits: int, limit: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = quantize(create_model("edsr_tiny", scale=4), DDTBConfig(bits=bits))
    calibrate(model, [torch.rand(1, 3, 16, 16) * 255])
    report = save_packed(model, tmp_path / "m")
    assert report["body_ratio"] <= limit
    assert report["body_ratio"] >= bits / 32  # codes cannot beat k bits per weight
    assert report["file_bytes"] < report["fp32_bytes"]


def test_pack_errors(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="DDTB or PAMS"):
        convert(create_model("edsr_tiny", scale=2, **TINY["edsr_tiny"]))
    with pytest.raises(PackError, match="not found"):
        load_packed(tmp_path / "missing")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert not is_packed_file(tmp_path / "plain.safetensors")
    with pytest.raises(PackError, match="not a lowbitsr packed model"):
        load_packed(tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------------- ONNX
def _nodes(path: str) -> list:
    return list(onnx.load(path).graph.node)


def _min_psnr(report) -> float:
    return min(p["psnr"] for p in report.parity)


def test_onnx_float_export_matches_torch(tmp_path: Path) -> None:
    report = export_onnx(_tiny(None), tmp_path / "fp.onnx")
    assert [p["shape"] for p in report.parity] == [[1, 3, 24, 20], [2, 3, 17, 31]]
    assert max(p["max_abs_diff"] for p in report.parity) < 1e-2
    ops = {n.op_type for n in _nodes(report.path)}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops


@pytest.mark.parametrize("bits", [2, 4])
def test_onnx_static_ddtb_is_qcdq(bits: int, tmp_path: Path) -> None:
    model = _tiny(DDTBConfig(bits=bits, dynamic_ratio=0.0))
    report = export_onnx(model, tmp_path / "q.onnx")
    assert _min_psnr(report) >= 40.0
    proto = onnx.load(report.path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    by_out = {n.output[0]: n for n in nodes}
    clips = [n for n in nodes if n.op_type == "Clip"]
    assert len(clips) == 6 and len(report.qcdq_quantizers) == 6 and not report.float_quantizers
    for clip in clips:
        assert by_out[clip.input[0]].op_type == "QuantizeLinear"
        lo, hi = int(inits[clip.input[1]]), int(inits[clip.input[2]])
        assert inits[clip.input[1]].dtype == np.uint8 and (lo, hi) == (0, 2**bits - 1)
        consumers = [n for n in nodes if clip.output[0] in n.input]
        assert [n.op_type for n in consumers] == ["DequantizeLinear"]
    # Integer convs (conv2) store M-scaled zero-point-free grid indices as int8; the convs that
    # run in float (conv1) store their fake-quant weight as float32 by default (NCHWc kernels)...
    codes = {k: v for k, v in inits.items() if k.endswith("weight_codes")}
    assert sorted(codes) == ["body.0.body.2.weight_codes", "body.1.body.2.weight_codes"]
    for i in range(2):
        conv1 = model.body[i].body[0]
        with torch.no_grad():
            assert np.array_equal(inits[f"body.{i}.body.0.weight"], conv1.quantized_weight())
    # ... or, with float_conv_weights="codes", their canonical k-bit codes as int8.
    small = export_onnx(model, tmp_path / "c.onnx", float_conv_weights="codes")
    assert Path(small.path).stat().st_size < Path(report.path).stat().st_size
    assert _min_psnr(small) >= 40.0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(small.path).graph.initializer}
    codes = {k: v for k, v in inits.items() if k.endswith("weight_codes")}
    assert len(codes) == 4 and all(v.dtype == np.int8 for v in codes.values())
    for key, v in codes.items():
        levels = np.unique(v).astype(np.int64)
        assert len(levels) <= 2**bits, key
        if ".body.0." in key:
            assert -(2 ** (bits - 1)) <= v.min() <= v.max() < 2 ** (bits - 1)
        else:
            step = np.gcd.reduce(np.abs(levels[levels != 0]))
            assert (
                step > 1
                and np.abs(v).max() <= 127
                and (levels.max() - levels.min()) // step < 2**bits
            )
    # onnxruntime fuses the convs between two static quantizers into integer QLinearConv.
    assert report.fusable_convs == ["body.0.body.2", "body.1.body.2"]
    assert sum(v for k, v in report.optimized_ops.items() if k.endswith("QLinearConv")) == 2
    assert "QLinearConv" in report.summary()
    # Without integer convs (float bias kept) the QCDQ graph reproduces PyTorch to float noise.
    exact = export_onnx(model, tmp_path / "f.onnx", integer_convs=False)
    assert max(p["max_abs_diff"] for p in exact.parity) < 1e-2
    assert not any("QLinear" in k for k in exact.optimized_ops)


@pytest.mark.parametrize(
    ("cfg", "arch"),
    [
        pytest.param(DDTBConfig(bits=2, dynamic_ratio=0.5), "edsr_tiny", id="ddtb2-edsr"),
        pytest.param(DDTBConfig(bits=4, dynamic_ratio=0.5), "edsr_tiny", id="ddtb4-edsr"),
        pytest.param(
            DDTBConfig(bits=3, dynamic_ratio=0.5, compat="official"), "edsr_tiny", id="ddtb3-off"
        ),
        pytest.param(PAMSConfig(bits=2), "edsr_tiny", id="pams2-edsr"),
        pytest.param(DDTBConfig(bits=3, dynamic_ratio=0.5), "srresnet", id="ddtb3-srresnet"),
        pytest.param(DDTBConfig(bits=3, dynamic_ratio=0.5), "rdn", id="ddtb3-rdn"),
    ],
)
def test_onnx_quantized_export_matches_torch(cfg, arch: str, tmp_path: Path) -> None:
    model = _tiny(cfg, arch)
    report = export_onnx(model, tmp_path / "q.onnx")
    assert _min_psnr(report) >= 40.0, report.parity
    gated = [n for n, q in model.named_modules() if isinstance(q, DDTBActQuant) and q.gate]
    assert sorted(report.float_quantizers) == sorted(gated)
    nodes = _nodes(report.path)
    ops = {n.op_type for n in nodes}
    if gated:
        assert {"GlobalAveragePool", "Sigmoid", "Round", "Div"} <= ops
        # Gated quantizers with lower <= 0 <= upper: per-sample (axis 0) QuantizeLinear/Clip/DQ.
        per_sample = [
            n
            for n in nodes
            if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)
        ]
        fits = [
            name
            for name, q in model.named_modules()
            if isinstance(q, DDTBActQuant) and q.gate and q.lower.item() <= 0 <= q.upper.item()
        ]
        assert len(per_sample) == len(fits) > 0


def _optimized_nodes(path: str, tmp_path: Path) -> list:
    tmp_path.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return list(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize(
    "cfg",
    [DDTBConfig(bits=4, dynamic_ratio=0.0), PAMSConfig(bits=2)],
    ids=["ddtb4", "pams2"],
)
def test_onnx_float_convs_get_constant_weights(cfg, tmp_path: Path) -> None:
    """Convs that run in float carry a constant float32 weight by default (onnxruntime can then
    pre-pack it), int8 codes + DequantizeLinear with float_conv_weights="codes"; the convs
    between two static quantizers are QLinearConv after optimisation either way."""
    model = _tiny(cfg)
    fast = export_onnx(model, tmp_path / "fast.onnx")
    small = export_onnx(model, tmp_path / "small.onnx", float_conv_weights="codes")
    assert _min_psnr(fast) >= 40.0 and _min_psnr(small) >= 40.0
    assert fast.integer_weights == fast.fusable_convs == ["body.0.body.2", "body.1.body.2"]
    assert sorted(small.integer_weights) == sorted(
        [f"body.{i}.body.{j}" for i in range(2) for j in (0, 2)]
    )
    for tag, report in (("fast", fast), ("small", small)):
        nodes = _optimized_nodes(report.path, tmp_path / tag)
        ops = [n.op_type for n in nodes]
        assert ops.count("QLinearConv") == 2, tag
        # No float conv of the optimized graph computes its weight at run time.
        produced = {o: n.op_type for n in nodes for o in n.output}
        w_from_dq = [
            n.name
            for n in nodes
            if n.op_type in ("Conv", "FusedConv") and produced.get(n.input[1]) == "DequantizeLinear"
        ]
        assert (len(w_from_dq) == 0) if tag == "fast" else (len(w_from_dq) == 2), (tag, w_from_dq)
    # The ORT outputs of both exports agree (same weights, same integer convs).
    x = _lr(1, 16, 18).numpy()
    a = ort.InferenceSession(fast.path, providers=["CPUExecutionProvider"]).run(None, {"lr": x})
    b = ort.InferenceSession(small.path, providers=["CPUExecutionProvider"]).run(None, {"lr": x})
    psnr = 10 * np.log10(255.0**2 / max(1e-12, float(np.mean((a[0] - b[0]) ** 2))))
    assert psnr >= 40.0


def test_onnx_pixel_shuffle_forms_are_identical(tmp_path: Path) -> None:
    model = _tiny(None)
    a = export_onnx(model, tmp_path / "t.onnx")
    b = export_onnx(model, tmp_path / "d.onnx", pixel_shuffle="depth_to_space")
    assert "DepthToSpace" not in a.node_counts and b.node_counts["DepthToSpace"] == 1
    x = _lr(2, 13, 21).numpy()
    ya = ort.InferenceSession(a.path, providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
    yb = ort.InferenceSession(b.path, providers=["CPUExecutionProvider"]).run(None, {"lr": x})[0]
    assert ya.shape == (2, 3, 26, 42) and np.array_equal(ya, yb)
    # x3 (one shuffle of 3) too.
    torch.manual_seed(0)
    m3 = create_model("edsr_tiny", scale=3, **TINY["edsr_tiny"]).eval()
    r3 = export_onnx(m3, tmp_path / "x3.onnx")
    assert max(p["max_abs_diff"] for p in r3.parity) < 1e-2


def test_onnx_static_gates_opt_in(tmp_path: Path) -> None:
    """static_gates replaces each gate by fixed bound multipliers: the export then equals the
    PyTorch model with those static bounds (not the gated model), and the convs next to formerly
    gated quantizers become integer."""
    from lowbitsr.deploy.onnx_export import mean_gate_multipliers

    model = _tiny(DDTBConfig(bits=4, dynamic_ratio=1.0))
    gated = sorted(n for n, q in model.named_modules() if isinstance(q, DDTBActQuant) and q.gate)
    assert len(gated) == 6
    default = export_onnx(model, tmp_path / "g.onnx")
    assert sorted(default.float_quantizers) == gated and not default.fusable_convs
    assert not default.static_gates and "APPROXIMATION" not in default.summary()

    ident = export_onnx(model, tmp_path / "i.onnx", static_gates=True)
    assert not ident.float_quantizers and sorted(ident.static_gates) == gated
    assert all(v == [1.0, 1.0] for v in ident.static_gates.values())
    assert ident.fusable_convs == ["body.0.body.2", "body.1.body.2"]
    assert sum(v for k, v in ident.optimized_ops.items() if k.endswith("QLinearConv")) == 2
    assert "GlobalAveragePool" not in ident.node_counts and "APPROXIMATION" in ident.summary()
    static_model = _tiny(DDTBConfig(bits=4, dynamic_ratio=1.0))
    set_gates_applied(static_model, False)
    sess = ort.InferenceSession(ident.path, providers=["CPUExecutionProvider"])
    from lowbitsr.deploy.onnx_export import parity

    assert min(p["psnr"] for p in parity(static_model, sess, [_lr(1, 16, 18).numpy()])) >= 40.0

    batches = [_lr(2, 20, 20, seed=s) for s in range(2)]
    means = mean_gate_multipliers(model, batches)
    assert sorted(means) == gated
    assert all(0.0 < m < 2.0 for pair in means.values() for m in pair)
    mean = export_onnx(model, tmp_path / "m.onnx", static_gates=means)
    assert {k: tuple(v) for k, v in mean.static_gates.items()} == means
    shifted = _tiny(DDTBConfig(bits=4, dynamic_ratio=1.0))
    set_gates_applied(shifted, False)
    with torch.no_grad():
        for name, q in shifted.named_modules():
            if name in means:
                q.upper.copy_(torch.tensor([means[name][0]], dtype=torch.float32) * q.upper)
                q.lower.copy_(torch.tensor([means[name][1]], dtype=torch.float32) * q.lower)
    sess = ort.InferenceSession(mean.path, providers=["CPUExecutionProvider"])
    assert min(p["psnr"] for p in parity(shifted, sess, [_lr(1, 16, 18).numpy()])) >= 40.0
    meta = {p.key: p.value for p in onnx.load(mean.path).metadata_props}
    assert json.loads(meta["lowbitsr.export"])["static_gates"].keys() == set(gated)


def test_onnx_export_option_errors(tmp_path: Path) -> None:
    from lowbitsr.deploy.onnx_export import ExportError

    model = _tiny(DDTBConfig(bits=2, dynamic_ratio=0.5))
    for kw in (
        {"float_conv_weights": "int4"},
        {"pixel_shuffle": "nearest"},
        {"static_gates": "yes"},
        {"act_container": "int16"},
    ):
        with pytest.raises(ExportError):
            export_onnx(model, tmp_path / "x.onnx", check=False, **kw)


def test_cli_export_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbitsr.checkpoint import save_model
    from lowbitsr.cli import main

    model = _tiny(DDTBConfig(bits=4, dynamic_ratio=0.5))
    save_model(model, tmp_path / "q")
    out = tmp_path / "q.onnx"
    args = ["export", str(tmp_path / "q"), "--onnx", str(out), "--check"]
    assert main([*args, "--static-gates", "identity", "--float-conv-weights", "codes"]) == 0
    text = capsys.readouterr().out
    assert "APPROXIMATION" in text and "QLinearConv" in text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    opts = json.loads(meta["lowbitsr.export"])
    assert opts["float_conv_weights"] == "codes" and opts["static_gates"]
    assert main([*args, "--pixel-shuffle", "depth_to_space"]) == 0
    assert "APPROXIMATION" not in capsys.readouterr().out
    assert "DepthToSpace" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_onnx_export_of_packed_model(tmp_path: Path) -> None:
    model = _tiny(DDTBConfig(bits=2, dynamic_ratio=0.5))
    save_packed(model, tmp_path / "m")
    loaded = load_packed(tmp_path / "m")
    a = export_onnx(model, tmp_path / "a.onnx", check=False)
    b = export_onnx(loaded, tmp_path / "b.onnx", check=False)
    pa = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(a.path).graph.initializer}
    pb = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(b.path).graph.initializer}
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_qcdq_code_flips_are_rare_and_one_step() -> None:
    """ONNX computes round(x / fl(1/s)), PyTorch round(fl(s*x) - zp): codes agree except within
    a few ulps of a rounding tie, and then by exactly one step."""
    q = DDTBActQuant(4, 8)
    with torch.no_grad():
        q.lower.fill_(-3.7)
        q.upper.fill_(11.3)
    g = _Graph(17, "uint8")
    out, qp = _act(g, "x", q, "q")
    assert qp is not None
    graph = onnx.helper.make_graph(
        g.nodes,
        "q",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [None])],
        initializer=g.inits,
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-6, 14, 200_000).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    ref = asym_fake_quant(
        torch.from_numpy(x), q.lower.detach(), q.upper.detach(), 4, clamp_codes=True
    )
    diff = np.abs(got - ref.numpy())
    step = (11.3 + 3.7) / 15
    flips = diff > 1e-3 * step
    assert flips.mean() < 1e-3
    assert np.allclose(diff[flips], step, rtol=1e-4)
    assert diff[~flips].max() <= 1e-5 * 12


# ------------------------------------------------------------------------------------- runtime
@pytest.mark.parametrize("cfg", [None, DDTBConfig(bits=4, dynamic_ratio=0.0)], ids=["fp", "ddtb4"])
def test_tiled_onnx_upscale_equals_whole(cfg, tmp_path: Path) -> None:
    model = _tiny(cfg)
    export_onnx(model, tmp_path / "m.onnx", check=False)
    sr = OnnxSR(tmp_path / "m.onnx", threads=1)
    assert sr.scale == 2 and sr.rgb_range == 255.0
    img = (np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8)
    whole = upscale_image_onnx(sr, img)
    # Receptive field of this 2-block EDSR: < 8 LR pixels, so overlap 8 covers it.
    tiled = upscale_image_onnx(sr, img, tile=16, overlap=8)
    assert whole.shape == tiled.shape == (74, 90, 3) and tiled.dtype == np.uint8
    d = np.abs(whole.astype(int) - tiled.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3
    # Same contract as the PyTorch path (within the quantizers' tie flips).
    ref = upscale_image(model, img, 2)
    assert np.abs(whole.astype(int) - ref.astype(int)).max() <= (0 if cfg is None else 2)
    # A raw InferenceSession and a batch call also work.
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(upscale_image_onnx(sess, img, 2, tile=16, overlap=8), tiled)
    batch = sr(np.zeros((2, 3, 5, 7), np.float32))
    assert batch.shape == (2, 3, 10, 14) and batch.dtype == np.float32
    # Without onnxruntime's memory arena: the same numbers.
    lean = OnnxSR(tmp_path / "m.onnx", threads=1, mem_arena=False)
    assert np.array_equal(upscale_image_onnx(lean, img), whole)
    with pytest.raises(ValueError, match="Granular-DQ"):
        sr(np.zeros((1, 3, 5, 7), np.float32), bits=4)


@pytest.mark.parametrize("arch", ["srresnet", "rdn"])
def test_other_archs_float_export(arch: str, tmp_path: Path) -> None:
    report = export_onnx(_tiny(None, arch), tmp_path / "m.onnx")
    assert max(p["max_abs_diff"] for p in report.parity) < 1e-2


# ------------------------------------------------------------------------------------- Granular-DQ
def _gdq_lr(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth LR patches of varied brightness and texture (so GBC/E2B decisions differ)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    img = img * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    noise = torch.randn(n, 3, size, size, generator=gen) * torch.linspace(1, 30, n).view(n, 1, 1, 1)
    return (img * 255 + noise).clamp(0, 255)


def _gdq_tiny(arch: str = "edsr", **cfg: object) -> nn.Module:
    from lowbitsr.quant.granular_dq import (
        GranularDQConfig,
        calibrate_granular_dq,
        quantize_granular_dq,
    )

    torch.manual_seed(0)
    if arch == "edsr":
        m = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
    elif arch == "rdn":
        m = create_model("rdn", scale=2, G0=16, D=2, C=2, G=8)
    else:
        m = create_model("srresnet", scale=2, n_resblocks=2, n_feats=16)
    cfg.setdefault("entropy_thresholds", (2.8, 3.18))
    q = quantize_granular_dq(m, GranularDQConfig(**cfg))  # type: ignore[arg-type]
    calibrate_granular_dq(q, _gdq_lr(4, 16, seed=1))
    return q.eval()


@pytest.mark.parametrize(
    ("arch", "cfg"),
    [
        ("edsr", {}),
        ("srresnet", {}),
        ("rdn", {}),
        ("edsr", {"gate": "fixed", "fixed_bits": 6}),
        ("edsr", {"gate": "random"}),
    ],
    ids=["edsr", "srresnet", "rdn", "edsr-fixed", "edsr-random"],
)
def test_onnx_granular_dq_export(arch: str, cfg: dict, tmp_path: Path) -> None:
    """Per-sample bits in one batch: float-op quantizers gather each sample's step; the bits
    are decided in the graph (learned/fixed gates) or given (random gate)."""
    model = _gdq_tiny(arch, **cfg)
    inputs = [_gdq_lr(6, 16, seed=3).numpy(), _gdq_lr(3, 13, seed=4).numpy()]
    report = export_onnx(model, tmp_path / "g.onnx", check_inputs=inputs)
    assert report.granular_dq["candidates"] == [4, 5, 6, 8]
    in_graph = cfg.get("gate", "learned") != "random"
    assert report.granular_dq["decision"].startswith("not in the graph") != in_graph
    for p in report.parity:
        assert p["psnr"] >= 60.0, report.parity
        assert p["bits"] == p["bits_torch"]
    if not cfg:
        assert len(set(report.parity[0]["bits"])) > 1, "the check should mix bit-widths"
    n_quant = sum(1 for m in model.modules() if type(m).__name__ == "GDQActQuantizer")
    assert len(report.float_quantizers) == n_quant > 0
    sess = OnnxSR(report.path)
    assert sess.granular_dq and [i.name for i in sess.session.get_inputs()] == ["lr", "bits"]
    # Forced bits (one per sample) equal PyTorch under force_bits.
    x = inputs[0][:4]
    bits = np.array([4, 8, 5, 6], np.int64)
    out = sess(x, bits)
    assert sess.last_bits is not None and sess.last_bits.tolist() == bits.tolist()
    with torch.no_grad(), model.force_bits(torch.from_numpy(bits)):
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref).max() < 1e-2


def test_onnx_granular_dq_tiled(tmp_path: Path) -> None:
    from lowbitsr.deploy.runtime import upscale_image_gdq_onnx
    from lowbitsr.quant.granular_dq import gdq_super_resolve

    model = _gdq_tiny("edsr")
    export_onnx(model, tmp_path / "g.onnx", check=False)
    sess = OnnxSR(tmp_path / "g.onnx", threads=1)
    # A 3x3 mosaic of patches that get different bit-widths, tiled into exactly those patches.
    patches = _gdq_lr(9, 16, seed=3).round().to(torch.uint8)
    mosaic = torch.cat([torch.cat(list(patches[r * 3 : r * 3 + 3]), dim=2) for r in range(3)], 1)
    img = mosaic.permute(1, 2, 0).numpy().copy()
    sr, bit_map = upscale_image_gdq_onnx(sess, img, tile=16, step=16, max_batch=4)
    lr = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        ref, ref_bits = gdq_super_resolve(model, lr, 2, 16, 16)
    ref8 = ref[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert sr.shape == ref8.shape == (96, 96, 3) and bit_map.shape == tuple(ref_bits.shape)
    assert np.array_equal(bit_map, ref_bits.numpy()) and len(np.unique(bit_map)) > 1
    # Forced bits are used as given.
    forced = np.full((3, 3), 8, np.int64)
    _, used = upscale_image_gdq_onnx(sess, img, tile=16, step=16, bits=forced)
    assert np.array_equal(used, forced)
    d = np.abs(sr.astype(int) - ref8.astype(int))
    assert d.max() <= 2 and (d > 0).mean() < 1e-3
    with pytest.raises(ValueError, match="Granular-DQ"):
        upscale_image_gdq_onnx(OnnxSR(export_onnx(_tiny(None), tmp_path / "f.onnx").path), img)
