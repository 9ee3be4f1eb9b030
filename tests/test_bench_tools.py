"""The arithmetic of the study scripts in bench/: gdq_allocation.py and quant_ablation.py."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
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


def _record(model: str, deltas: list[float]) -> dict:
    """An allocation record whose 'learned' is 'shuffled' + deltas per image (dB)."""
    per = []
    for i, d in enumerate(deltas):
        base = 30.0 + i
        per.append(
            {
                "image": f"im{i}",
                "learned": {"psnr": base + d, "fab": 5.0},
                "shuffled": {"psnr": base, "fab": 5.0},
            }
        )
    mean = {k: float(np.mean([p[k]["psnr"] for p in per])) for k in ("learned", "shuffled")}
    return {
        "model": model,
        "mean_psnr": mean,
        "mean_fab": {"learned": 5.0, "shuffled": 5.0},
        "per_image": per,
    }


def test_allocation_summary_pairs_seeds_and_images(tmp_path: Path, capsys) -> None:
    recs = [_record("a", [0.1, 0.0, 0.2]), _record("b", [0.3, 0.0, 0.1])]
    (row,) = alloc.summarize(recs)
    assert row["difference"] == "learned - shuffled"
    assert row["n_seeds"] == 2 and row["n_pairs"] == 6
    assert row["mean"] == pytest.approx(0.7 / 6) and row["mean_pairs"] == pytest.approx(0.7 / 6)
    assert row["moved"] == 4 and row["wins"] == 4  # the zero pairs do not count
    assert row["sign_p"] == pytest.approx(1 / 16)
    paths = []
    for i, r in enumerate(recs):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert alloc.main(["--summary", *map(str, paths)]) == 0
    assert "learned - shuffled" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert alloc.main(["--summary", str(bad)]) == 2
    assert "not a gdq_allocation record" in capsys.readouterr().err
    # against another allocation: the signs flip, the magnitudes stay
    out = tmp_path / "s.json"
    assert alloc.main(["--summary", *map(str, paths), "--base", "learned", "--json", str(out)]) == 0
    (flip,) = json.loads(out.read_text())["rows"]
    assert flip["difference"] == "shuffled - learned"
    assert flip["mean"] == pytest.approx(-row["mean"]) and flip["wins"] == 0
    assert alloc.main(["--summary", str(paths[0]), "--base", "all_5"]) == 2
    assert "no allocation 'all_5'" in capsys.readouterr().err


def test_ablation_ptq_quantizes_and_calibrates_a_float_model(tmp_path: Path) -> None:
    from lowbitsr.checkpoint import save_model

    torch.manual_seed(0)
    fp = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(g.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = argparse.Namespace(
        model="fp",
        ptq=4,
        method="ddtb",
        percentile=99.0,
        calib=f"folder:{folder}",
        calib_batches=1,
    )
    save_model(fp, tmp_path / "fp")
    q = ablation.post_training(fp, args)
    bounds = [(float(m.lower.detach()), float(m.upper.detach())) for _, m in quantizers(q)]
    assert len(bounds) == 6 and all(lo < hi for lo, hi in bounds)  # calibrated, not the ±10 init
    assert all(hi != 10.0 for _, hi in bounds)
    from lowbitsr.errors import LowbitsrError

    with pytest.raises(LowbitsrError, match="float model"):
        ablation.post_training(q, args)


def test_openvino_fusion_check_guard_keeps_the_rounding(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    fusion = _bench("openvino_qdq_fusion")
    out = tmp_path / "f.json"
    assert fusion.main(["--json", str(out)]) == 0
    plain, guarded = json.loads(out.read_text())["rows"]
    assert guarded["max abs(OV - ORT)"] == 0.0 and guarded["ORT unchanged"]
    assert plain["ORT unchanged"]  # the guard is a no-op for onnxruntime
