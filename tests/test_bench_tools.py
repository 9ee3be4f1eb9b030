"""The arithmetic of the study scripts in bench/: gdq_allocation.py and quant_ablation.py."""

from __future__ import annotations

import importlib.util
import itertools
import sys
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
    sys.modules[name] = mod  # (dataclasses look their module up there)
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


def test_greedy_matches_brute_force_on_convex_errors() -> None:
    for seed in range(5):
        sse = _sse(5, seed)
        budget = 5 * 6
        idx = alloc.greedy([sse], CANDS, budget)[0]
        assert sum(CANDS[i] for i in idx) <= budget
        best = min(
            sse[np.arange(5), list(c)].sum()
            for c in itertools.product(range(3), repeat=5)
            if sum(CANDS[i] for i in c) <= budget
        )
        assert sse[np.arange(5), idx].sum() == best
        with_totals = alloc.greedy([sse], CANDS, budget, [float(sse[:, 0].sum())])[0]
        assert (with_totals == idx).all()  # one image: PSNR order = error order


def _tiles(seed: int, learned: list[int]) -> object:
    sse = _sse(len(learned), seed)
    return alloc.ImageTiles(
        sse=sse,
        qerr=sse - sse[:, -1:],
        learned=np.array(learned),
        entropy=np.linspace(0, 1, len(learned)),
        pixels=1000,
    )


def test_policies_keep_the_learned_bits_and_rank_sensibly() -> None:
    t = _tiles(7, [4, 4, 6, 6, 8, 8, 4, 6])
    out = alloc.allocations(t, CANDS, draws=20)
    for key in ("learned", "shuffled", "entropy"):
        assert out[key]["fab"] == t.learned.mean()
    for key in ("learned", "shuffled", "entropy", "qerr"):
        assert out["oracle"]["psnr"] >= out[key]["psnr"] - 1e-12
    assert out["oracle"]["fab"] <= t.learned.mean() and out["qerr"]["fab"] <= t.learned.mean()
    # qerr is sse minus a per-tile constant: same drops, so the same plan as the oracle
    assert out["qerr"]["psnr"] == out["oracle"]["psnr"]
    assert out["all_4"]["psnr"] < out["all_8"]["psnr"]


def test_pooled_moves_bits_to_the_image_that_gains_most() -> None:
    flat = np.array([[10.0, 9.9, 9.8]] * 4)  # more bits barely help
    busy = np.array([[100.0, 40.0, 30.0]] * 4)
    idx = alloc.greedy([flat, busy], CANDS, 8 * 6, [40.0, 400.0])
    assert sum(CANDS[i] for part in idx for i in part) <= 8 * 6
    assert idx[1].sum() > idx[0].sum()  # the busy image gets the bits
    images = [
        alloc.ImageTiles(e, e - e[:, -1:], np.full(4, 6), np.zeros(4), 1000) for e in (flat, busy)
    ]
    scores = alloc.pooled(images, CANDS)
    assert scores["oracle_pooled"][1]["fab"] > scores["oracle_pooled"][0]["fab"]
    mean_fab = np.mean([s["fab"] for s in scores["oracle_pooled"]])
    assert mean_fab <= 6.0


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
