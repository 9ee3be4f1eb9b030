"""Deployment: bit-packed artifacts, ONNX export (float / QCDQ / gated), onnxruntime tiling."""

from __future__ import annotations

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
    # Quantized conv weights are int8 initializers holding k-bit codes: canonical codes for the
    # float convs (conv1), M-scaled zero-point-free grid indices for the integer convs (conv2).
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
    ops = {n.op_type for n in _nodes(report.path)}
    if gated:
        assert {"GlobalAveragePool", "Sigmoid", "Round", "Div"} <= ops


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


@pytest.mark.parametrize("arch", ["srresnet", "rdn"])
def test_other_archs_float_export(arch: str, tmp_path: Path) -> None:
    report = export_onnx(_tiny(None, arch), tmp_path / "m.onnx")
    assert max(p["max_abs_diff"] for p in report.parity) < 1e-2
