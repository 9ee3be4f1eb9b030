"""A training process killed with SIGKILL resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbitsr.checkpoint import peek_training_state
from lowbitsr.errors import CheckpointError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _write_cfg(path: Path, folder: Path, out: Path, name: str) -> Path:
    path.write_text(
        f"""name: {name}
seed: 3
output_root: {out}
model: {{name: edsr_tiny, scale: 2, overrides: {{n_resblocks: 2, n_feats: 16}}}}
data:
  train: {{type: folder, root: {folder}, lr_patch: 12, repeat: 8}}
  val: null
train: {{iterations: 40, batch_size: 4, lr: 1.0e-3, checkpoint_every: 2, log_every: 1}}
"""
    )
    return path


def _train(cfg: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lowbitsr", "train", str(cfg), "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _model_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_sigkill_then_resume_equals_uninterrupted(image_folder, tmp_path):
    out = tmp_path / "runs"
    ref_cfg = _write_cfg(tmp_path / "ref.yaml", image_folder, out, "ref")
    cut_cfg = _write_cfg(tmp_path / "cut.yaml", image_folder, out, "cut")
    ref = _train(ref_cfg)

    victim = _train(cut_cfg)
    ckpt = out / "cut" / "checkpoint.safetensors"
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists():
            try:
                step = peek_training_state(ckpt)["step"]
            except CheckpointError:  # pragma: no cover - atomic rename makes this unreachable
                pytest.fail("a partially written checkpoint was visible")
            if step >= 6:
                break
        time.sleep(0.05)
    assert victim.poll() is None, "training finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = peek_training_state(ckpt)["step"]
    assert 6 <= killed_at < 40
    # a kill during a write can leave only an orphaned temp file, never a partial checkpoint
    assert not (out / "cut" / "model.safetensors").exists()

    resumed = _train(cut_cfg, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    assert peek_training_state(ckpt)["step"] == 40
    assert not [p for p in (out / "cut").iterdir() if p.name.endswith(".tmp")]  # cleaned up
    a, b = _model_tensors(out / "ref"), _model_tensors(out / "cut")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
