"""Tests of lowbitsr.quant.functional: hand-computed examples, grid properties, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lowbitsr.quant import functional as F

DTYPES = [torch.float32, torch.float64]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _n_levels(t: torch.Tensor) -> int:
    return torch.unique(t.detach()).numel()


# ---------------------------------------------------------------------------------------------
# round_ste / quantsr_round
# ---------------------------------------------------------------------------------------------


def test_round_ste_half_to_even_and_identity_grad() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 2.51], requires_grad=True)
    y = F.round_ste(x)
    assert y.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 3.0]
    go = torch.arange(1.0, 9.0)
    y.backward(go)
    assert torch.equal(x.grad, go)


def test_quantsr_round_factor_at_integers_and_half_integers() -> None:
    # Slope of (tanh(f - 0.5) / tanh(0.5)) / 2 + 0.5 is (1 - tanh(f - 0.5)^2) / (2 tanh(0.5)):
    # f = 0 -> (1 - 0.21356) / 0.92423 = 0.85092 ; f = 0.5 -> 1 / 0.92423 = 1.08198.
    at_int = (1 - math.tanh(-0.5) ** 2) / (2 * math.tanh(0.5))
    at_half = 1 / (2 * math.tanh(0.5))
    assert at_int == pytest.approx(0.8509, abs=1e-4)
    assert at_half == pytest.approx(1.0820, abs=1e-4)
    x = torch.tensor([0.0, 3.0, -2.0, 0.5, 2.5, -1.5], dtype=torch.float64, requires_grad=True)
    y = F.quantsr_round(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    expected = torch.tensor([at_int] * 3 + [at_half] * 3, dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


def test_quantsr_round_factor_is_periodic_for_negative_inputs() -> None:
    # frac must be v - floor(v) (QuantSR): at v = -0.2 frac = 0.8 and the factor is
    # (1 - tanh(0.3)^2) / (2 tanh 0.5) = 0.91514 / 0.92423 = 0.9902; torch.frac's -0.2 would
    # give (1 - tanh(-0.7)^2) / (2 tanh 0.5) = 0.63474 / 0.92423 = 0.6868.
    x = torch.tensor([-0.2, 0.8, -3.2], dtype=torch.float64, requires_grad=True)
    F.quantsr_round(x).sum().backward()
    expected = (1 - math.tanh(0.3) ** 2) / (2 * math.tanh(0.5))
    assert expected == pytest.approx(0.9902, abs=1e-4)
    torch.testing.assert_close(x.grad, torch.full_like(x, expected), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# DDTB asymmetric quantizer (§1.1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_hand_example_k2(dtype: torch.dtype) -> None:
    # k = 2, lower = -1.3, upper = 4.7: n = 3, R = 6, s = 3 / 6 = 0.5,
    # s * lower = -0.65 -> round -1 -> zp = -1 + 2 = 1.
    # q = round(0.5 * a - 1) with a in [-1.3, 4.7] -> 0.5a - 1 in [-1.65, 1.35] -> q in {-2..1};
    # out = (q + 1) / 0.5 = 2 (q + 1) in {-2, 0, 2, 4}: anchored at 0, and -2 lies 0.7 below
    # lower (less than half a step of 2).
    lower = torch.tensor([-1.3], dtype=dtype)
    upper = torch.tensor([4.7], dtype=dtype)
    s, zp = F.asym_quant_params(lower, upper, 2)
    assert s.tolist() == [0.5]
    assert zp.tolist() == [1.0]
    x = torch.linspace(-5, 8, 1001, dtype=dtype)
    out = F.asym_fake_quant(x, lower, upper, 2)
    assert sorted(torch.unique(out).tolist()) == [-2.0, 0.0, 2.0, 4.0]
    q = F.asym_quantize_codes(x, lower, upper, 2)
    assert sorted(torch.unique(q).tolist()) == [-2.0, -1.0, 0.0, 1.0]
    # A few by hand: 0.9 -> 0.45 - 1 = -0.55 -> -1 -> 0 ; 1.1 -> -0.45 -> 0 -> 2 ;
    # 3.1 -> 0.55 -> 1 -> 4 ; 1.0 -> -0.5 -> -0 (half to even) -> 2 ; -9 -> clip -1.3 -> -2.
    pts = torch.tensor([0.9, 1.1, 3.1, 1.0, -9.0, 9.0], dtype=dtype)
    assert F.asym_fake_quant(pts, lower, upper, 2).tolist() == [0.0, 2.0, 4.0, 2.0, -2.0, 4.0]


def _spec_asym(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, k: int) -> torch.Tensor:
    """docs/methods.md §1.1 written out line by line (forward only), as the official code does."""
    a = torch.max(torch.min(x, upper), lower)
    n = 2**k - 1
    s = n / (upper - lower)
    zp = torch.round(s * lower)
    zp = zp + 2 ** (k - 1)
    q = torch.round(s * a - zp)
    return (q + zp) / s


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_is_bit_exact_with_spec_order(bits: int, dtype: torch.dtype) -> None:
    gen = _gen(100 + bits)
    x = torch.randn(4, 3, 7, 7, generator=gen, dtype=dtype) * 3
    for shape in ((1,), (4, 1, 1, 1)):
        lower = -torch.rand(shape, generator=gen, dtype=dtype) * 2 - 0.01
        upper = torch.rand(shape, generator=gen, dtype=dtype) * 4 + 0.01
        assert torch.equal(
            F.asym_fake_quant(x, lower, upper, bits), _spec_asym(x, lower, upper, bits)
        )


def test_asym_scale_uses_python_int_over_tensor_arithmetic() -> None:
    # `3 / R` on a tensor is evaluated by torch as reciprocal(R) * 3, which is what the official
    # code computes; for R = 7 in float32 that is 0.42857146, while true division gives
    # 0.42857143. The scale must be the former for bit-exact checkpoints.
    lower, upper = torch.tensor([-3.0]), torch.tensor([4.0])
    s, _ = F.asym_quant_params(lower, upper, 2)
    assert torch.equal(s, torch.tensor([7.0]).reciprocal() * 3)
    assert not torch.equal(s, torch.div(torch.tensor([3.0]), torch.tensor([7.0])))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_levels_and_code_range(bits: int, dtype: torch.dtype) -> None:
    gen = _gen(bits)
    for _ in range(20):
        lower = -torch.rand(1, generator=gen, dtype=dtype) * 3
        upper = torch.rand(1, generator=gen, dtype=dtype) * 5 + 0.1
        x = torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype) * 3
        out = F.asym_fake_quant(x, lower, upper, bits)
        assert out.dtype == dtype and out.shape == x.shape
        assert _n_levels(out) <= 2**bits
        q = F.asym_quantize_codes(x, lower, upper, bits)
        assert torch.equal(q, torch.round(q))
        assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
        # Extreme levels stay within half a step of the bounds.
        s, _ = F.asym_quant_params(lower, upper, bits)
        assert out.min() >= lower - 0.5 / s - 1e-6 and out.max() <= upper + 0.5 / s + 1e-6
    # A dense sweep through the range hits all 2**k levels.
    dense = torch.linspace(-1.0, 2.0, 5000, dtype=dtype)
    lo, up = torch.tensor([-1.0], dtype=dtype), torch.tensor([2.0], dtype=dtype)
    assert _n_levels(F.asym_fake_quant(dense, lo, up, bits)) == 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_grid_points_are_fixed_points(bits: int, dtype: torch.dtype) -> None:
    lower = torch.tensor([-0.77], dtype=dtype)
    upper = torch.tensor([2.31], dtype=dtype)
    s, zp = F.asym_quant_params(lower, upper, bits)
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=dtype)
    grid = (codes + zp) / s
    inside = grid[(grid >= lower) & (grid <= upper)]
    assert inside.numel() >= 2**bits - 2
    out = F.asym_fake_quant(inside, lower, upper, bits)
    assert torch.equal(out, inside)
    # And quantizing twice changes nothing.
    x = torch.randn(500, generator=_gen(1), dtype=dtype)
    once = F.asym_fake_quant(x, lower, upper, bits)
    once_in = once[(once >= lower) & (once <= upper)]
    assert torch.equal(F.asym_fake_quant(once_in, lower, upper, bits), once_in)


@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_fake_is_codes_plus_zp_over_s(dtype: torch.dtype) -> None:
    gen = _gen(3)
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=dtype) * 2
    lower = torch.tensor([-1.1, -0.4, -2.0, -0.9], dtype=dtype).view(4, 1, 1, 1)
    upper = torch.tensor([0.8, 2.5, 1.3, 0.05], dtype=dtype).view(4, 1, 1, 1)
    for bits in (2, 3, 4):
        s, zp = F.asym_quant_params(lower, upper, bits)
        q = F.asym_quantize_codes(x, lower, upper, bits)
        assert torch.equal(F.asym_fake_quant(x, lower, upper, bits), (q + zp) / s)


def test_asym_per_sample_bounds_give_each_sample_its_own_grid() -> None:
    gen = _gen(4)
    x = torch.randn(3, 2, 6, 6, generator=gen) * 2
    lower = torch.tensor([-1.1, -0.2, -3.0]).view(3, 1, 1, 1)
    upper = torch.tensor([1.0, 4.0, 0.5]).view(3, 1, 1, 1)
    out = F.asym_fake_quant(x, lower, upper, 2)
    grids = []
    for i in range(3):
        alone = F.asym_fake_quant(x[i : i + 1], lower[i].view(1), upper[i].view(1), 2)
        assert torch.equal(out[i : i + 1], alone)
        grids.append(set(torch.unique(out[i]).tolist()))
        assert len(grids[-1]) <= 4
    assert grids[0] != grids[1] and grids[1] != grids[2]


def _asym_closed_form(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, go: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of docs/methods.md §1.1 (no exact ties): returns (dx, dlower, dupper)."""
    with torch.no_grad():
        a = torch.max(torch.min(x, upper), lower)
        out = F.asym_fake_quant(x, lower, upper, bits)
        r = upper - lower
        inside = ((x > lower) & (x < upper)).to(x.dtype)
        dx = go * inside
        dup = go * ((x > upper).to(x.dtype) - (a - out) / r)
        dlo = go * ((x < lower).to(x.dtype) + (a - out) / r)

        def reduce(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if like.numel() == 1:
                return t.sum().reshape(like.shape)
            return t.sum(dim=(1, 2, 3), keepdim=True)

        return dx, reduce(dlo, lower), reduce(dup, upper)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asym_gradients_match_closed_form(per_sample: bool, bits: int) -> None:
    gen = _gen(10 + bits)
    dtype = torch.float64
    x = (torch.randn(3, 2, 4, 4, generator=gen, dtype=dtype) * 2).requires_grad_()
    shape = (3, 1, 1, 1) if per_sample else (1,)
    lower = (-0.5 - torch.rand(shape, generator=gen, dtype=dtype)).requires_grad_()
    upper = (0.8 + torch.rand(shape, generator=gen, dtype=dtype)).requires_grad_()
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    out = F.asym_fake_quant(x, lower, upper, bits)
    out.backward(go)
    dx, dlo, dup = _asym_closed_form(x.detach(), lower.detach(), upper.detach(), bits, go)
    # Make sure the check is not vacuous: some inputs lie on each side of the bounds.
    assert (x > upper).any() and (x < lower).any()
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lower.grad, dlo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upper.grad, dup, rtol=1e-10, atol=1e-10)
    assert lower.grad.shape == lower.shape and upper.grad.shape == upper.shape


