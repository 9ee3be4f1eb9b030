"""BitOPs and FAB (docs/evaluation.md §4, §5): hand-counted convs, w_bits/a_bits, FAB of FP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lowbitsr.models import create_model
from lowbitsr.quant.bitops import BITOPS_FORMULA, count_bitops, fab


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: a second thread only waits for a core
    yield
    torch.set_num_threads(before)


def test_single_conv_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    r = count_bitops(conv, (1, 3, 10, 10))
    macs = 8 * 10 * 10 * 3 * 3 * 3  # C_out * H * W * C_in * kH * kW = 21600
    assert r["macs"] == macs
    assert r["bitops"] == macs * 32 * 32 / 64 == 345600
    assert r["gbitops"] == pytest.approx(345600 / 1e9)
    assert r["formula"] == BITOPS_FORMULA and r["fab"] == 32.0
    # the quantized-layer contract: w_bits / a_bits attributes
    conv.w_bits, conv.a_bits = 8, 4
    r = count_bitops(conv, (2, 3, 10, 10))
    assert r["bitops"] == 2 * macs * 8 * 4 / 64 and r["fab"] == 4.0
    # strided, grouped conv: output size and C_in / groups
    g = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert count_bitops(g, (1, 4, 8, 8))["macs"] == 6 * 4 * 4 * 2 * 9


def test_per_sample_bits_and_overrides() -> None:
    conv = nn.Conv2d(2, 2, 1, bias=False)
    conv.w_bits, conv.a_bits = 8, torch.tensor([4, 8])
    r = count_bitops(conv, (2, 2, 5, 5))
    per_sample = 2 * 5 * 5 * 2
    assert r["bitops"] == per_sample * 8 * (4 + 8) / 64
    assert r["fab"] == 6.0
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    r = count_bitops(net, (1, 3, 4, 4), bits_per_layer={"0": (4, 2)})
    conv_macs, lin_macs = 4 * 16 * 3 * 9, 64 * 5
    assert r["macs"] == conv_macs + lin_macs
    assert r["bitops"] == conv_macs * 4 * 2 / 64 + lin_macs * 16
    assert r["fab"] == 2.0
    with pytest.raises(ValueError, match="named_modules"):
        count_bitops(net, (1, 3, 4, 4), bits_per_layer={"nope": (4, 4)})


def test_fab_of_fp_model_and_of_tiles() -> None:
    fp = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    r = count_bitops(fp, (1, 3, 8, 8))
    assert r["fab"] == 32.0 and r["bitops"] == r["macs"] * 16
    assert fab(None) == 32.0
    assert fab(torch.full((3, 4), 8)) == 8.0
    assert fab([4, 8, 5, 5]) == 5.5
    with pytest.raises(ValueError, match="no tiles"):
        fab([])
