"""Issue #11, data loss and training/config validation: nothing a user owns is overwritten or
deleted silently, a refused run writes nothing, and every refusal is one line naming the file or
the config key (exit status 2)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowbitsr.checkpoint import load_training_state, peek_training_state, save_model
from lowbitsr.cli import main
from lowbitsr.config import load_config
from lowbitsr.errors import CheckpointError, ConfigError, LowbitsrError
from lowbitsr.models import create_model
from lowbitsr.train import FloatRecipe, train

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- helpers
def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The CLI's stderr: a single ``lowbitsr: error:`` line containing every needle."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbitsr: error:"), err
    assert len(err.splitlines()) == 1, err  # no traceback, nothing cut off onto other lines
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def write_cfg(
    tmp_path: Path, folder: Path, name: str = "run", iters: int = 4, train_extra: str = ""
) -> Path:
    """A tiny float experiment (edsr_tiny x2, 8-feature, one block) on ``folder``'s images."""
    path = tmp_path / f"{name}.yaml"
    train = f"iterations: {iters}, batch_size: 2, lr: 1.0e-3, checkpoint_every: 2, log_every: 1"
    train += train_extra
    path.write_text(
        f"""name: {name}
seed: 0
output_root: {tmp_path / "runs"}
model: {{name: edsr_tiny, scale: 2, overrides: {{n_resblocks: 1, n_feats: 8}}}}
data:
  train: {{type: folder, root: {folder}, lr_patch: 8, repeat: 4}}
  val: null
train: {{{train}}}
"""
    )
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def log_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def finite_weights(path: Path) -> bool:
    tensors = load_file(str(path))
    return all(bool(torch.isfinite(v).all()) for k, v in tensors.items() if k.startswith("model."))


@pytest.fixture
def tiny_saved(tmp_path: Path) -> Path:
    model = create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8)
    save_model(model, tmp_path / "tiny")
    return tmp_path / "tiny"