def test_asym_gradient_at_exact_ties_splits_half_half() -> None:
    dtype = torch.float64
    lower = torch.tensor([-1.0], dtype=dtype, requires_grad=True)
    upper = torch.tensor([2.0], dtype=dtype, requires_grad=True)
    x = torch.tensor([2.0, -1.0], dtype=dtype, requires_grad=True)
    out = F.asym_fake_quant(x, lower, upper, 2)
    # k = 2: s = 3 / 3 = 1, zp = round(-1) + 2 = 1; out(2) = round(2 - 1) + 1 = 2, out(-1) = -1;
    # a == out at both, so the (a - out) / R terms vanish and only the 0.5 tie shares remain.
    assert out.tolist() == [2.0, -1.0]
    out[0].backward(retain_graph=True)
    assert x.grad.tolist() == [0.5, 0.0]
    assert upper.grad.tolist() == [0.5] and lower.grad.tolist() == [0.0]
    x.grad = None
    upper.grad = None
    lower.grad = None
    out[1].backward()
    assert x.grad.tolist() == [0.0, 0.5]
    assert lower.grad.tolist() == [0.5] and upper.grad.tolist() == [0.0]


def test_asym_gradient_at_tie_off_grid() -> None:
    # x == upper where upper is not a grid point: d/dupper = 0.5 - (a - out) / R.
    dtype = torch.float64
    lower = torch.tensor([-1.0], dtype=dtype, requires_grad=True)
    upper = torch.tensor([2.2], dtype=dtype, requires_grad=True)
    x = torch.tensor([2.2], dtype=dtype, requires_grad=True)
    out = F.asym_fake_quant(x, lower, upper, 2)
    out.backward()
    r = 3.2
    expected = 0.5 - (2.2 - out.item()) / r
    assert x.grad.item() == 0.5
    assert upper.grad.item() == pytest.approx(expected, abs=1e-12)
    assert lower.grad.item() == pytest.approx((2.2 - out.item()) / r, abs=1e-12)


