"""The allocation arithmetic of bench/gdq_allocation.py (the Granular-DQ allocation study)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "gdq_allocation", Path(__file__).parents[1] / "bench" / "gdq_allocation.py"
)
assert _SPEC is not None and _SPEC.loader is not None
alloc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(alloc)

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