# ------------------------------------------------------- 1. make_report.sh deletes user files
def _fake_lowbitsr(bin_dir: Path, log: Path, allowed: Path) -> None:
    """A stand-in ``lowbitsr`` that records its arguments and writes ``report.html`` for
    ``report --output DIR`` (only below ``allowed``, so a wrong path cannot litter the repo)."""
    bin_dir.mkdir()
    script = bin_dir / "lowbitsr"
    script.write_text(
        f"""#!{sys.executable}
import json, sys
from pathlib import Path
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[0] == "eval":  # one result file, as lowbitsr eval --json-dir writes
    out = Path(args[args.index("--json-dir") + 1]).resolve()
    if out.is_relative_to({str(allowed)!r}):
        out.mkdir(parents=True, exist_ok=True)
        (out / "bicubic__bundled_test.json").write_text("{{}}")
if args[0] == "report":
    out = Path(args[args.index("--output") + 1]).resolve()
    if out.is_relative_to({str(allowed)!r}):
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.html").write_text("<html></html>")
        (out / "report.md").write_text("# report")
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_make_report_keeps_user_files_and_resolves_out_dir_from_the_caller(tmp_path: Path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    _fake_lowbitsr(bin_dir, calls, tmp_path)
    rel = "my_report_folder"  # relative to the caller's directory, not to the repository
    out = tmp_path / rel
    out.mkdir()
    (out / "holiday.png").write_bytes(b"my own picture")
    (out / "eval" / "json").mkdir(parents=True)
    (out / "eval" / "notes.txt").write_text("mine too")
    (out / "eval" / "json" / "other.json").write_text("{}")  # not this run's: not reported
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
        + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_report.sh"), rel],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "holiday.png").read_bytes() == b"my own picture"
    assert (out / "eval" / "notes.txt").read_text() == "mine too"
    assert not (ROOT / rel).exists()
    calls_made = [json.loads(x) for x in calls.read_text().splitlines()]
    report = next(c for c in calls_made if c[0] == "report")
    assert Path(report[report.index("--output") + 1]).resolve() == out.resolve()
    inputs = report[1 : report.index("--output")]
    assert [Path(p).name for p in inputs] == ["bicubic__bundled_test.json"]
    assert (out / "eval" / "json" / "other.json").read_text() == "{}"
    opened = proc.stdout.strip().splitlines()[-1]
    assert opened.startswith("== open ")
    html = Path(opened.split()[2])
    if not html.is_absolute():
        html = tmp_path / html
    assert html.resolve() == (out / "report.html").resolve() and html.is_file()


# ---------------------------------------------------------- 2. upscale overwrites its input
def _tiny_gdq(tmp_path: Path) -> Path:
    """A calibrated 1-block Granular-DQ model (the one kind that takes ``--bitmap``)."""
    from lowbitsr.quant import GranularDQConfig, quantize
    from lowbitsr.quant.granular_dq import calibrate_granular_dq

    torch.manual_seed(0)
    q = quantize(
        create_model("edsr_tiny", scale=2, n_resblocks=1, n_feats=8),
        GranularDQConfig(entropy_thresholds=(2.0, 3.0), tile=16, tile_step=14),
    )
    calibrate_granular_dq(q, torch.rand(2, 3, 16, 16) * 255)
    save_model(q, tmp_path / "gdq")
    return tmp_path / "gdq"


@pytest.mark.parametrize("how", ["same", "dot", "symlink", "bitmap"])
def test_upscale_refuses_to_overwrite_its_input(tiny_saved, image_folder, tmp_path, capsys, how):
    img = image_folder / "img0.png"
    before = img.read_bytes()
    out: Path = img
    extra: list[str] = []
    model = _tiny_gdq(tmp_path) if how == "bitmap" else tiny_saved
    if how == "dot":
        out = image_folder / "." / "img0.png"
    elif how == "symlink":
        out = tmp_path / "link.png"
        out.symlink_to(img)
    elif how == "bitmap":
        out = tmp_path / "sr.png"
        extra = ["--bitmap", str(img)]
    cwd = os.getcwd()
    try:
        os.chdir(image_folder)  # "./img0.png" spelled relative to the current directory
        src = "img0.png" if how == "dot" else str(img)
        dst = "./img0.png" if how == "dot" else str(out)
        assert main(["upscale", str(model), src, dst, "--quiet", *extra]) == 2
    finally:
        os.chdir(cwd)
    one_line_error(capsys, "img0.png", "overwrite")
    assert img.read_bytes() == before


def test_upscale_folder_refuses_an_output_that_is_one_of_its_inputs(
    tiny_saved, image_folder, capsys
):
    # writing into the input folder: img0 -> img0_x2.png would replace the input img0_x2.png
    shutil.copy(image_folder / "img1.png", image_folder / "img0_x2.png")
    before = snapshot(image_folder)
    assert main(["upscale", str(tiny_saved), str(image_folder), str(image_folder), "--quiet"]) == 2
    one_line_error(capsys, "img0_x2.png", "overwrite")
    assert snapshot(image_folder) == before


# --------------------------------------------- 3. a re-run without --resume clobbers a run
def test_rerun_without_resume_refuses_and_overwrite_replaces(image_folder, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, image_folder, iters=6)
    cfg = load_config(cfg_path)
    train(cfg, progress=False, stop_after=2)  # "killed" after its first checkpoint
    run = cfg.run_dir
    (run / "notes.txt").write_text("my notes")  # not the tool's: never deleted
    before = snapshot(run)
    assert main(["train", str(cfg_path), "--quiet"]) == 2
    one_line_error(capsys, str(run), "--resume", "--overwrite")
    assert snapshot(run) == before
    with pytest.raises(LowbitsrError, match=r"resume=True.*overwrite=True"):
        train(cfg, progress=False)
    assert snapshot(run) == before
    assert main(["train", str(cfg_path), "--resume", "--overwrite", "--quiet"]) == 2
    one_line_error(capsys, "--resume", "--overwrite")

    assert main(["train", str(cfg_path), "--overwrite", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    assert peek_training_state(run / "checkpoint.safetensors")["step"] == 6
    assert (run / "notes.txt").read_text() == "my notes"
    steps = [r["step"] for r in log_records(run) if "l1" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the fresh run's log only


def test_resume_without_checkpoint_starts_over_and_says_so(image_folder, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, image_folder, iters=3, train_extra=", checkpoint_every: 100")
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 1, "l1": 9.0}\n')  # killed before a checkpoint
    assert main(["train", str(cfg_path), "--resume", "--quiet"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert peek_training_state(run / "checkpoint.safetensors")["step"] == 3


# -------------------------------- 4. --resume with another config rewrites config.yaml first
def test_resume_with_another_model_refuses_before_writing(
    image_folder, tmp_path, capsys, tiny_saved
):
    cfg_path = write_cfg(tmp_path, image_folder, iters=6)
    train(load_config(cfg_path), progress=False, stop_after=2)
    run = tmp_path / "runs" / "run"
    before = snapshot(run)
    args = ["train", str(cfg_path), "--resume", "--quiet"]
    assert main([*args, "--set", "model.overrides.n_feats=16"]) == 2
    one_line_error(capsys, "model.overrides.n_feats", "8", "16")
    assert snapshot(run) == before
    qat = [
        "--set",
        "quant={method: ddtb, bits: 2}",
        "--set",
        f"model.init={tiny_saved}.safetensors",
    ]
    assert main(["quantize", str(cfg_path), "--resume", "--quiet", *qat]) == 2
    one_line_error(capsys, "quant")
    assert snapshot(run) == before
    assert "quant: null" in (run / "config.yaml").read_text()


def test_checkpoint_mismatch_message_is_complete(image_folder, tmp_path):
    cfg = load_config(write_cfg(tmp_path, image_folder, iters=6))
    train(cfg, progress=False, stop_after=2)
    other = create_model("edsr_tiny", scale=2, n_resblocks=2, n_feats=16)
    opt = torch.optim.Adam(other.parameters())
    with pytest.raises(CheckpointError) as info:
        load_training_state(
            cfg.run_dir / "checkpoint.safetensors", model=other, optimizer=opt, scheduler=None
        )
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing" in msg and "body.1." in msg  # the block the checkpoint lacks
    assert "shape" in msg and "head.0.weight" in msg  # 8 vs 16 features


# ------------------------------------------- 5. --resume --set train.lr=... silently ignored
def test_resume_applies_a_new_learning_rate_and_records_it(image_folder, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, image_folder, iters=4, train_extra=", lr_step: 2")
    train(load_config(cfg_path), progress=False, stop_after=2)
    run = tmp_path / "runs" / "run"
    args = ["train", str(cfg_path), "--resume", "--quiet", "--set", "train.lr=1.0e-4"]
    assert main(args) == 0
    lrs = {r["step"]: r["lr"] for r in log_records(run) if "lr" in r}
    assert lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5e-4)  # before the resume
    # after it: the new base rate, decayed by StepLR(2, 0.5) as if it had been used from step 0
    assert lrs[3] == pytest.approx(5e-5) and lrs[4] == pytest.approx(2.5e-5)
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-4)
    event = next(r for r in log_records(run) if r.get("event") == "resume")
    assert event["step"] == 2
    assert event["changed"]["train.lr"] == [pytest.approx(1e-3), pytest.approx(1e-4)]


def test_resume_refuses_a_change_it_cannot_apply(image_folder, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, image_folder, iters=4)
    train(load_config(cfg_path), progress=False, stop_after=2)
    run = tmp_path / "runs" / "run"
    before = snapshot(run)
    assert main(["train", str(cfg_path), "--resume", "--quiet", "--set", "seed=7"]) == 2
    one_line_error(capsys, "seed", "--overwrite")
    assert snapshot(run) == before


# -------------------------------------- 6. the non-finite stop names a broken checkpoint
class LrBlowUp(FloatRecipe):
    """Float training whose learning rate jumps to ``huge`` from step ``at`` on."""

    def __init__(self, cfg: Any, at: int, huge: float = 1e8) -> None:
        super().__init__(cfg)
        self.at, self.huge = at, huge
        self.groups: list[dict[str, Any]] = []

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        self.groups = super().param_groups(model)
        return self.groups

    def loss(self, model, batch, step):
        if step >= self.at:
            for g in self.groups:
                g["lr"] = self.huge
        return super().loss(model, batch, step)


def test_nonfinite_stop_keeps_the_last_checkpoint_with_finite_outputs(image_folder, tmp_path):
    cfg_path = write_cfg(
        tmp_path, image_folder, iters=8, train_extra=", checkpoint_every: 1, max_nonfinite: 2"
    )
    cfg = load_config(cfg_path)
    with pytest.raises(LowbitsrError, match="not finite in 2 steps") as info:
        train(cfg, progress=False, recipe=LrBlowUp(cfg, at=3))
    msg = str(info.value)
    ckpt = cfg.run_dir / "checkpoint.safetensors"
    assert str(ckpt) in msg and "step 3" in msg and "--resume" in msg
    # the checkpoint left for --resume is the one before the update that broke the weights
    assert peek_training_state(ckpt)["step"] == 3
    assert finite_weights(ckpt)
    # following the advice works: resume it (with a lower learning rate)
    lower = load_config(cfg_path, ["train.lr=1.0e-4"])
    res = train(lower, progress=False, resume=True)
    assert res.step == 8
    assert all(bool(torch.isfinite(p).all()) for p in res.model.parameters())
    assert not (cfg.run_dir / "checkpoint.prev.safetensors").exists()


@pytest.mark.parametrize("every", [1, 100])
def test_nonfinite_stop_without_a_good_checkpoint_says_so(image_folder, tmp_path, capsys, every):
    cfg_path = write_cfg(
        tmp_path, image_folder, iters=6, train_extra=f", checkpoint_every: {every}"
    )
    args = ["train", str(cfg_path), "--quiet", "--set", "train.max_nonfinite=2"]
    assert main([*args, "--set", "train.lr=1.0e8"]) == 2
    err = one_line_error(capsys, "not finite", "no checkpoint", "--overwrite")
    assert "last good checkpoint is" not in err
    run = tmp_path / "runs" / "run"
    assert not (run / "checkpoint.safetensors").exists()  # --resume cannot pick a broken one
    assert main([*args, "--overwrite"]) == 0  # the advice: start over with a lower rate
    assert finite_weights(run / "checkpoint.safetensors")


# ------------------------------------------------------------ training/config validation
@pytest.mark.parametrize(
    "setting,key",
    [("model.name=edsr_tinyy", "model.name"), ("model.scale=5", "model.scale")],
)
def test_bad_model_is_one_line_and_creates_nothing(image_folder, tmp_path, capsys, setting, key):
    cfg_path = write_cfg(tmp_path, image_folder)
    assert main(["train", str(cfg_path), "--quiet", "--set", setting]) == 2
    one_line_error(capsys, key)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(load_config(cfg_path, [setting]), progress=False)
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_root_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    cfg_path = write_cfg(tmp_path, image_folder)
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    assert main(["train", str(cfg_path), "--quiet", "--output-root", str(a_file)]) == 2
    one_line_error(capsys, str(a_file), "output_root")
    with pytest.raises(LowbitsrError, match="output_root"):
        train(load_config(cfg_path, [f"output_root={a_file}"]), progress=False)

    locked = tmp_path / "locked"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a: Any, **k: Any) -> None:
        if str(self).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["train", str(cfg_path), "--quiet", "--output-root", str(locked)]) == 2
    one_line_error(capsys, str(locked), "output_root", "Permission denied")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("name: x\nmodel: {name: edsr_tiny, scale: 2}\n", "data"),
        ("name: x\ndata: {train: {type: bundled, split: train}}\n", "model"),
    ],
    ids=["empty", "no-data", "no-model"],
)
def test_config_missing_section_is_refused(tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["train", str(cfg), "--quiet", "--output-root", str(tmp_path / "runs")]) == 2
    one_line_error(capsys, str(cfg), needle)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=needle):
        load_config(cfg)


@pytest.mark.parametrize(
    "setting",
    [
        "train.iterations=-5",
        "train.iterations=0",
        "train.batch_size=0",
        "train.lr=-1.0e-3",
        "train.lr=0",
        "train.betas=[0.9, 1.5]",
        "train.weight_decay=-1.0",
        "train.lr_step=-1",
        "train.lr_gamma=0",
        "train.val_every=-1",
        "train.checkpoint_every=0",
        "train.log_every=0",
        "train.num_workers=-1",
        "train.val_tile=-8",
        "train.grad_clip=-1.0",
        "train.max_nonfinite=0",
        "model.scale=0",
        "train.lr=.nan",
    ],
)
def test_out_of_range_options_are_refused(image_folder, tmp_path, capsys, setting):
    key = setting.split("=")[0]
    cfg_path = write_cfg(tmp_path, image_folder)
    assert main(["train", str(cfg_path), "--quiet", "--set", setting]) == 2
    one_line_error(capsys, key)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg_path, [setting])


def test_valid_edge_values_still_load(image_folder, tmp_path):
    cfg = load_config(
        write_cfg(tmp_path, image_folder),
        ["train.val_every=0", "train.lr_step=0", "train.grad_clip=0", "train.num_workers=0"],
    )
    assert cfg.train.val_every == 0 and cfg.train.lr_step == 0


def test_tiny_image_folder_trains(image_folder, tmp_path, capsys):
    """The happy path through the CLI is unchanged (and makes the tiny images used above)."""
    assert np.asarray(Image.open(image_folder / "img0.png")).shape == (48, 48, 3)
    cfg_path = write_cfg(tmp_path, image_folder, iters=2)
    assert main(["train", str(cfg_path), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