def test_asym_no_clip_passes_gradient_everywhere() -> None:
    x = torch.randn(50, generator=_gen(5), dtype=torch.float64).requires_grad_()
    lower = x.detach().min().reshape(1)
    upper = x.detach().max().reshape(1)
    F.asym_fake_quant(x, lower, upper, 3, clip=False).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=1e-12)


def test_asym_top_code_tie_corner_and_clamp_codes() -> None:
    # s * lower exactly 0.5 rounds down to 0 (half to even): k = 2, lower 0.5, upper 3.5 -> s = 1,
    # zp = 2, and x = upper gives 3.5 - 2 = 1.5 -> q = 2 = 2**(k-1), one code above the range.
    # The official formula does this; clamp_codes=True keeps the k-bit range.
    lower, upper = torch.tensor([0.5]), torch.tensor([3.5])
    x = torch.tensor([0.5, 1.0, 2.0, 3.0, 3.5])
    assert F.asym_quantize_codes(x, lower, upper, 2).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert F.asym_fake_quant(x, lower, upper, 2).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    q = F.asym_quantize_codes(x, lower, upper, 2, clamp_codes=True)
    assert q.tolist() == [-2.0, -1.0, 0.0, 1.0, 1.0]
    assert F.asym_fake_quant(x, lower, upper, 2, clamp_codes=True).tolist() == [0, 1, 2, 3, 3]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_asym_symmetric_bounds_hit_the_corner(bits: int, dtype: torch.dtype) -> None:
    # lower = -upper: s * lower = -(2^k - 1) / 2 = -2^(k-1) + 0.5, which rounds half to even to
    # -2^(k-1), so zp = 0 and s * upper = 2^(k-1) - 0.5 rounds up to 2^(k-1): 2^k + 1 levels.
    # This is the official ±10 init of 3/4-bit bounds.
    for b in (1.0, 10.0, 0.3):
        lower, upper = torch.tensor([-b], dtype=dtype), torch.tensor([b], dtype=dtype)
        x = torch.linspace(-2 * b, 2 * b, 2001, dtype=dtype)
        q = F.asym_quantize_codes(x, lower, upper, bits)
        assert q.max().item() == 2 ** (bits - 1)
        assert _n_levels(F.asym_fake_quant(x, lower, upper, bits)) == 2**bits + 1
        qc = F.asym_quantize_codes(x, lower, upper, bits, clamp_codes=True)
        assert qc.min().item() == -(2 ** (bits - 1)) and qc.max().item() == 2 ** (bits - 1) - 1
        outc = F.asym_fake_quant(x, lower, upper, bits, clamp_codes=True)
        assert _n_levels(outc) == 2**bits
        # Only the codes past the range move.
        assert torch.equal(qc[q < 2 ** (bits - 1)], q[q < 2 ** (bits - 1)])


@pytest.mark.parametrize("per_sample", [False, True])
def test_asym_clamp_codes_keeps_closed_form_gradients(per_sample: bool) -> None:
    # Symmetric bounds (the corner) plus inputs beyond them: the straight-through clamp leaves
    # the §1.1 gradients untouched, and off the corner clamp_codes changes nothing.
    dtype = torch.float64
    gen = _gen(50)
    x = (torch.randn(3, 2, 4, 4, generator=gen, dtype=dtype) * 2).requires_grad_()
    shape = (3, 1, 1, 1) if per_sample else (1,)
    upper = (0.5 + torch.rand(shape, generator=gen, dtype=dtype)).requires_grad_()
    lower = (-upper.detach()).clone().requires_grad_()
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    out = F.asym_fake_quant(x, lower, upper, 2, clamp_codes=True)
    out.backward(go)
    a = torch.max(torch.min(x.detach(), upper.detach()), lower.detach())
    r = upper.detach() - lower.detach()
    dims = (1, 2, 3) if per_sample else (0, 1, 2, 3)
    err = (a - out.detach()) / r
    d_up = (go * ((x.detach() > upper.detach()).to(dtype) - err)).sum(dim=dims, keepdim=True)
    d_lo = (go * ((x.detach() < lower.detach()).to(dtype) + err)).sum(dim=dims, keepdim=True)
    torch.testing.assert_close(upper.grad, d_up.reshape(shape), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lower.grad, d_lo.reshape(shape), rtol=1e-10, atol=1e-10)
    lo2, up2 = torch.tensor([-0.77], dtype=dtype), torch.tensor([2.31], dtype=dtype)
    xd = x.detach()
    assert torch.equal(
        F.asym_fake_quant(xd, lo2, up2, 3, clamp_codes=True), F.asym_fake_quant(xd, lo2, up2, 3)
    )


