"""PAMS as a ``quantize(model, config)`` transform: positions, alpha init, levels, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from conftest import float_model, lr_batches
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
)
from lowbitsr.quant.calibrate import calibrate
from lowbitsr.quant.layers import PAMSActQuant, QuantConv2d
from lowbitsr.quant.pams import PAMSConfig

N_QUANT = {"edsr": 6, "rdn": 7, "srresnet": 4}
N_CONV = {"edsr": 4, "rdn": 7, "srresnet": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def pams_model(arch: str, bits: int = 2) -> nn.Module:
    q = quantize(float_model(arch), PAMSConfig(bits=bits))
    calibrate(q, lr_batches())
    return q


def test_config() -> None:
    cfg = PAMSConfig(bits=4, ema_decay=0.99)
    d = config_to_dict(cfg)
    assert d == {
        "method": "pams",
        "bits": 4,
        "ema_decay": 0.99,
        "compat": "default",
        "layout": "paper",
        "upsampler_bits": 8,
        "stream_bits": None,
    }
    assert config_from_dict(d) == cfg
    assert PAMSConfig().ema_decay == 0.9997  # PAMS's pams_quant_act decay
    with pytest.raises(ConfigError, match="bits"):
        PAMSConfig(bits=1)
    with pytest.raises(ConfigError, match="ema_decay"):
        PAMSConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="compat"):
        PAMSConfig(compat="official")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"quant\.dynamic_ratio"):
        config_from_dict({"method": "pams", "dynamic_ratio": 0.3})


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_structure_levels_and_shapes(arch: str, bits: int) -> None:
    fp = float_model(arch)
    q = pams_model(arch, bits)
    assert len(quantizers(q)) == N_QUANT[arch]
    assert all(isinstance(m, PAMSActQuant) and m.bits == bits for _, m in quantizers(q))
    convs = quantized_convs(q)
    assert len(convs) == N_CONV[arch]
    assert all(c.w_mode == "pams" and c.w_bits == bits for _, c in convs)
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == N_CONV[arch]  # GFF.1 FP
    assert set(fp.state_dict()) <= set(q.state_dict())

    outs: dict[str, Tensor] = {}
    for name, m in quantizers(q):
        m.register_forward_hook(lambda mod, a, out, name=name: outs.__setitem__(name, out))
    x = lr_batches(1, batch=3, seed=5)[0]
    with torch.no_grad():
        y = q(x)
    assert y.shape == fp(x).shape
    levels = 2**bits - 1  # symmetric: -q..q
    for name, out in outs.items():
        alpha = dict(quantizers(q))[name].alpha.detach()
        assert out.abs().max() <= alpha * (1 + 1e-6), name
        for sample in out:
            assert sample.unique().numel() <= levels, name
    for name, conv in convs:
        w = conv.quantized_weight()
        assert w.unique().numel() <= levels, name
        # symmetric max-abs grid: w = j * m / q with |j| <= q, m = max|w_float|
        qmax = 2 ** (bits - 1) - 1
        codes = w * qmax / (conv.weight.detach().abs().max() + 1e-8)
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4


def test_alpha_is_the_ema_of_mean_per_sample_max_abs() -> None:
    """EDSR's first quantizer sees the head output, so its alpha can be recomputed from the
    float model; later ones are checked against the inputs they saw during calibration."""
    fp = float_model("edsr")
    batches = lr_batches(3)
    decay = 0.9
    q = quantize(fp, PAMSConfig(bits=2, ema_decay=decay))
    seen: dict[str, list[Tensor]] = {n: [] for n, _ in quantizers(q)}
    for name, m in quantizers(q):
        m.register_forward_pre_hook(lambda mod, a, name=name: seen[name].append(a[0].clone()))
    summary = calibrate(q, batches)

    def ema(xs: list[Tensor]) -> Tensor:
        alpha = None
        for x in xs:
            m = x.abs().flatten(1).amax(1).mean()
            alpha = m if alpha is None else (1 - decay) * m + decay * alpha
        return alpha

    with torch.no_grad():
        heads = [fp.head(fp.sub_mean(b)) for b in batches]
    first = dict(quantizers(q))["body.0.quant_act1"]
    assert torch.allclose(first.alpha.detach(), ema(heads).reshape(1), rtol=1e-6)
    for name, m in quantizers(q):
        assert len(seen[name]) == 3
        assert torch.allclose(m.alpha.detach(), ema(seen[name]).reshape(1), rtol=1e-6), name
        assert summary["alpha"][name] == pytest.approx(float(m.alpha.detach()))
    # recalibrating restarts the EMA: same result
    again = calibrate(q, batches)
    assert again["alpha"] == summary["alpha"]


def test_calibration_quantizes_unclipped() -> None:
    m = PAMSActQuant(2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 1, 1, 2)  # per-sample max 2 and 4 -> alpha 3
    m.ema_mode = True
    with torch.no_grad():
        y = m(x)
    assert float(m.alpha.detach()) == 3.0
    assert float(y.max()) == 3.0 * round(4.0 / 3.0)  # not clipped to alpha (= 3) first
    m.ema_mode = False
    with torch.no_grad():
        assert float(m(x).max()) == 3.0


def test_gradients_teacher_and_helpers() -> None:
    teacher = float_model("edsr")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    q = quantize(teacher, PAMSConfig(bits=3))
    calibrate(q, lr_batches())
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    x = lr_batches(1, seed=8)[0]
    (q(x) - teacher(x).detach()).abs().mean().backward()
    alphas = bound_parameters(q)
    assert len(alphas) == 6 and all(a.grad is not None for a in alphas)
    assert sum(float(a.grad.abs().sum()) for a in alphas) > 0
    opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert gate_parameters(q) == []
    assert float(gate_regularizer(q)) == 0.0


@pytest.mark.parametrize("arch", ["edsr", "rdn", "srresnet"])
def test_save_load_round_trip_and_dequantize(arch: str, tmp_path: Path) -> None:
    q = pams_model(arch, 4)
    x = lr_batches(1, seed=3)[0]
    with torch.no_grad():
        ref = q.eval()(x)
    path = save_weights(q, tmp_path / "pams.safetensors")
    fresh = quantize(float_model(arch, seed=42), config_from_dict(q.quant_config_dict))
    load_weights(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)
    fp = float_model(arch)
    back = dequantize(quantize(fp, PAMSConfig()))
    with torch.no_grad():
        assert torch.equal(back(x), fp(x))


def test_print_shows_method_bits_and_alpha() -> None:
    q = pams_model("rdn", 4)
    text = str(q)
    alpha = float(dict(quantizers(q))["GFF.quant_act"].alpha.detach())
    assert "method=pams, bits=4" in text and f"alpha={alpha:.6g}" in text
    assert "w_bits=4, w_mode=pams" in text
