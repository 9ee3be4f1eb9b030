"""The integer layout (``layout: integer``): quantizer positions, configs, round trips, and its
ONNX export running every body and upsampler conv on onnxruntime's integer kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from conftest import float_model, lr_batches
from lowbitsr.checkpoint import load_model, save_model
from lowbitsr.errors import ConfigError, LowbitsrError
from lowbitsr.models import create_model
from lowbitsr.quant.apply import config_from_dict, dequantize, quantize, quantizers
from lowbitsr.quant.bitops import count_bitops
from lowbitsr.quant.calibrate import calibrate
from lowbitsr.quant.layers import DDTBActQuant, QuantConv2d, QuantInputConv, QuantResBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def edsr(scale: int = 4, blocks: int = 2, feats: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return create_model("edsr_baseline", scale=scale, n_resblocks=blocks, n_feats=feats).eval()


def integer_model(method: str, bits: int, scale: int = 4) -> nn.Module:
    cfg = config_from_dict({"method": method, "bits": bits, "layout": "integer"})
    q = quantize(edsr(scale), cfg)
    calibrate(q, lr_batches(n=4, size=16))
    return q.eval()


def conv_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The input of every conv of ``model`` on ``x`` (forward pre-hooks)."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=name: seen.__setitem__(n, a[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and "mean" not in name
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def n_levels(t: Tensor) -> int:
    return int(torch.unique(t).numel())


# ------------------------------------------------------------------------------------- configs
def test_layout_config_validation() -> None:
    assert config_from_dict({"method": "ddtb"}).layout == "paper"
    with pytest.raises(ConfigError, match=r"quant\.layout"):
        config_from_dict({"method": "ddtb", "layout": "int"})
    with pytest.raises(ConfigError, match="upsampler_bits"):
        config_from_dict({"method": "pams", "layout": "integer", "upsampler_bits": 9})
    with pytest.raises(ConfigError, match="dynamic_ratio"):
        config_from_dict({"method": "ddtb", "layout": "integer", "dynamic_ratio": 0.3})
    with pytest.raises(ConfigError, match="compat"):
        config_from_dict({"method": "ddtb", "layout": "integer", "compat": "official"})
    for arch in ("rdn", "srresnet"):
        with pytest.raises(ConfigError, match="EDSR only"):
            quantize(float_model(arch), config_from_dict({"method": "ddtb", "layout": "integer"}))


# ----------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("method", ["ddtb", "pams"])
@pytest.mark.parametrize("bits", [2, 4])
def test_every_body_and_upsampler_conv_reads_quantized_codes(method: str, bits: int) -> None:
    q = integer_model(method, bits)
    x = lr_batches(n=1, batch=1, size=16, seed=7)[0]
    ins = conv_inputs(q, x)
    k_levels = 2**bits
    for i in range(2):
        for j in (0, 2):  # conv1 reads the quantized block input, conv2 the quantized ReLU
            assert n_levels(ins[f"body.{i}.body.{j}"]) <= k_levels, (i, j)
    for name in ("tail.0.0.conv", "tail.0.2.conv", "tail.1.conv"):
        assert 2**bits < n_levels(ins[name]) <= 256, name
    assert n_levels(ins["head.0"]) > 256  # the image, float
    # the last body conv reads the last block's output, a sum of two k-bit streams (float conv)
    assert n_levels(ins["body.2"]) <= k_levels**2
    # no gates in this layout, even where the paper layout would attach them
    assert all(getattr(m, "gate", None) is None for _, m in quantizers(q))
    # upsampler weights: symmetric 8-bit codes
    w = q.tail[0][0].conv.quantized_weight()
    assert n_levels(w) <= 255


def test_paper_layout_conv1_still_reads_float_input() -> None:
    q = quantize(edsr(), config_from_dict({"method": "ddtb", "bits": 2}))
    calibrate(q, lr_batches(n=4, size=16))
    ins = conv_inputs(q.eval(), lr_batches(n=1, batch=1, size=16, seed=7)[0])
    assert n_levels(ins["body.0.body.0"]) > 64
    assert not any(isinstance(m, QuantInputConv) for m in q.modules())


def test_integer_layout_changes_the_output_and_counts_fewer_bitops() -> None:
    x = lr_batches(n=1, batch=1, size=16, seed=3)[0]
    paper = quantize(edsr(), config_from_dict({"method": "ddtb", "bits": 4, "dynamic_ratio": 0}))
    calibrate(paper, lr_batches(n=4, size=16))
    integer = integer_model("ddtb", 4)
    with torch.no_grad():
        assert not torch.equal(paper.eval()(x), integer(x))
    b_paper = count_bitops(paper, (1, 3, 16, 16))["bitops"]
    b_int = count_bitops(integer, (1, 3, 16, 16))["bitops"]
    assert b_int < 0.5 * b_paper  # conv1 and the upsampler no longer count 32-bit operands


def test_save_load_and_dequantize_round_trip(tmp_path: Path) -> None:
    q = integer_model("ddtb", 2)
    x = lr_batches(n=1, batch=2, size=16, seed=5)[0]
    path = save_model(q, tmp_path / "int")
    back = load_model(path).eval()
    assert back.quant_config_dict["layout"] == "integer"
    assert sum(isinstance(m, QuantResBlock) and m.integer for m in back.modules()) == 2
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    f = dequantize(q)
    ref = edsr()
    with torch.no_grad():
        assert torch.equal(f(x), ref(x))
    assert not any(isinstance(m, (DDTBActQuant, QuantInputConv)) for m in f.modules())


# -------------------------------------------------------------------------------------- export
def _check_inputs() -> list:
    return [b.numpy() for b in lr_batches(n=2, batch=1, size=20, seed=9)]


@pytest.mark.parametrize(("method", "bits"), [("ddtb", 4), ("ddtb", 2), ("pams", 4)])
def test_export_runs_every_quantized_conv_as_qlinearconv(
    tmp_path: Path, method: str, bits: int
) -> None:
    from lowbitsr.deploy import export_onnx

    q = integer_model(method, bits)
    r = export_onnx(q, tmp_path / "m.onnx", check_inputs=_check_inputs())
    ops = {k.split(":")[-1]: v for k, v in r.optimized_ops.items()}
    n_quantized = sum(isinstance(m, QuantConv2d) for m in q.modules())
    assert n_quantized == 2 * 2 + 3  # two blocks, two upsampler convs, the tail conv
    # a quantized conv that fell back to float would lower this count
    assert ops.get("QLinearConv", 0) == n_quantized
    assert ops.get("QLinearAdd", 0) == 1  # block 0's output, quantized by block 1's input
    # float convs: the mean shifts, the head and the last body conv only
    assert ops.get("Conv", 0) == 4
    assert "ReLU" not in ops and "Relu" not in ops  # folded into the quantizers' Clip
    assert min(p["psnr"] for p in r.parity) >= 40.0


def test_export_paper_layout_keeps_conv1_and_upsampler_float(tmp_path: Path) -> None:
    from lowbitsr.deploy import export_onnx

    q = quantize(edsr(), config_from_dict({"method": "ddtb", "bits": 4, "dynamic_ratio": 0}))
    calibrate(q, lr_batches(n=4, size=16))
    r = export_onnx(q.eval(), tmp_path / "m.onnx", check_inputs=_check_inputs())
    ops = {k.split(":")[-1]: v for k, v in r.optimized_ops.items()}
    assert ops.get("QLinearConv", 0) == 2  # conv2 of each block only
    assert "QLinearAdd" not in ops


def test_openvino_and_torch_int8_backends_match_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from lowbitsr.deploy import export_onnx
    from lowbitsr.deploy.openvino_rt import OpenVinoSR
    from lowbitsr.deploy.torch_int8 import torch_int8_parity

    q = integer_model("ddtb", 4)
    xs = _check_inputs()
    r = export_onnx(q, tmp_path / "m.onnx", check_inputs=xs, target="openvino")
    runtimes = [p.get("runtime", "onnxruntime") for p in r.parity]
    assert runtimes.count("openvino") == len(xs) and runtimes.count("onnxruntime") == len(xs)
    assert min(p["psnr"] for p in r.parity) >= 40.0
    # OpenVINO as close to PyTorch as onnxruntime: without the no-op Min before each block's
    # skip Add, its CPU plugin fused conv2 -> QA3 -> Add -> QA1 and dropped QA3's rounding
    # (57 dB here instead of 68-71)
    ort_p = [p["psnr"] for p in r.parity if p.get("runtime", "onnxruntime") == "onnxruntime"]
    ov_p = [p["psnr"] for p in r.parity if p.get("runtime") == "openvino"]
    assert all(v >= o - 1.0 for v, o in zip(ov_p, ort_p, strict=True)), (ov_p, ort_p)
    import onnx

    def mins(path: Path) -> int:
        return sum(n.op_type == "Min" for n in onnx.load(str(path)).graph.node)

    assert mins(tmp_path / "m.onnx") == 2  # one per residual block, OpenVINO target only
    export_onnx(q, tmp_path / "m_ort.onnx")
    assert mins(tmp_path / "m_ort.onnx") == 0
    assert all(p["psnr"] >= 60.0 for p in torch_int8_parity(q, xs))
    ov = OpenVinoSR(tmp_path / "m.onnx", threads=1)
    assert ov.scale == 4 and ov.quant["layout"] == "integer"
    assert ov(xs[0]).shape == (1, 3, 80, 80)


def test_torch_int8_refuses_the_paper_layout() -> None:
    from lowbitsr.deploy.torch_int8 import to_torch_int8

    q = quantize(edsr(), config_from_dict({"method": "pams", "bits": 4}))
    calibrate(q, lr_batches(n=2, size=16))
    with pytest.raises(LowbitsrError, match="integer layout"):
        to_torch_int8(q)


def test_cli_upscale_backends_agree(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    import numpy as np
    from PIL import Image

    from lowbitsr.cli import main

    save_model(integer_model("ddtb", 4), tmp_path / "int")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    model = str(tmp_path / "int")
    onnx = str(tmp_path / "int.onnx")
    assert main(["export", model, "--onnx", onnx, "--target", "openvino", "--check"]) == 0
    runs = {
        "torch": [model],
        "torch-int8": [model],
        "onnx": [onnx],
        "openvino": [onnx],
    }
    outs = {}
    for backend, (m,) in runs.items():
        out = tmp_path / f"{backend}.png"
        assert main(["upscale", m, str(tmp_path / "in.png"), str(out), "--backend", backend]) == 0
        outs[backend] = np.asarray(Image.open(out)).astype(np.int16)
    for backend, img in outs.items():
        assert img.shape == (80, 96, 3)
        assert np.abs(img - outs["torch"]).max() <= 3, backend


def test_stream_bits_widens_only_the_residual_stream() -> None:
    with pytest.raises(ConfigError, match="stream_bits"):
        config_from_dict({"method": "ddtb", "bits": 4, "stream_bits": 8})  # paper layout
    with pytest.raises(ConfigError, match="stream_bits"):
        config_from_dict({"method": "pams", "layout": "integer", "stream_bits": 1})
    cfg = config_from_dict({"method": "ddtb", "bits": 2, "layout": "integer", "stream_bits": 8})
    q = quantize(edsr(), cfg)
    calibrate(q, lr_batches(n=4, size=16))
    ins = conv_inputs(q.eval(), lr_batches(n=1, batch=1, size=16, seed=7)[0])
    assert 4 < n_levels(ins["body.0.body.0"]) <= 256  # conv1 reads the 8-bit stream
    assert n_levels(ins["body.0.body.2"]) <= 4  # conv2 still reads 2-bit codes
    assert q.body[0].quant_act1.bits == 8 and q.body[0].body[0].a_bits == 8


def test_gated_paper_layout_exports_for_openvino(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from lowbitsr.deploy import export_onnx
    from lowbitsr.quant.apply import set_gates_applied

    q = quantize(edsr(), config_from_dict({"method": "ddtb", "bits": 4}))
    calibrate(q, lr_batches(n=4, size=16))
    set_gates_applied(q, True)
    assert any(m.gate is not None for _, m in quantizers(q))
    r = export_onnx(q.eval(), tmp_path / "g.onnx", check_inputs=_check_inputs(), target="openvino")
    ov = [p for p in r.parity if p.get("runtime") == "openvino"]
    assert len(ov) == 2 and min(p["psnr"] for p in r.parity) >= 40.0


def test_fab_counts_the_8_bit_stream() -> None:
    from lowbitsr.evaluate import static_bits

    cfg = {"method": "ddtb", "bits": 4, "layout": "integer"}
    assert static_bits(quantize(edsr(), config_from_dict(cfg))) == 4.0
    wide = quantize(edsr(), config_from_dict({**cfg, "stream_bits": 8}))
    assert static_bits(wide) == 6.0