def test_bits_are_validated() -> None:
    x = torch.zeros(3)
    b = torch.tensor([1.0])
    with pytest.raises(ValueError, match="bits"):
        F.asym_fake_quant(x, -b, b, 0)
    with pytest.raises(ValueError, match="bits"):
        F.asym_fake_quant(x, -b, b, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        F.ternary_weight_quant(x, 1)
    with pytest.raises(ValueError, match="bits"):
        F.lsq_fake_quant(x, b, 1, signed=True)
    with pytest.raises(ValueError, match="mode"):
        F.ddtb_weight_quant(x, 2, mode="max")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# percentile_bounds (§1.2, §1.4)
# ---------------------------------------------------------------------------------------------


def test_percentile_bounds_match_spec_formula() -> None:
    gen = _gen(6)
    t = torch.randn(64, 16, 3, 3, generator=gen)
    lo, up = F.percentile_bounds(t, 1, 99)
    flat = t.double().flatten()
    assert lo.shape == (1,) and up.shape == (1,) and lo.dtype == torch.float32
    assert torch.equal(lo, torch.quantile(flat, 0.01).float().reshape(1))
    assert torch.equal(up, torch.quantile(flat, 0.99).float().reshape(1))
    # Hand example: 0..100, q = 1%, 99% -> rank 1 and 99 exactly; q = 2.5% -> rank 2.5 -> 2.5.
    r = torch.arange(101.0)
    assert F.percentile_bounds(r, 1, 99) == (torch.tensor([1.0]), torch.tensor([99.0]))
    assert F.percentile_bounds(r, 2.5, 2.5)[0].item() == 2.5


def test_percentile_bounds_do_not_track_gradient() -> None:
    t = torch.randn(100, generator=_gen(7), requires_grad=True)
    lo, up = F.percentile_bounds(t, 5, 95)
    assert not lo.requires_grad and not up.requires_grad


def test_percentile_bounds_validate_arguments() -> None:
    with pytest.raises(ValueError, match="q_low"):
        F.percentile_bounds(torch.randn(10), 99, 1)
    with pytest.raises(ValueError, match="empty"):
        F.percentile_bounds(torch.zeros(0), 1, 99)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 4096])
def test_selected_quantile_is_bit_identical_to_torch_quantile(n: int) -> None:
    gen = _gen(n)
    flat = torch.randn(n, generator=gen, dtype=torch.float64) * 10
    flat[: n // 3] = flat[0]  # duplicates
    qs = [0.0, 0.01, 0.05, 0.5, 0.95, 0.99, 1.0, *torch.rand(20, generator=gen).tolist()]
    for q in qs:
        assert torch.equal(F._quantile_select(flat, q), torch.quantile(flat, q)), q


def test_selected_quantile_propagates_nan_like_torch_quantile() -> None:
    flat = torch.tensor([1.0, float("nan"), 3.0, 2.0], dtype=torch.float64)
    assert torch.isnan(torch.quantile(flat, 0.1))
    assert torch.isnan(F._quantile_select(flat, 0.1))


def test_percentile_bounds_beyond_torch_quantile_size_limit() -> None:
    # One element over torch.quantile's limit (it raises "input tensor is too large" above
    # 2**24). Values are a permutation of 0..n-1 (scaled; 7919 is coprime to n = 97*257*673), so
    # the sorted order is known: rank q (n - 1) interpolates between its two neighbours.
    n = 2**24 + 1
    assert n - 1 == F._QUANTILE_MAX_NUMEL
    t = ((torch.arange(n) * 7919) % n).to(torch.float32) * 0.25
    lo, up = F.percentile_bounds(t, 1, 99.3)
    for got, q in ((lo, 0.01), (up, 0.993)):
        rank = q * (n - 1)
        below = math.floor(rank)
        expected = (below + (rank - below)) * 0.25
        assert got.item() == pytest.approx(expected, rel=1e-7)
        assert got.dtype == torch.float32 and got.shape == (1,)


# ---------------------------------------------------------------------------------------------
# ddtb_weight_quant (§1.2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ddtb_weight_percentile_mode(bits: int) -> None:
    w = (torch.randn(16, 8, 3, 3, generator=_gen(9)) * 0.05).requires_grad_()
    out = F.ddtb_weight_quant(w, bits, mode="percentile")
    lo, up = F.percentile_bounds(w, 1, 99)
    assert torch.equal(out, F.asym_fake_quant(w.detach(), lo, up, bits))
    assert _n_levels(out) <= 2**bits
    out.sum().backward()
    inside = ((w > lo) & (w < up)).float()
    # 1 up to rounding: the spec's (q + zp) / s order gives grad (1 / s) * s.
    torch.testing.assert_close(w.grad, inside, rtol=0, atol=1e-6)
    assert 0 < (1 - inside).sum() < 0.05 * w.numel()  # about 2% of weights are clipped


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ddtb_weight_minmax_mode_has_no_clip(bits: int) -> None:
    w = (torch.randn(8, 4, 3, 3, generator=_gen(11), dtype=torch.float64) * 0.1).requires_grad_()
    out = F.ddtb_weight_quant(w, bits, mode="minmax")
    lo, up = w.detach().min().reshape(1), w.detach().max().reshape(1)
    assert torch.equal(out, F.asym_fake_quant(w.detach(), lo, up, bits))
    assert _n_levels(out) <= 2**bits
    out.sum().backward()
    # Every element gets gradient 1, including the min and max themselves (no min/max op).
    torch.testing.assert_close(w.grad, torch.ones_like(w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["percentile", "minmax"])
def test_ddtb_weight_constant_tensor_is_returned_unchanged(mode: str) -> None:
    w = torch.full((4, 4, 3, 3), 0.3, requires_grad=True)
    out = F.ddtb_weight_quant(w, 2, mode=mode)  # type: ignore[arg-type]
    assert torch.equal(out, w.detach())
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


# ---------------------------------------------------------------------------------------------
# Symmetric max-abs weights: gate (§1.2) and PAMS (§1.8)
# ---------------------------------------------------------------------------------------------


def test_ternary_weight_hand_example() -> None:
    # m = 0.9 + 1e-8; w / m = [0.667, -0.222, 0.333, -1.0] -> round -> [1, 0, 0, -1] -> * m.
    w = torch.tensor([0.6, -0.2, 0.3, -0.9], dtype=torch.float64, requires_grad=True)
    out = F.ternary_weight_quant(w)
    m = 0.9 + 1e-8
    torch.testing.assert_close(out, torch.tensor([m, 0.0, 0.0, -m], dtype=torch.float64))
    go = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    out.backward(go)
    # Identity up to rounding: the spec's order gives go * (m / qmax) * (qmax / m).
    torch.testing.assert_close(w.grad, go, rtol=1e-15, atol=0)


def test_ternary_weight_exact_operation_order() -> None:
    w = torch.randn(32, 16, 1, 1, generator=_gen(12))
    m = w.abs().max() + 1e-8
    expected = torch.round(w * 1.0 / m) * m / 1.0
    out = F.ternary_weight_quant(w)
    assert torch.equal(out, expected)
    assert _n_levels(out) <= 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pams_weight_quant(bits: int) -> None:
    w = torch.randn(16, 8, 3, 3, generator=_gen(bits), dtype=torch.float64).requires_grad_()
    out = F.pams_weight_quant(w, bits)
    qmax = 2.0 ** (bits - 1) - 1
    m = w.detach().abs().max() + 1e-8
    assert torch.equal(out, torch.round(w.detach() * qmax / m) * m / qmax)
    assert _n_levels(out) <= 2**bits - 1
    # Symmetric: the grid is j * m / qmax, and the largest-magnitude weight maps to +-m.
    assert out.detach().abs().max().item() == pytest.approx(m.item(), rel=1e-12)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w), rtol=1e-15, atol=0)


