"""The arithmetic of the study scripts in bench/: gdq_allocation.py and quant_ablation.py."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from lowbitsr.models import create_model
from lowbitsr.quant import DDTBConfig, quantize, quantized_convs, quantizers


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parents[1] / "bench" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


alloc = _bench("gdq_allocation")
ablation = _bench("quant_ablation")

CANDS = [4, 6, 8]


def _sse(tiles: int, seed: int) -> np.ndarray:
    """Per-tile errors that fall with bits, with diminishing returns (convex in bits)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(10, 100, size=(tiles, 1))
    return base * np.array([[1.0, 0.5, 0.35]]) + rng.uniform(0, 1, size=(tiles, 1))


def test_oracle_matches_brute_force_on_convex_errors() -> None:
    for seed in range(5):
        sse = _sse(5, seed)
        budget = 5 * 6
        idx = alloc.oracle(sse, CANDS, budget)
        assert sum(CANDS[i] for i in idx) <= budget
        best = min(
            sse[np.arange(5), list(c)].sum()
            for c in itertools.product(range(3), repeat=5)
            if sum(CANDS[i] for i in c) <= budget
        )
        assert sse[np.arange(5), idx].sum() == best


def test_policies_keep_the_learned_bits_and_rank_sensibly() -> None:
    sse = _sse(8, 7)
    learned = np.array([4, 4, 6, 6, 8, 8, 4, 6])
    entropy = np.linspace(0, 1, 8)
    out = alloc.allocations(sse, learned, entropy, CANDS, draws=20)
    for key in ("learned", "shuffled", "entropy"):
        assert out[key][1] == learned.mean()
    assert out["oracle"][1] <= learned.mean()
    assert out["oracle"][0] <= min(out["learned"][0], out["shuffled"][0], out["entropy"][0])
    assert out["all_4"][0] > out["all_8"][0]


def test_pooled_oracle_moves_bits_to_the_image_that_gains_most() -> None:
    flat = np.array([[10.0, 9.9, 9.8]] * 4)  # more bits barely help
    busy = np.array([[100.0, 40.0, 30.0]] * 4)
    pix = [1000, 1000]
    idx = alloc.pooled_oracle([flat, busy], pix, CANDS, budget=8 * 6)
    assert sum(CANDS[i] for part in idx for i in part) <= 8 * 6
    assert idx[1].sum() > idx[0].sum()  # the busy image gets the bits
    one = alloc.pooled_oracle([busy], [1000], CANDS, budget=4 * 6)[0]
    assert (one == alloc.oracle(busy, CANDS, 4 * 6)).all()  # one image: the per-image oracle


def test_ablation_groups_cover_every_quantizer_and_switch_back() -> None:
    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=3, n_feats=8)
    q = quantize(fp, DDTBConfig(bits=2)).eval()
    g = ablation.groups(q, per_block=True)
    acts, convs = quantizers(q), quantized_convs(q)
    assert len(g["acts"]) == len(acts) and len(g["weights"]) == len(convs)
    assert [len(g[f"quant_act{i}"]) for i in (1, 2, 3)] == [3, 3, 3]
    assert [len(g[f"block {b:02d}"]) for b in range(3)] == [5, 5, 5]  # 3 acts + 2 convs
    lr = torch.rand(1, 3, 12, 12) * 255
    with torch.no_grad():
        ref = q(lr)
        ablation._switch(g["all off"], False)
        assert all(not m.enabled for m in g["all off"])
        off = q(lr)
        ablation._switch(g["all off"], True)
        assert torch.equal(q(lr), ref) and not torch.equal(off, ref)
