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


def test_nonfinite_limit_comes_from_config(image_folder, tmp_path):
    class Exploding(FloatRecipe):
        def loss(self, model, batch, step):
            loss, logs = super().loss(model, batch, step)
            return (loss * float("inf")) if step >= 2 else loss, logs

    cfg = tiny_cfg(image_folder, tmp_path, name="nan2", iters=20, **{"train.max_nonfinite": "4"})
    with pytest.raises(LowbitsrError, match="not finite in 4 steps"):
        train(cfg, progress=False, recipe=Exploding(cfg))
    # the checkpoint written before the failures is intact and resumable
    ckpt = tmp_path / "nan2" / "checkpoint.safetensors"
    assert load_file(str(ckpt))  # readable
    log = (tmp_path / "nan2" / "log.jsonl").read_text()
    assert log.count("nonfinite_loss") == 4


def test_bf16_autocast_trains_float32_weights(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, tmp_path, name="bf16", iters=3, **{"train.amp": "bf16"})
    res = train(cfg, progress=False)
    params = dict(res.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(torch.isfinite(p).all() for p in params.values())
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point())


def test_unknown_amp_mode_is_a_clear_error(image_folder, tmp_path):
    cfg = tiny_cfg(image_folder, tmp_path, name="amp", iters=1, **{"train.amp": "fp8"})
    with pytest.raises(LowbitsrError, match=r"train\.amp must be 'none' or 'bf16'"):
        train(cfg, progress=False)


def test_tensorboard_scalars(image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(
        image_folder,
        tmp_path,
        name="tb",
        iters=4,
        **{
            "train.tensorboard": "true",
            "train.log_every": "1",
            "train.val_every": "2",
            "quant": "{method: ddtb, bits: 2, dynamic_ratio: 0.5, recipe: {gate_stage_iters: 2}}",
            "model.init": str(_float_init(image_folder, tmp_path)),
        },
    )
    train(cfg, progress=False)
    ea = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("train/l1", "train/kd", "train/gate_reg", "train/lr", "val/psnr", "val/fab"):
        assert tag in tags, tag
    bounds = sorted(t for t in tags if t.startswith("quant/bounds/"))
    gates = sorted(t for t in tags if t.startswith("quant/gate/"))
    assert bounds and gates
    assert [e.step for e in ea.Scalars("train/l1")] == [1, 2, 3, 4]
    lower = ea.Scalars(bounds[0])[-1].value
    assert lower == pytest.approx(lower)  # finite
    assert ea.Scalars("val/fab")[-1].value == 2.0


def _float_init(folder: Path, out: Path) -> Path:
    cfg = tiny_cfg(folder, out, name="fp_init", iters=2, **{"data.val": "null"})
    train(cfg, progress=False)
    return out / "fp_init"