def test_pams_weight_quant_operation_order() -> None:
    # A near-tie found by search: k = 3 (qmax 3), max|w| = 0.92231154. In float32
    # (w * 3) / m rounds to -3 but (w / m) * 3 rounds to -2, so this pins the official order.
    w = torch.tensor([0.922311544418335, -0.7685930132865906])
    m = w.abs().max() + 1e-8
    assert torch.round(w[1] * 3.0 / m).item() == -3.0
    assert torch.round(w[1] / m * 3.0).item() == -2.0
    out = F.pams_weight_quant(w, 3)
    assert torch.equal(out[1], -3.0 * m / 3.0)


# ---------------------------------------------------------------------------------------------
# Gate Q2 (§1.3)
# ---------------------------------------------------------------------------------------------


def test_gate_official_mode_matches_formula_and_cuts_graph() -> None:
    g = torch.randn(4, 8, 1, 1, generator=_gen(13)).requires_grad_()
    out = F.gate_act_quant(g, 2, per_sample=False, straight_through=False)
    assert not out.requires_grad
    gd = g.detach()
    lo, up = gd.min().reshape(1), gd.max().reshape(1)
    # The official quant_activation has no clip; the clip is a no-op here anyway.
    assert torch.equal(out, _spec_asym(gd, lo, up, 2))
    assert _n_levels(out) <= 4


def test_gate_per_sample_is_independent_of_batch() -> None:
    g = torch.randn(5, 8, 1, 1, generator=_gen(14)) * torch.arange(1.0, 6.0).view(5, 1, 1, 1)
    out = F.gate_act_quant(g)
    for i in range(5):
        assert torch.equal(out[i : i + 1], F.gate_act_quant(g[i : i + 1]))
        assert _n_levels(out[i]) <= 4
        # Per-sample bounds: each sample's own min and max map to within half a step.
        assert _n_levels(out[i]) >= 2
    # The batch-wide (official) version does depend on the other samples.
    batch = F.gate_act_quant(g, per_sample=False)
    alone = F.gate_act_quant(g[:1], per_sample=False)
    assert not torch.equal(batch[:1], alone)


