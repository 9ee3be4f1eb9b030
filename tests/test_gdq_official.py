"""Granular-DQ ``compat="official"``: bit-for-bit the released code's arithmetic (issue #11).

Each reference below is an independent re-implementation of what the authors' code computes
(CPU, float32): the threshold look-up from the ``Decimal`` of the level's Python float, the
per-patch ATC recurrence on float32 tensors, and the LSQ step ``(a - a*s).detach() + a*s`` with
``s = 1 / math.sqrt(numel * Qp)`` a Python float.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbitsr.quant import gdq_layers
from lowbitsr.quant.functional import lsq_fake_quant, quantsr_round
from lowbitsr.quant.gdq_layers import (
    BitContext,
    EntropyToBit,
    GDQActQuantizer,
    GDQConv2d,
    GranularBitController,
)

CANDIDATES = (4, 5, 6, 8)
E2B_BITS = (4, 5, 8)
#: A synthetic training-entropy quantile curve on linspace(0, 1, 201) (0.5 % steps).
CURVE = torch.linspace(1.9, 3.5, 201)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------ released references
def _released_index(ratio: float, points: int = 201) -> int:
    """Grid index of the table entry the released E2B reads for the level ``ratio``.

    Released: ``Decimal(str(ratio)).quantize(Decimal('0.5'), ROUND_HALF_UP)`` (one decimal),
    clamped to ``[0.05, 1]``, then the key ``"{:.1f}".format(level * 100)`` (a 0.5 % grid).
    """
    level = Decimal(str(ratio)).quantize(Decimal("0.5"), rounding=ROUND_HALF_UP)
    level = max(min(level, Decimal(1)), Decimal("0.05"))
    key = f"{level * 100:.1f}"
    return int(Decimal(key) * (points - 1) / 100)


def _released_bucket(h: Tensor, r1: float, r2: float) -> int:
    """Released decision for one 8-bit patch of entropy ``h`` (float32 0-dim) -> 0/1/2."""
    t1, t2 = CURVE[_released_index(r1)], CURVE[_released_index(r2)]
    if bool(h > t2):
        return 2
    return 0 if bool(h <= t1) else 1


def _f32(v: float) -> float:
    return float(np.float32(v))


def _near_half_tenths() -> list[float]:
    """float32 levels at and a few ulps around every ``.x5`` boundary (and at ``x.x0``)."""
    out = []
    for k in range(10):
        b = np.float32((2 * k + 1) / 20)
        for steps in range(-3, 4):
            v = b
            for _ in range(abs(steps)):
                v = np.nextafter(v, np.float32(np.sign(steps)), dtype=np.float32)
            out.append(float(v))
        out.append(_f32(k / 10))
    return out


@pytest.fixture
def fixed_entropy(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """Make E2B see given entropies: push ``[N]`` float32 tensors, one per forward."""
    queue: list[Tensor] = []

    def fake(lr: Tensor, *, official: bool = False) -> Tensor:
        h = queue.pop(0)
        assert h.shape == (lr.shape[0],)
        return h

    monkeypatch.setattr(gdq_layers, "patch_entropy", fake)
    return queue


# ----------------------------------------------------------------------- 1. E2B level rounding
def test_official_e2b_lookup_rounds_the_exact_level_half_up() -> None:
    levels = _near_half_tenths()
    wrong = []
    for v1, v2 in zip(levels[0::2], levels[1::2], strict=True):
        e2b = EntropyToBit((v1, v2), official=True)
        e2b.set_curve(CURVE, keep_thresholds=False)
        want = [CURVE[_released_index(v)].item() for v in (v1, v2)]
        got = e2b.thresholds.tolist()
        wrong += [(v, g, w) for v, g, w in zip((v1, v2), got, want, strict=True) if g != w]
    assert not wrong, f"{len(wrong)} of {len(levels)} look-ups differ, e.g. {wrong[:4]}"
    # float32 0.95 is 0.949999988...: level 0.9, not the top of the curve
    e2b = EntropyToBit((0.45, 0.95), official=True)
    e2b.set_curve(CURVE, keep_thresholds=False)
    assert _released_index(_f32(0.95)) == 180
    assert e2b.thresholds.tolist() == [CURVE[80].item(), CURVE[180].item()]
    # a level k/10 reads its table entry exactly, also on a curve with large steps
    rough = torch.cumsum(torch.rand(201, generator=torch.Generator().manual_seed(0)), 0)
    for k in range(1, 11):
        e2b = EntropyToBit((k / 10, k / 10), official=True)
        e2b.set_curve(rough, keep_thresholds=False)
        assert e2b.thresholds.tolist() == [rough[20 * k].item()] * 2, k


def test_official_e2b_ratios_045_085_give_5_bits_at_entropy_268306(
    fixed_entropy: list[Tensor],
) -> None:
    h = torch.tensor([2.68306])
    assert _released_bucket(h[0], _f32(0.45), _f32(0.85)) == 1  # 5 bits in the released code
    e2b = EntropyToBit((0.45, 0.85), official=True)
    e2b.set_curve(CURVE, keep_thresholds=False)
    # through the whole controller: a GBC choice of 8 bits, then E2B
    ctl = GranularBitController(
        16,
        CANDIDATES,
        (4, 6, 8),
        E2B_BITS,
        gate="random",
        random_probs=(0.0, 0.0, 1.0),
        e2b=e2b,
        official=True,
    ).eval()
    ctx = BitContext(CANDIDATES)
    ctx.lr = torch.zeros(1, 3, 8, 8)
    fixed_entropy.append(h)
    ctl(torch.zeros(1, 16, 8, 8), ctx)
    assert ctx.bits is not None and ctx.bits.tolist() == [5]


# ------------------------------------------------------------------- 2. ATC: the recurrence
def test_official_atc_is_the_released_float32_recurrence_bit_for_bit(
    fixed_entropy: list[Tensor],
) -> None:
    steps, batch, gamma = 400, 16, 0.99997
    g = torch.Generator().manual_seed(0)
    hs = [1.0 + 2.45 * torch.rand(batch, generator=g) for _ in range(steps)]
    tops = [torch.rand(batch, generator=g) < 0.6 for _ in range(steps)]
    e2b = EntropyToBit((0.5, 0.9), gamma=gamma, official=True)
    e2b.set_curve(CURVE, keep_thresholds=False)
    lr = torch.zeros(batch, 3, 4, 4)
    got = []
    for h, top in zip(hs, tops, strict=True):
        fixed_entropy.append(h)
        got += e2b(lr, top, atc=True)[top].tolist()

    # released: per 8-bit patch, r <- r * decay + (1 - decay) * (H - 1.2) / 2.2 on float32
    # tensors, then the patch is judged with the thresholds of the updated ratios
    r1, r2 = torch.tensor([0.50]), torch.tensor([0.90])
    want = []
    for h, top in zip(hs, tops, strict=True):
        for i in range(batch):
            if top[i]:
                x = (h[i] - 1.2) / 2.2
                r1 = r1 * gamma + (1 - gamma) * x
                r2 = r2 * gamma + (1 - gamma) * x
                want.append(_released_bucket(h[i], r1.item(), r2.item()))
    ref = torch.cat([r1, r2])
    diff = (e2b.levels.double() - ref.double()).abs().max().item()
    assert torch.equal(e2b.levels, ref), f"levels {e2b.levels.tolist()} vs {ref.tolist()} ({diff})"
    assert got == want
    assert e2b.thresholds.tolist() == [CURVE[_released_index(r.item())].item() for r in (r1, r2)]


# --------------------------------------------------------------- 3. LSQ released grad_scale
def _released_alpha(a: Tensor, s: float) -> Tensor:
    """The released ``grad_scale(a, s)``: forward ``(a - a*s) + a*s``, gradient ``s``."""
    return (a - a * s).detach() + a * s


def _ulp_moving_alpha(a0: float, s: float, seed: int) -> float:
    """A step near ``a0`` whose released forward value is not the step itself (1 ulp off)."""
    g = torch.Generator().manual_seed(seed)
    c = a0 * (1 + 0.2 * torch.rand(200_000, generator=g))
    moved = torch.nonzero(_released_alpha(c, s) != c).flatten()
    assert moved.numel() > 0
    return float(c[moved[0]])


def _selection(sel: list[int]) -> BitContext:
    ctx = BitContext(CANDIDATES)
    cols = torch.tensor([CANDIDATES.index(b) for b in sel])
    ctx.set_selection(F.one_hot(cols, len(CANDIDATES)).float(), torch.tensor(CANDIDATES))
    return ctx


def test_official_activation_step_is_the_released_grad_scale_forward() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2
    bits = [4, 8, 6, 5]
    ctx = _selection(bits)
    mod = GDQActQuantizer(3, CANDIDATES, official=True).train()
    mod(x, ctx)  # lazy init (signed)
    numel = x.numel()
    with torch.no_grad():
        for j, b in enumerate(CANDIDATES):
            s = 1.0 / math.sqrt(numel * (2 ** (b - 1) - 1))
            mod.alpha[j] = _ulp_moving_alpha(float(mod.alpha[j]), s, seed=j)
    out = mod(x, ctx)
    out.square().sum().backward()

    alphas = mod.alpha.detach().clone().requires_grad_(True)
    ref = []
    for i, b in enumerate(bits):
        j = CANDIDATES.index(b)
        qn, qp = -(2 ** (b - 1)), 2 ** (b - 1) - 1
        a = _released_alpha(alphas[j : j + 1], 1.0 / math.sqrt(numel * qp))
        # (the released round_pass has the forward value of torch.round)
        ref.append(quantsr_round(torch.clamp(x[i : i + 1] / a, qn, qp)) * a)
    ref_out = torch.cat(ref)
    assert torch.equal(out.detach(), ref_out.detach()), (
        f"{int((out != ref_out).sum())} of {out.numel()} outputs differ, "
        f"max {(out - ref_out).abs().max().item():.3g}"
    )
    ref_out.square().sum().backward()
    torch.testing.assert_close(mod.alpha.grad, alphas.grad, rtol=1e-5, atol=0)


def test_official_activation_step_gradient_scale_is_the_python_double() -> None:
    # One sample, every value clipped: d out / d alpha' is an exact integer, so alpha's
    # gradient is one rounding of (that integer) * s and shows s itself.
    x = torch.tensor([[[[-1000.0, 1000.0], [1000.0, 1000.0]]]])
    numel, qp = x.numel(), 127
    s = 1.0 / math.sqrt(numel * qp)
    rsqrt = torch.rsqrt(torch.tensor(float(numel * qp))).item()
    assert rsqrt != float(np.float32(s))  # float32 rsqrt is one ulp off here
    ctx = _selection([8])
    mod = GDQActQuantizer(1, CANDIDATES, official=True).train()
    mod(x, ctx)  # lazy init (signed), then a step small enough for every value to clip
    with torch.no_grad():
        mod.alpha.fill_(1.0)
    mod(x, ctx).sum().backward()
    a = mod.alpha.detach()[3:4].clone().requires_grad_(True)
    a_s = _released_alpha(a, s)
    (torch.clamp(x / a_s, -128, 127).round().detach() * a_s).sum().backward()
    assert a.grad is not None and mod.alpha.grad is not None
    assert mod.alpha.grad[3].item() == a.grad.item() == _f32(_f32(-128 + 3 * 127) * _f32(s))


def test_official_weight_step_is_the_released_grad_scale_forward() -> None:
    torch.manual_seed(0)
    ctx = _selection([8, 5])
    conv = GDQConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), ctx, 8, official=True).train()
    x = torch.randn(2, 4, 6, 6)
    conv(x)  # activation lazy init
    s = 1.0 / math.sqrt(conv.weight.numel() * 127)
    with torch.no_grad():
        conv.w_alpha.fill_(_ulp_moving_alpha(float(conv.w_alpha), s, seed=7))
    out = conv(x)
    with torch.no_grad():
        a = _released_alpha(conv.w_alpha.detach(), s)
        wq = torch.round(torch.clamp(conv.weight / a, -128, 127)) * a
        want = conv._conv_forward(conv.act_quant(x, ctx), wq, conv.bias)
        assert torch.equal(out, want), f"max diff {(out - want).abs().max().item():.3g}"
        # the functional form, and the default form (alpha itself) unchanged
        w_off = lsq_fake_quant(conv.weight, conv.w_alpha, 8, True, official=True)
        assert torch.equal(w_off, wq)
        a0 = conv.w_alpha.detach()
        w_def = lsq_fake_quant(conv.weight, conv.w_alpha, 8, True)
        assert torch.equal(w_def, torch.round(torch.clamp(conv.weight / a0, -128, 127)) * a0)
