"""Training loop: it learns, a resumed run equals an uninterrupted one, checkpoints are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbitsr.checkpoint import load_model
from lowbitsr.config import load_config
from lowbitsr.errors import LowbitsrError
from lowbitsr.train import FloatRecipe, ResumableSampler, train


def tiny_cfg(folder: Path, out: Path, name: str = "t", iters: int = 6, **extra: str):
    sets = [
        f"name={name}",
        f"output_root={out}",
        "model.name=edsr_tiny",
        "model.scale=2",
        "model.overrides={n_resblocks: 1, n_feats: 8}",
        f"data.train={{type: folder, root: {folder}, lr_patch: 8, repeat: 4}}",
        f"data.val={{type: folder, root: {folder}}}",
        f"train.iterations={iters}",
        "train.batch_size=4",
        "train.lr=1e-3",
        "train.checkpoint_every=2",
        "train.val_every=3",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, sets)


def test_sampler_resumes_mid_stream():
    full = ResumableSampler(5, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(17)]
    it2 = iter(ResumableSampler(5, seed=3, start=9))
    assert [next(it2) for _ in range(8)] == first[9:]
    # every epoch visits every item once, with unique keys across epochs
    assert sorted(k % 5 for k in first[:5]) == list(range(5))
    assert len(set(first)) == len(first)


def test_training_reduces_loss_and_saves_loadable_model(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, tmp_path, iters=30)
    cfg = load_config(
        None,
        [
            f"name={cfg.name}",
            f"output_root={tmp_path}",
            "model.name=edsr_tiny",
            "model.scale=2",
            "model.overrides={n_resblocks: 1, n_feats: 8}",
            f"data.train={{type: folder, root: {image_folder}, lr_patch: 8, repeat: 8}}",
            f"data.val={{type: folder, root: {image_folder}}}",
            "train.iterations=30",
            "train.batch_size=4",
            "train.lr=2e-3",
            "train.val_every=10",
            "train.log_every=1",
        ],
    )
    res = train(cfg, progress=False)
    log = [line for line in (res.run_dir / "log.jsonl").read_text().splitlines() if '"l1"' in line]
    import json

    l1 = [json.loads(x)["l1"] for x in log]
    assert sum(l1[-5:]) / 5 < sum(l1[:5]) / 5  # it learns
    assert res.best_psnr is not None and len(res.history) >= 3
    model = load_model(res.run_dir)
    assert model.model_config["name"] == "edsr_tiny"
    out = model(torch.rand(1, 3, 8, 8) * 255)
    assert out.shape == (1, 3, 16, 16)
    assert not list(res.run_dir.glob("*.tmp")) and not list(res.run_dir.glob(".*.tmp"))


def test_resume_equals_uninterrupted(image_folder, tmp_path):
    ref = train(tiny_cfg(image_folder, tmp_path, name="ref", iters=6), progress=False)
    cfg = tiny_cfg(image_folder, tmp_path, name="cut", iters=6)
    part = train(cfg, progress=False, stop_after=3)
    assert part.step == 3
    done = train(cfg, progress=False, resume=True)
    assert done.step == 6
    a = load_file(str(ref.run_dir / "checkpoint.safetensors"))
    b = load_file(str(done.run_dir / "checkpoint.safetensors"))
    keys = [k for k in a if k.startswith("model.")]
    assert keys
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_nonfinite_loss_stops_with_message(image_folder, tmp_path):
    class Exploding(FloatRecipe):
        def loss(self, model, batch, step):
            loss, logs = super().loss(model, batch, step)
            return loss * float("nan"), logs

    cfg = tiny_cfg(image_folder, tmp_path, name="nan", iters=20)
    with pytest.raises(LowbitsrError, match="not finite in 3 steps"):
        train(cfg, progress=False, recipe=Exploding(cfg), max_nonfinite=3)