def test_gate_straight_through_gradient_is_identity() -> None:
    g = torch.randn(3, 8, 1, 1, generator=_gen(15), dtype=torch.float64).requires_grad_()
    go = torch.randn(g.shape, generator=_gen(16), dtype=torch.float64)
    for per_sample in (True, False):
        g.grad = None
        F.gate_act_quant(g, 2, per_sample=per_sample, straight_through=True).backward(go)
        torch.testing.assert_close(g.grad, go, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("straight_through", [True, False])
def test_gate_constant_input_is_returned_unchanged(straight_through: bool) -> None:
    g = torch.randn(3, 8, 1, 1, generator=_gen(17))
    g[1] = 0.0  # an all-zero ReLU output for one sample
    g.requires_grad_()
    out = F.gate_act_quant(g, per_sample=True, straight_through=straight_through)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    others = F.gate_act_quant(g.detach()[[0, 2]], per_sample=True)
    assert torch.equal(out.detach()[[0, 2]], others)
    if straight_through:
        out.sum().backward()
        torch.testing.assert_close(g.grad, torch.ones_like(g), rtol=0, atol=1e-6)
    # Whole batch constant with batch-wide bounds (the official configuration).
    z = torch.full((2, 8, 1, 1), 0.7)
    out_z = F.gate_act_quant(z, per_sample=False, straight_through=False)
    assert torch.equal(out_z, z)


# ---------------------------------------------------------------------------------------------
# PAMS activations (§1.8)
# ---------------------------------------------------------------------------------------------


def test_pams_act_hand_example() -> None:
    # k = 3: q = 3, alpha = 1.5 -> step 0.5; 0.6 -> 0.6*3/1.5 = 1.2 -> 1 -> 0.5;
    # -0.8 -> -1.6 -> -2 -> -1.0 ; 2.0 -> clamp 1.5 -> 3 -> 1.5 ; -0.25 -> -0.5 -> -0 -> 0.
    alpha = torch.tensor([1.5], dtype=torch.float64)
    x = torch.tensor([0.6, -0.8, 2.0, -0.25, -7.0], dtype=torch.float64)
    assert F.pams_act_quant(x, alpha, 3).tolist() == [0.5, -1.0, 1.5, -0.0, -1.5]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pams_act_levels_and_gradients(bits: int) -> None:
    gen = _gen(20 + bits)
    dtype = torch.float64
    x = (torch.randn(2, 4, 5, 5, generator=gen, dtype=dtype) * 2).requires_grad_()
    alpha = torch.tensor([1.7], dtype=dtype, requires_grad=True)
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    out = F.pams_act_quant(x, alpha, bits)
    assert _n_levels(out) <= 2**bits - 1
    out.backward(go)
    with torch.no_grad():
        a = alpha.detach()
        c = torch.clamp(x, -a, a)
        inside = (x.abs() <= a).to(dtype)
        outside_sign = torch.sign(x) * (x.abs() > a).to(dtype)
        d_alpha = (go * (outside_sign + (out - c) / a)).sum().reshape(1)
    assert (x.abs() > alpha).any()
    torch.testing.assert_close(x.grad, go * inside, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha.grad, d_alpha, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# LSQ (§2.3)
# ---------------------------------------------------------------------------------------------


def _quantsr_factor(v: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(v - torch.floor(v) - 0.5)
    return (1 - t * t) / (2 * math.tanh(0.5))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_levels_and_fixed_points(bits: int, signed: bool) -> None:
    gen = _gen(30 + bits)
    x = torch.randn(2, 3, 8, 8, generator=gen) * 2
    if not signed:
        x = x.abs()
    alpha = torch.tensor([0.3])
    out = F.lsq_fake_quant(x, alpha, bits, signed)
    assert _n_levels(out) <= 2**bits
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    # Forward uses alpha exactly (the gradient-scaling trick must not perturb it).
    assert torch.equal(out, torch.round(torch.clamp(x / alpha, -qn, qp)) * alpha)
    grid = torch.arange(-qn, qp + 1, dtype=torch.float32) * alpha
    assert torch.equal(F.lsq_fake_quant(grid, alpha, bits, signed), grid)
    assert out.min() >= -qn * alpha and out.max() <= qp * alpha + 1e-7


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_match_closed_form(signed: bool) -> None:
    gen = _gen(40)
    dtype = torch.float64
    bits = 3
    qn, qp = (4, 3) if signed else (0, 7)
    x = (torch.randn(2, 3, 6, 6, generator=gen, dtype=dtype) * 1.5).requires_grad_()
    alpha = torch.tensor([0.35], dtype=dtype, requires_grad=True)
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    F.lsq_fake_quant(x, alpha, bits, signed).backward(go)
    g = 1 / math.sqrt(x.numel() * qp)
    with torch.no_grad():
        v = x / alpha
        inside = ((v >= -qn) & (v <= qp)).to(dtype)
        fac = _quantsr_factor(v)
        dx = go * fac * inside
        # LSQ: round(v) - v inside, -Qn below, Qp above; QuantSR's factor multiplies the -v.
        d_alpha_each = torch.where(
            v < -qn,
            torch.full_like(v, -qn),
            torch.where(v > qp, torch.full_like(v, qp), torch.round(v) - fac * v),
        )
        d_alpha = (go * d_alpha_each).sum().reshape(1) * g
    assert (v > qp).any() and (not signed or (v < -qn).any())
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha.grad, d_alpha, rtol=1e-10, atol=1e-12)


def test_lsq_custom_grad_scale() -> None:
    dtype = torch.float64
    x = torch.randn(50, generator=_gen(41), dtype=dtype)
    grads = []
    for gs in (None, 1.0, 0.25):
        alpha = torch.tensor([0.5], dtype=dtype, requires_grad=True)
        F.lsq_fake_quant(x, alpha, 4, True, grad_scale=gs).sum().backward()
        grads.append(alpha.grad.item())
    default_g = 1 / math.sqrt(50 * 7)
    assert grads[0] == pytest.approx(grads[1] * default_g, rel=1e-12)
    assert grads[2] == pytest.approx(grads[1] * 0.25, rel=1e-12)


def test_lsq_init_alpha_hand_example() -> None:
    # mean|x| = (1 + 2 + 3 + 4) / 4 = 2.5; signed k = 4: Qp = 7 -> 5 / sqrt(7);
    # unsigned k = 4: Qp = 15 -> 5 / sqrt(15); weights at 8 bits: Qp = 127.
    x = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64, requires_grad=True)
    a = F.lsq_init_alpha(x, 4, signed=True)
    assert a.shape == (1,) and not a.requires_grad
    assert a.item() == pytest.approx(5 / math.sqrt(7), rel=1e-15)
    assert F.lsq_init_alpha(x, 4, signed=False).item() == pytest.approx(5 / math.sqrt(15))
    assert F.lsq_init_alpha(x, 8, signed=True).item() == pytest.approx(5 / math.sqrt(127))


# ---------------------------------------------------------------------------------------------
# Fused autograd Functions vs their plain-autograd references (§1.1, §1.2, §1.8)
# ---------------------------------------------------------------------------------------------


def _grad_tol(dtype: torch.dtype, scale: float) -> dict[str, float]:
    # The references sum terms of size `scale` that largely cancel (e.g. sum(g * a / s) and
    # sum(g * out / s)); the fused backward sums their difference, so the two agree to rounding
    # of those partial sums, not of the (possibly much smaller) result.
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12 * scale}
    return {"rtol": 1e-5, "atol": 1e-6 * scale}


def _asym_input(
    gen: torch.Generator, dtype: torch.dtype, per_sample: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random activations plus exact ties with both bounds, grid points and half-step points."""
    n = 4
    x = torch.randn(n, 3, 6, 7, generator=gen, dtype=dtype) * 3
    shape = (n, 1, 1, 1) if per_sample else (1,)
    lower = -0.5 - torch.rand(shape, generator=gen, dtype=dtype) * 2
    upper = 0.5 + torch.rand(shape, generator=gen, dtype=dtype) * 3
    lo_b, up_b = lower.expand(n, 1, 1, 1), upper.expand(n, 1, 1, 1)
    s, zp = F.asym_quant_params(lo_b, up_b, bits)
    flat = x.view(n, -1)
    flat[:, :5] = lo_b.view(n, 1)  # ties with lower
    flat[:, 5:10] = up_b.view(n, 1)  # ties with upper
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=dtype)
    m = codes.numel()
    flat[:, 10 : 10 + m] = (codes + zp.view(n, 1)) / s.view(n, 1)  # grid points
    flat[:, 20 : 20 + m] = (codes + 0.5 + zp.view(n, 1)) / s.view(n, 1)  # half steps
    return x, lower, upper


def _run(fn, x, lower, upper, go, **kw):  # type: ignore[no-untyped-def]
    xr, lr, ur = (t.detach().clone().requires_grad_() for t in (x, lower, upper))
    out = fn(xr, lr, ur, **kw)
    out.backward(go)
    return out.detach(), xr.grad, lr.grad, ur.grad


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("clamp_codes", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_asym_matches_reference_autograd(
    dtype: torch.dtype, bits: int, per_sample: bool, clamp_codes: bool, clip: bool
) -> None:
    gen = _gen(1000 + 7 * bits + 3 * per_sample + clamp_codes)
    x, lower, upper = _asym_input(gen, dtype, per_sample, bits)
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    kw = {"bits": bits, "clip": clip, "clamp_codes": clamp_codes}
    out_r, gx_r, gl_r, gu_r = _run(F._asym_fake_quant_reference, x, lower, upper, go, **kw)
    out_f, gx_f, gl_f, gu_f = _run(F.asym_fake_quant, x, lower, upper, go, **kw)
    assert torch.equal(out_f, out_r)
    assert torch.equal(gx_f, gx_r)
    assert gl_f.shape == lower.shape and gu_f.shape == upper.shape
    a = torch.max(torch.min(x, upper), lower) if clip else x
    scale = float((go.abs() * (a.abs() + out_r.abs())).sum() / (upper - lower).min())
    scale += float(go.abs().sum())
    torch.testing.assert_close(gl_f, gl_r, **_grad_tol(dtype, scale))
    torch.testing.assert_close(gu_f, gu_r, **_grad_tol(dtype, scale))
    if clip:  # the x gradient is 1/2 exactly at the ties with either bound
        ties = (x == lower) | (x == upper)
        torch.testing.assert_close(gx_f[ties], go[ties] / 2 * 1.0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_asym_tie_gradients_by_hand(dtype: torch.dtype) -> None:
    # The §1.1 example of test_asym_gradient_at_exact_ties_splits_half_half, through the fused
    # path explicitly: x == upper sends 0.5 to x and 0.5 to upper; x == lower likewise.
    lower = torch.tensor([-1.0], dtype=dtype, requires_grad=True)
    upper = torch.tensor([2.0], dtype=dtype, requires_grad=True)
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0], dtype=dtype, requires_grad=True)
    out = F.asym_fake_quant(x, lower, upper, 2)
    assert out.grad_fn is not None and "AsymFakeQuant" in type(out.grad_fn).__name__
    out.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0], dtype=dtype))
    assert x.grad.tolist() == [0.5, 5.0, 100.0, 0.0, 0.0]
    # a - out: 0.5 -> s = 1, zp = 1, q = round(0.5 - 1) = -0 -> out = 1, a - out = -0.5.
    # upper: 0.5 (tie) + 1000 (above) - sum(g (a - out)) / R = 1000.5 + 50 / 3.
    # lower: 5 (tie) + 10000 (below) + sum(g (a - out)) / R = 10005 - 50 / 3.
    torch.testing.assert_close(upper.grad, torch.tensor([1000.5 + 50 / 3], dtype=dtype))
    torch.testing.assert_close(lower.grad, torch.tensor([10005 - 50 / 3], dtype=dtype))


@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_asym_crossed_bounds_match_reference(per_sample: bool) -> None:
    # lower > upper (a broken state a gate could reach): min/max give a = lower everywhere and
    # the whole clip gradient goes to lower; the fused backward reproduces that.
    dtype = torch.float64
    gen = _gen(77)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=dtype)
    shape = (3, 1, 1, 1) if per_sample else (1,)
    lower = torch.full(shape, 0.8, dtype=dtype)
    upper = torch.full(shape, 0.3, dtype=dtype)
    if per_sample:
        upper[0] = 1.5  # one sample with valid bounds
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    ref = _run(F._asym_fake_quant_reference, x, lower, upper, go, bits=3)
    got = _run(F.asym_fake_quant, x, lower, upper, go, bits=3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["x", "bounds"])
def test_fused_asym_partial_requires_grad(which: str) -> None:
    dtype = torch.float32
    gen = _gen(5)
    x, lower, upper = _asym_input(gen, dtype, True, 2)
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    grads = []
    for fn in (F._asym_fake_quant_reference, F.asym_fake_quant):
        xr, lr, ur = (t.clone() for t in (x, lower, upper))
        inputs = [xr] if which == "x" else [lr, ur]
        for t in inputs:
            t.requires_grad_()
        out = fn(xr, lr, ur, 2, clamp_codes=True)
        grads.append(torch.autograd.grad(out, inputs, go))
    if which == "x":
        assert torch.equal(grads[0][0], grads[1][0])
    else:
        for r, f in zip(grads[0], grads[1], strict=True):
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-4)


def test_fused_asym_other_bound_shapes_and_retain_graph() -> None:
    # Per-channel bounds [1, C, 1, 1] take the generic reduction; a second backward through a
    # retained graph must see the same saved tensors.
    dtype = torch.float64
    gen = _gen(9)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=dtype)
    lower = -0.5 - torch.rand(1, 3, 1, 1, generator=gen, dtype=dtype)
    upper = 0.5 + torch.rand(1, 3, 1, 1, generator=gen, dtype=dtype)
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    ref = _run(F._asym_fake_quant_reference, x, lower, upper, go, bits=2)
    xr, lr, ur = (t.clone().requires_grad_() for t in (x, lower, upper))
    out = F.asym_fake_quant(xr, lr, ur, 2)
    first = torch.autograd.grad(out, (xr, lr, ur), go, retain_graph=True)
    second = torch.autograd.grad(out, (xr, lr, ur), go)
    for g1, g2, r in zip(first, second, ref[1:], strict=True):
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1, r, rtol=1e-12, atol=1e-12)


def test_asym_without_autograd_builds_no_graph_and_matches() -> None:
    gen = _gen(11)
    x, lower, upper = _asym_input(gen, torch.float32, True, 3)
    x.requires_grad_()
    lower.requires_grad_()
    ref = F._asym_fake_quant_reference(x, lower, upper, 3, clamp_codes=True).detach()
    with torch.no_grad():
        out = F.asym_fake_quant(x, lower, upper, 3, clamp_codes=True)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, ref)
    with torch.inference_mode():
        assert torch.equal(F.asym_fake_quant(x, lower, upper, 3, clamp_codes=True), ref)


def test_asym_mixed_dtypes_and_broadcast_x_use_the_reference() -> None:
    x = torch.randn(1, 2, 3, 3, generator=_gen(12))
    lower64 = torch.tensor([-0.7], dtype=torch.float64)
    upper64 = torch.tensor([1.1], dtype=torch.float64)
    out = F.asym_fake_quant(x, lower64, upper64, 2)
    assert out.dtype == torch.float64
    assert torch.equal(out, F._asym_fake_quant_reference(x, lower64, upper64, 2))
    # x broadcast by per-sample bounds: output [2, 2, 3, 3].
    lo = torch.tensor([-0.7, -0.2]).view(2, 1, 1, 1)
    up = torch.tensor([1.1, 0.4]).view(2, 1, 1, 1)
    out2 = F.asym_fake_quant(x, lo, up, 2)
    assert out2.shape == (2, 2, 3, 3)
    assert torch.equal(out2, F._asym_fake_quant_reference(x, lo, up, 2))


@pytest.mark.parametrize("channels", [3, 32, 64])
@pytest.mark.parametrize("mode", ["percentile", "minmax"])
@pytest.mark.parametrize("clamp_codes", [False, True])
def test_fused_weight_quant_matches_reference(channels: int, mode: str, clamp_codes: bool) -> None:
    # §1.2 numerics unchanged: the float64 torch.quantile bounds and the plain-autograd graph.
    gen = _gen(channels)
    w = (torch.randn(channels, channels, 3, 3, generator=gen) * 0.05).requires_grad_()
    go = torch.randn(w.shape, generator=gen)
    out = F.ddtb_weight_quant(w, 2, mode, clamp_codes=clamp_codes)  # type: ignore[arg-type]
    (gw,) = torch.autograd.grad(out, w, go)
    wd = w.detach()
    if mode == "percentile":
        flat = wd.double().flatten()
        lo = torch.quantile(flat, 0.01).float().reshape(1)
        up = torch.quantile(flat, 0.99).float().reshape(1)
    else:
        lo, up = wd.min().reshape(1), wd.max().reshape(1)
    wr = w.detach().clone().requires_grad_()
    ref = F._asym_fake_quant_reference(
        wr, lo, up, 2, clip=mode == "percentile", clamp_codes=clamp_codes, guard=True
    )
    ref = torch.where(up == lo, wr, ref)
    (gw_ref,) = torch.autograd.grad(ref, wr, go)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(gw, gw_ref)


@pytest.mark.parametrize("n", [1, 2, 3, 9216, 36864])
def test_percentile_bounds_equal_float64_quantile_with_duplicates(n: int) -> None:
    gen = _gen(n + 1)
    t = torch.randn(n, generator=gen) * 0.05
    t[: n // 4] = torch.round(t[: n // 4] * 50) / 50  # duplicates in the tails
    t[n // 4 : n // 2] = 0.0
    for q_low, q_high in ((1.0, 99.0), (5.0, 95.0), (0.0, 100.0), (50.0, 50.0), (0.3, 97.1)):
        lo, up = F.percentile_bounds(t.view(-1, 1), q_low, q_high)
        flat = t.double()
        assert torch.equal(lo, torch.quantile(flat, q_low / 100).float().reshape(1))
        assert torch.equal(up, torch.quantile(flat, q_high / 100).float().reshape(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha0", [1.7, 2.0, -1.5])
def test_fused_pams_matches_reference_autograd(
    bits: int, dtype: torch.dtype, alpha0: float
) -> None:
    gen = _gen(2000 + bits)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=dtype) * 3
    qmax = 2 ** (bits - 1) - 1
    flat = x.view(-1)
    flat[:5] = alpha0  # ties with the clip
    flat[5:10] = -alpha0
    flat[10:30] = torch.arange(-10, 10, dtype=dtype) * (alpha0 / qmax / 2)  # grid, half steps
    go = torch.randn(x.shape, generator=gen, dtype=dtype)
    results = []
    for fn in (F._pams_act_quant_reference, F.pams_act_quant):
        xr = x.clone().requires_grad_()
        alpha = torch.tensor([alpha0], dtype=dtype, requires_grad=True)
        out = fn(xr, alpha, bits)
        out.backward(go)
        results.append((out.detach(), xr.grad, alpha.grad))
    (o_r, gx_r, ga_r), (o_f, gx_f, ga_f) = results
    assert torch.equal(o_f, o_r)
    assert torch.equal(gx_f, gx_r)
    scale = float((go.abs() * (x.abs() + 1)).sum())
    torch.testing.assert_close(ga_f, ga_r, **_grad_tol(dtype, scale))
    with torch.no_grad():
        o_ng = F.pams_act_quant(x, torch.tensor([alpha0], dtype=dtype), bits)
    assert torch.equal(o_ng, o_r)
