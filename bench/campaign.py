"""The evidence campaign: one float teacher, then every quantized row at one budget, with seeds.

    python scripts/build_photo_corpus.py --out data/photos      # once
    python bench/campaign.py run --iters 300                    # train + evaluate what is missing
    python bench/campaign.py table                              # the table from results/campaign

What it runs (EDSR-baseline x4, the papers' network; rows share the teacher and the budget):

* ``fp``: the float teacher (``configs/photos_edsr_baseline_x4_fp.yaml`` unless ``--teacher``);
* ``pams_w2a2``, ``pams_w4a4``: PAMS;
* ``ddtb_w2a2`` (our default numerics), ``ddtb_w2a2_official`` (``compat="official"``),
  ``ddtb_w2a2_nogate`` (no dynamic gates), ``ddtb_w4a4``: DDTB;
* ``gdq``: Granular-DQ, candidates {4, 6, 8} + E2B; ``gdq_w8``: its fixed 8-bit model;
  ``gdq_random``: a random gate drawing the bits at the frequencies the learned gate of the same
  seed uses on the training split (then the same E2B); ``gdq_rd``: the trained ``gdq`` model of
  the same seed with its controller refitted by rate–distortion on the training split
  (:func:`lowbitsr.quant.granular_dq.with_rd_controller`, FAB 5; no training, weights unchanged);
  ``gdq_random_rd``: the same refit of the ``gdq_random`` model (weights trained under a random
  gate, which exercises every bit-width); both fit the expected PSNR cost (``objective: psnr``,
  ``loss: cost``); ``gdq_rd_mse_labels``: the first fit tried (a classifier of per-tile MSE
  labels, no HR); ``gdq_rd_tile``, ``gdq_random_rd_tile``: the same classifier on the GBC
  descriptor plus three statistics of the LR tile (``gbc_tile_stats``); ``gdq_rd_tile_rc``,
  ``gdq_random_rd_tile_rc``: those controllers under per-image rate control (``image_fab: 5``:
  one bias along the bits per image puts every test image at FAB <= 5);
* ``ddtb_w4a4_int``, ``ddtb_w2a2_int``: DDTB in the integer layout (``layout: integer``: every
  body and upsampler conv between static quantizers, so it exports to integer kernels);
  ``ddtb_w4a4_int_s8``, ``ddtb_w2a2_int_s8``: the same with an 8-bit residual stream
  (``stream_bits: 8``);
  ``ddtb_w4a4_nogate``: the papers' layout without gates (the integer layout has none);
* ``ddtb_w4a4_okd``, ``pams_w4a4_okd``: w4a4 with output distillation added to the papers' loss
  (``output_kd_weight: 1``: ``+ L1(sr, teacher(lr))``; our addition, both methods).

Every 2-bit row and the Granular-DQ learned/random pair run ``--seeds`` seeds (default 3), the
others one. Each run is a normal training run (``runs/campaign/<row>_s<seed>``: resumable
checkpoints, validation-selected model) followed by evaluation on the corpus test split and the
bundled test pair; its JSON (per-image PSNR/SSIM, FAB, BitOPs, the commit and the full config)
goes to ``results/campaign/<row>_s<seed>.json``. A killed campaign continues where it stopped:
finished runs are skipped, an interrupted one resumes from its checkpoint. Several workers may run
at once (``--worker 0/2`` and ``--worker 1/2``): a run is claimed with a lock file.

The budget is set by flags (``--iters``, ``--lr-patch``, ``--batch``) and ``--set key=value``
overrides applied to every quantized run (``--teacher-set`` for the teacher), so the same
campaign runs at the papers' recipe on a GPU with DIV2K, e.g.::

    python bench/campaign.py run --device cuda --iters 60000 --lr-patch 48 \\
        --teacher configs/edsr_baseline_x4_fp.yaml --set data.train.type=div2k ...

``table`` prints, per row, mean ± std over seeds on both test sets, FAB and BitOPs, and the paired
differences that matter (DDTB − PAMS at 2 bits, learned − random gate, default − official,
gates − no gates, each row − float) with a 95 % t-interval over seeds (each seed's mean over test
images) and, as a second view, over (seed, image) pairs. Never run as a test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: row -> (quant section, multi-seed, learning rate). Recipes follow configs/edsr_baseline_x4_*.
# four calibration batches: the official gate placement needs a variance across batches
_KD = {"bound_lr": 0.01, "kd_weight": 1000.0, "calib_batches": 4}
#: our addition to the papers' loss: L1 to the float teacher's output (``output_kd_weight``)
_OKD = {**_KD, "output_kd_weight": 1.0}


def _refit(needs: str, seeds: bool = True, **fit: Any) -> dict[str, Any]:
    """A row that refits the controller of row ``needs`` at FAB 5 (``fit``: the fit's options)."""
    return {
        "quant": {"method": "granular_dq"},
        "seeds": seeds,
        "lr": 2e-4,
        "needs": needs,
        "fit": {"target_fab": 5.0, **fit},
    }


ROWS: dict[str, dict[str, Any]] = {
    "pams_w2a2": {"quant": {"method": "pams", "bits": 2, "recipe": _KD}, "seeds": True},
    "ddtb_w2a2": {"quant": {"method": "ddtb", "bits": 2, "recipe": _KD}, "seeds": True},
    "ddtb_w4a4": {"quant": {"method": "ddtb", "bits": 4, "recipe": _KD}, "seeds": True},
    "pams_w4a4": {"quant": {"method": "pams", "bits": 4, "recipe": _KD}, "seeds": False},
    "gdq": {"quant": {"method": "granular_dq"}, "seeds": True, "lr": 2e-4},
    "gdq_w8": {
        "quant": {"method": "granular_dq", "gate": "fixed", "fixed_bits": 8, "use_e2b": False},
        "seeds": False,
        "lr": 2e-4,
    },
    "gdq_random": {
        "quant": {"method": "granular_dq", "gate": "random"},
        "seeds": True,
        "lr": 2e-4,
        "needs": "gdq",
    },
    # controller refits of a trained Granular-DQ run (no training): see fit_controller
    "gdq_rd": _refit("gdq", objective="psnr", loss="cost"),
    "gdq_random_rd": _refit("gdq_random", objective="psnr", loss="cost"),
    # the same measurements, a classifier of the PSNR-cost labels instead of the expected cost
    "gdq_rd_labels": _refit("gdq", objective="psnr", loss="labels", l2=1e-3),
    "gdq_random_rd_labels": _refit("gdq_random", objective="psnr", loss="labels", l2=1e-3),
    # the first fit tried: an HR-free classifier of the per-tile MSE labels (one seed)
    "gdq_rd_mse_labels": _refit("gdq", seeds=False, objective="mse", loss="labels"),
    # the GBC also reads the tiles' un-normalised statistics (gbc_tile_stats); objective, loss
    # and l2 chosen by leave-one-image-out on the training tiles (bench/gdq_rd_fit.py --cv)
    "gdq_rd_tile": _refit("gdq", objective="mse", loss="labels", l2=1e-2, tile_stats=True),
    "gdq_random_rd_tile": _refit(
        "gdq_random", objective="mse", loss="labels", l2=1e-2, tile_stats=True
    ),
    # the same controllers under per-image rate control (image_fab): every test image at
    # FAB <= 5, whatever the fit on the training tiles says about other images
    "gdq_rd_tile_rc": _refit(
        "gdq", objective="mse", loss="labels", l2=1e-2, tile_stats=True, image_fab=5.0
    ),
    "gdq_random_rd_tile_rc": _refit(
        "gdq_random", objective="mse", loss="labels", l2=1e-2, tile_stats=True, image_fab=5.0
    ),
    "ddtb_w2a2_official": {
        "quant": {"method": "ddtb", "bits": 2, "compat": "official", "recipe": _KD},
        "seeds": True,
    },
    "ddtb_w2a2_nogate": {
        "quant": {"method": "ddtb", "bits": 2, "dynamic_ratio": 0.0, "recipe": _KD},
        "seeds": True,
    },
    # the integer layout (every body/upsampler conv between static quantizers, no gates)
    "ddtb_w4a4_int": {
        "quant": {"method": "ddtb", "bits": 4, "layout": "integer", "recipe": _KD},
        "seeds": True,
    },
    "ddtb_w4a4_int_s8": {
        "quant": {
            "method": "ddtb",
            "bits": 4,
            "layout": "integer",
            "stream_bits": 8,
            "recipe": _KD,
        },
        "seeds": True,
    },
    "ddtb_w2a2_int_s8": {
        "quant": {
            "method": "ddtb",
            "bits": 2,
            "layout": "integer",
            "stream_bits": 8,
            "recipe": _KD,
        },
        "seeds": False,
    },
    "ddtb_w4a4_nogate": {
        "quant": {"method": "ddtb", "bits": 4, "dynamic_ratio": 0.0, "recipe": _KD},
        "seeds": False,
    },
    "ddtb_w2a2_int": {
        "quant": {"method": "ddtb", "bits": 2, "layout": "integer", "recipe": _KD},
        "seeds": False,
    },
    # output distillation (our addition; both methods get it, same budget)
    "ddtb_w4a4_okd": {"quant": {"method": "ddtb", "bits": 4, "recipe": _OKD}, "seeds": True},
    "pams_w4a4_okd": {"quant": {"method": "pams", "bits": 4, "recipe": _OKD}, "seeds": False},
}

#: paired differences printed by ``table``: (label, row A, row B)
DIFFS = [
    ("DDTB w2a2 - PAMS w2a2", "ddtb_w2a2", "pams_w2a2"),
    ("DDTB w4a4 - PAMS w4a4", "ddtb_w4a4", "pams_w4a4"),
    ("DDTB w4a4 output distillation - papers' loss", "ddtb_w4a4_okd", "ddtb_w4a4"),
    ("PAMS w4a4 output distillation - papers' loss", "pams_w4a4_okd", "pams_w4a4"),
    ("DDTB w2a2 default - official", "ddtb_w2a2", "ddtb_w2a2_official"),
    ("DDTB w2a2 gates - no gates", "ddtb_w2a2", "ddtb_w2a2_nogate"),
    ("GDQ learned - random gate", "gdq", "gdq_random"),
    ("GDQ RD controller with tile statistics - random gate", "gdq_random_rd_tile", "gdq_random"),
    ("GDQ RD controller with tile statistics - learned gate", "gdq_rd_tile", "gdq"),
    ("GDQ tile controller, FAB 5 per image - random gate", "gdq_rd_tile_rc", "gdq_random"),
    (
        "GDQ random-gate weights + tile controller, FAB 5 per image - random gate",
        "gdq_random_rd_tile_rc",
        "gdq_random",
    ),
    ("GDQ tile controller, FAB 5 per image - learned gate", "gdq_rd_tile_rc", "gdq"),
    ("GDQ tile controller, FAB 5 per image - fixed 8-bit", "gdq_rd_tile_rc", "gdq_w8"),
    (
        "GDQ random-gate weights + tile controller, FAB 5 per image - fixed 8-bit",
        "gdq_random_rd_tile_rc",
        "gdq_w8",
    ),
    ("GDQ - fixed 8-bit", "gdq", "gdq_w8"),
    ("GDQ rate-distortion - learned", "gdq_rd", "gdq"),
    ("GDQ rate-distortion - random gate", "gdq_rd", "gdq_random"),
    ("GDQ rate-distortion - fixed 8-bit", "gdq_rd", "gdq_w8"),
    ("GDQ rate-distortion (labels) - learned", "gdq_rd_labels", "gdq"),
    ("GDQ rate-distortion (labels) - random gate", "gdq_rd_labels", "gdq_random"),
    ("GDQ random-gate weights + RD (labels) - learned", "gdq_random_rd_labels", "gdq"),
    ("GDQ random-gate weights + RD (labels) - fixed 8-bit", "gdq_random_rd_labels", "gdq_w8"),
    ("GDQ random-gate weights + RD - learned", "gdq_random_rd", "gdq"),
    ("GDQ random-gate weights + RD - fixed 8-bit", "gdq_random_rd", "gdq_w8"),
    ("DDTB w4a4 integer - paper layout", "ddtb_w4a4_int", "ddtb_w4a4"),
    ("DDTB w2a2 integer - paper layout", "ddtb_w2a2_int", "ddtb_w2a2"),
    ("DDTB w4a4 integer - paper layout without gates", "ddtb_w4a4_int", "ddtb_w4a4_nogate"),
    ("DDTB w4a4 integer, 8-bit stream - paper layout", "ddtb_w4a4_int_s8", "ddtb_w4a4"),
    ("DDTB w2a2 integer, 8-bit stream - paper layout", "ddtb_w2a2_int_s8", "ddtb_w2a2"),
]

TEST_SETS = {"photos": None, "bundled": {"type": "bundled", "split": "test"}}


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Campaign:
    """The runs of one campaign (paths, configs, claims) — see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = Path(args.runs)
        self.results = Path(args.results)
        self.teacher_cfg_path = Path(args.teacher)

    # ---- configs -------------------------------------------------------------------------------

    def teacher_config(self) -> Any:
        from lowbitsr.config import load_config

        return load_config(self.teacher_cfg_path, self.args.teacher_set)

    def teacher_init(self) -> str:
        """What the quantized runs start from: ``--teacher-from`` or the teacher's run folder."""
        return self.args.teacher_from or str(self.teacher_config().run_dir)

    def load_teacher(self) -> Any:
        from lowbitsr.checkpoint import load_model
        from lowbitsr.pretrained import load_pretrained

        ref = self.teacher_init()
        if ref.startswith("pretrained:"):
            return load_pretrained(ref.split(":", 1)[1]).eval()
        return load_model(Path(ref) / "model" if Path(ref).is_dir() else ref).eval()

    def run_names(self) -> list[tuple[str, int]]:
        """(row, seed) in execution order: seed 0 of every row (``--rows`` order), then seed 1..."""
        rows = list(self.args.rows) if self.args.rows else list(ROWS)  # in the order given
        order: list[tuple[str, int]] = []
        for seed in range(self.args.seeds):
            for r in rows:
                if seed == 0 or ROWS[r]["seeds"]:
                    order.append((r, seed))
        return order

    def qat_config(self, row: str, seed: int) -> Any:
        from lowbitsr.config import ExperimentConfig, apply_overrides, config_to_dict, from_dict

        a = self.args
        teacher = self.teacher_config()
        spec = ROWS[row]
        t = config_to_dict(teacher)
        it = a.iters
        data = copy.deepcopy(t["data"])
        data["train"]["lr_patch"] = a.lr_patch
        quant = copy.deepcopy(spec["quant"])
        if quant["method"] == "ddtb":
            quant["recipe"] = {**quant["recipe"], "gate_stage_iters": max(1, it // 15)}
        if quant["method"] == "granular_dq":
            quant["atc_iterations"] = max(1, it // 10)
        if spec.get("needs") and quant.get("gate") == "random":
            quant["random_probs"] = self.gate_frequencies(seed)
        d = {
            "name": f"{row}_s{seed}",
            "seed": seed,
            "output_root": str(self.runs),
            "model": {**t["model"], "init": self.teacher_init()},
            "data": data,
            "train": {
                "iterations": it,
                "batch_size": a.batch,
                "lr": spec.get("lr", 1e-4),
                "lr_step": max(1, it // 2),
                "lr_gamma": 0.5,
                # Granular-DQ validation runs the tiled controller: validate twice only
                "val_every": max(1, it // (2 if quant["method"] == "granular_dq" else 4)),
                "checkpoint_every": max(1, min(50, it // 6)),
                "num_workers": 0,
            },
            "quant": quant,
        }
        apply_overrides(d, a.set)
        return from_dict(ExperimentConfig, d)

    # ---- Granular-DQ random-gate control ---------------------------------------------------------

    @torch.no_grad()
    def gate_frequencies(self, seed: int) -> list[float]:
        """Fraction of training tiles the learned gate of ``gdq_s<seed>`` sends to each bit."""
        from lowbitsr.checkpoint import load_model
        from lowbitsr.data import build_dataset

        run = self.runs / f"gdq_s{seed}"
        model = load_model(run / "model").eval()
        ctrl = model.controller
        feats: list[torch.Tensor] = []
        hook = ctrl.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
        spec = {k: v for k, v in self.teacher_config().data.train.items() if k in ("type", "root")}
        ds = build_dataset(spec, model.model_config["scale"], "eval")
        t = model.config.tile
        counts = torch.zeros(len(ctrl.gbc_bits))
        try:
            for i in range(len(ds)):
                lr = ds[i]["lr"]
                tiles = (
                    lr.unfold(1, t, t).unfold(2, t, t).permute(1, 2, 0, 3, 4).reshape(-1, 3, t, t)
                )
                for chunk in tiles.split(16):
                    feats.clear()
                    model(chunk)
                    counts += torch.bincount(
                        ctrl.gbc(feats[0]).argmax(1), minlength=len(counts)
                    ).float()
        finally:
            hook.remove()
        probs = [round(float(x), 4) for x in counts / counts.sum()]
        probs[-1] = round(1.0 - sum(probs[:-1]), 4)  # sums to 1 after rounding
        return probs

    def fit_controller(self, row: str, seed: int, run_dir: Path) -> None:
        """``gdq_rd``: refit the controller of the ``gdq`` run of this seed on the train split.

        The tile measurements are kept beside the source model (``rd_tiles_psnr.safetensors``:
        quantization errors, HR weights, GBC descriptors), so rows that differ only in the fit
        reuse them; ``tile_stats`` rows append each tile's statistics to the descriptors.
        """
        from safetensors.torch import load_file, save_file

        from lowbitsr.checkpoint import load_model, save_model
        from lowbitsr.data import build_dataset
        from lowbitsr.quant.granular_dq import (
            TileMeasurements,
            fit_rd_controller,
            measure_images,
            rd_model,
        )
        from lowbitsr.quant.granular_dq.rd import images_tile_statistics

        fit = dict(ROWS[row]["fit"])
        objective = fit.pop("objective", "psnr")
        tile_stats = bool(fit.pop("tile_stats", False))
        image_fab = fit.pop("image_fab", None)
        src_dir = self.runs / f"{ROWS[row]['needs']}_s{seed}"
        src = load_model(src_dir / "model").eval()
        new = rd_model(src, tile_stats)
        spec = {k: v for k, v in self.teacher_config().data.train.items() if k in ("type", "root")}
        ds = build_dataset(spec, src.model_config["scale"], "eval")
        k = src.rgb_range / 255.0
        t0 = time.time()
        # Measured once per source run, with HR weights: the quantization errors do not depend
        # on the objective (MSE: weight 1) and the tile statistics are appended from the images.
        cache = src_dir / "rd_tiles_psnr.safetensors"
        if not cache.is_file() and objective == "mse":
            cache = src_dir / "rd_tiles_mse.safetensors"  # an HR-free measurement, if kept
        if cache.is_file():
            m = TileMeasurements(**load_file(str(cache)))
        else:
            cache = src_dir / "rd_tiles_psnr.safetensors"
            print(f"== {row}_s{seed}: measuring {src_dir.name} on {len(ds)} images", flush=True)
            items = ((ds[i]["lr"] * k, ds[i]["hr"] * k) for i in range(len(ds)))
            m = measure_images(rd_model(src), items, objective="psnr")
            save_file(m.to_tensors(), str(cache))
        if objective == "mse":
            m.weight = torch.ones_like(m.weight)
        if tile_stats:  # each tile's statistics, in the order the tiles were measured
            extra = images_tile_statistics(src, (ds[i]["lr"] * k for i in range(len(ds))))
            m.s = torch.cat([m.s, extra], 1)
        stats = {**fit_rd_controller(new, m, **fit), "objective": objective}
        if image_fab is not None:  # per-image rate control at inference
            new.set_image_fab(float(image_fab))
            stats["image_fab"] = float(image_fab)
        meta = json.loads((src_dir / "model.json").read_text())["meta"]
        run_dir.mkdir(parents=True, exist_ok=True)
        save_model(
            new,
            run_dir / "model",
            meta={
                "step": meta.get("step"),
                "seconds": (meta.get("seconds") or 0.0) + time.time() - t0,
                "best_val_psnr": None,
                "source": str(src_dir),
                "fit": stats,
            },
        )
        print(f"== {row}_s{seed}: {json.dumps(stats)}", flush=True)

    # ---- claiming runs (several workers) ------------------------------------------------------

    def _lock(self, name: str) -> Path:
        return self.runs / f".{name}.lock"

    def claim(self, name: str) -> bool:
        """Take the run for this process (False: another live process holds it)."""
        lock = self._lock(name)
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                alive = pid > 0
                if alive:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        alive = False
                    except PermissionError:
                        pass
                if alive:
                    return False
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # our own stale lock file (its process died)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._lock(name).unlink()

    # ---- training and evaluation ------------------------------------------------------------

    def result_path(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def train_teacher(self) -> None:
        from lowbitsr.train import train

        cfg = self.teacher_config()
        if self.args.teacher_from or (cfg.run_dir / "model.json").is_file():
            return
        if not self.claim("fp"):
            raise SystemExit(f"the teacher {cfg.run_dir} is being trained by another process")
        try:
            print(f"== teacher {cfg.name}", flush=True)
            train(cfg, resume=True, device=self.args.device, progress=not self.args.quiet)
        finally:
            self.release("fp")

    def evaluate_model(self, model: Any, name: str, cfg: Any) -> dict[str, Any]:
        from lowbitsr.data import build_dataset
        from lowbitsr.evaluate import evaluate

        scale = cfg.model.scale
        out: dict[str, Any] = {}
        for key, spec in TEST_SETS.items():
            if spec is None:
                spec = {"type": "folder", "root": self.args.test_root}
            ds = build_dataset(spec, scale, "eval")
            torch.manual_seed(0)  # the random-gate control draws its bits: same draw every run
            res = evaluate(model, ds, scale, model_name=name, progress=False, tile=self.args.tile)
            out[key] = res.to_dict()
        return out

    def write_result(self, name: str, record: dict[str, Any]) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        tmp = self.result_path(name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(self.result_path(name))

    def reference_results(self) -> None:
        """JSON of bicubic and the float teacher (evaluated once)."""
        from lowbitsr.config import config_to_dict
        from lowbitsr.evaluate import Bicubic

        cfg = self.teacher_config()
        if not self.result_path("bicubic").is_file():
            ev = self.evaluate_model(Bicubic(cfg.model.scale), "bicubic", cfg)
            self.write_result("bicubic", {"row": "bicubic", "seed": 0, "eval": ev})
        if not self.result_path("fp").is_file():
            model = self.load_teacher()
            header = {"meta": getattr(model, "meta", None) or {}}
            if not self.args.teacher_from:
                header = json.loads((cfg.run_dir / "model.json").read_text())
            ev = self.evaluate_model(model, "fp", cfg)
            self.write_result(
                "fp",
                {
                    "row": "fp",
                    "seed": cfg.seed,
                    "teacher": self.teacher_init(),
                    "commit": _commit(),
                    "config": config_to_dict(cfg),
                    "train": {
                        k: header["meta"].get(k) for k in ("step", "seconds", "best_val_psnr")
                    },
                    "eval": ev,
                    "fab": 32.0,
                    "gbitops": ev["photos"]["info"].get("gbitops"),
                },
            )

    def run_one(self, row: str, seed: int) -> str:
        """Train and evaluate one run; returns "done", "busy" or "blocked"."""
        from lowbitsr.checkpoint import load_model
        from lowbitsr.config import config_to_dict
        from lowbitsr.train import train

        name = f"{row}_s{seed}"
        if self.result_path(name).is_file():
            return "done"
        need = ROWS[row].get("needs")
        if need and not (self.runs / f"{need}_s{seed}" / "model.json").is_file():
            return "blocked"
        if not self.claim(name):
            return "busy"
        try:
            cfg = self.qat_config(row, seed)
            run_dir = cfg.run_dir
            if not (run_dir / "model.json").is_file():
                if ROWS[row].get("fit"):
                    self.fit_controller(row, seed, run_dir)
                else:
                    print(f"== {name}: {self.args.iters} iterations", flush=True)
                    train(cfg, resume=True, device=self.args.device, progress=not self.args.quiet)
            header = json.loads((run_dir / "model.json").read_text())
            model = load_model(run_dir / "model").eval()
            t0 = time.time()
            ev = self.evaluate_model(model, name, cfg)
            record = {
                "row": row,
                "seed": seed,
                "commit": _commit(),
                "config": config_to_dict(cfg),
                "train": {k: header["meta"].get(k) for k in ("step", "seconds", "best_val_psnr")},
                "eval_seconds": round(time.time() - t0, 1),
                "eval": ev,
                "fab": ev["photos"].get("fab"),
                "gbitops": ev["photos"]["info"].get("gbitops"),
            }
            if "fit" in header["meta"]:  # a refitted controller: how the fit went
                record["fit"] = header["meta"]["fit"]
            self.write_result(name, record)
            p, b = ev["photos"]["psnr"], ev["bundled"]["psnr"]
            print(f"== {name}: photos {p:.3f} dB, bundled {b:.3f} dB", flush=True)
            return "done"
        finally:
            self.release(name)

    def run(self) -> None:
        # import every module a run needs now, so a long campaign keeps one consistent code
        # version even if the source tree changes while it runs
        import lowbitsr.checkpoint
        import lowbitsr.data
        import lowbitsr.evaluate
        import lowbitsr.pretrained
        import lowbitsr.quant
        import lowbitsr.quant.granular_dq
        import lowbitsr.quant.recipes
        import lowbitsr.train  # noqa: F401

        self.train_teacher()
        self.reference_results()
        todo = self.run_names()
        if self.args.worker:
            i, n = self.args.worker
            # each worker starts at its own offset; claims keep two workers off one run
            todo = todo[i::n] + [t for k, t in enumerate(todo) if k % n != i]
        while True:
            states = [self.run_one(r, s) for r, s in todo]
            if all(s == "done" for s in states):
                break
            if all(s in ("busy", "blocked", "done") for s in states):
                if "busy" not in states and "blocked" in states:
                    # a dependency is neither done nor running: nothing left to wait for
                    break
                time.sleep(30)
        print_table(self.results, self.args.json)


# ---- the table ---------------------------------------------------------------------------------


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def _ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, 95 % half-width of the t-interval, n)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    half = _t95(len(v)) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), half, len(v)


def load_results(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for p in sorted(results.glob("*.json")):
        rec = json.loads(p.read_text())
        out.setdefault(rec["row"], {})[int(rec["seed"])] = rec
    return out


def _per_image(rec: dict[str, Any], key: str) -> dict[str, float]:
    return {im["name"]: im["psnr"] for im in rec["eval"][key]["images"]}


def _fmt(mean: float, half: float, sign: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    m = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return m if math.isnan(half) else f"{m} ± {half:.3f}"


def diff(
    res: dict[str, dict[int, dict[str, Any]]], a: str, b: str, key: str
) -> dict[str, Any] | None:
    """Paired difference a − b on test set ``key``: by seed, and by (seed, image)."""
    if a not in res or b not in res:
        return None
    seeds_a, seeds_b = res[a], res[b]
    paired = sorted(set(seeds_a) & set(seeds_b))
    if len(seeds_b) == 1 and len(seeds_a) > 1:
        # a single reference run (float, bicubic, fixed 8-bit): every seed of a against it
        only = next(iter(seeds_b.values()))
        pairs = [(seeds_a[s], only) for s in sorted(seeds_a)]
    elif paired:
        pairs = [(seeds_a[s], seeds_b[s]) for s in paired]
    elif len(seeds_a) == 1 and len(seeds_b) == 1:
        pairs = [(next(iter(seeds_a.values())), next(iter(seeds_b.values())))]
    else:
        return None
    by_seed, by_image = [], []
    for ra, rb in pairs:
        ia, ib = _per_image(ra, key), _per_image(rb, key)
        d = [ia[n] - ib[n] for n in ia if n in ib and math.isfinite(ia[n] - ib[n])]
        by_seed.append(float(np.mean(d)))
        by_image.extend(d)
    m, h, n = _ci(by_seed)
    mi, hi, ni = _ci(by_image)
    return {
        "mean": m,
        "ci95_seed": h,
        "n_seeds": n,
        "ci95_image": hi,
        "n_pairs": ni,
        "excludes_zero_seed": bool(n > 1 and abs(m) > h),
        "excludes_zero_image": bool(ni > 1 and abs(mi) > hi),
    }


def _fmt_fab(fab: float | None, span: list[float] | None) -> str:
    """``5.10`` or, when the seeds differ, ``5.10 (5.00-5.29)``."""
    if fab is None:
        return "-"
    if span is None or span[1] - span[0] < 0.005:
        return f"{fab:.2f}"
    return f"{fab:.2f} ({span[0]:.2f}-{span[1]:.2f})"


def print_table(results: Path, json_out: str | None = None) -> dict[str, Any]:
    from lowbitsr.evaluate import format_table

    res = load_results(results)
    rows = []
    order = ["bicubic", "fp", *ROWS]
    for row in order:
        if row not in res:
            continue
        seeds = res[row]
        entry: dict[str, Any] = {"row": row, "seeds": len(seeds)}
        for key in TEST_SETS:
            m, _, _ = _ci([r["eval"][key]["psnr"] for r in seeds.values()])
            sd = (
                float(np.std([r["eval"][key]["psnr"] for r in seeds.values()], ddof=1))
                if len(seeds) > 1
                else float("nan")
            )
            entry[f"{key}_psnr"] = m
            entry[f"{key}_std"] = sd
            entry[f"{key}_ssim"] = float(np.mean([r["eval"][key]["ssim"] for r in seeds.values()]))
        any_rec = next(iter(seeds.values()))
        for key in ("fab", "gbitops"):  # dynamic rows differ by seed: the mean, and the range
            vals = [r[key] for r in seeds.values() if r.get(key) is not None]
            entry[key] = float(np.mean(vals)) if vals else None
            entry[f"{key}_range"] = [float(min(vals)), float(max(vals))] if vals else None
        entry["iters"] = (any_rec.get("train") or {}).get("step")
        rows.append(entry)
    diffs = []
    for key in TEST_SETS:
        for label, a, b in [
            *DIFFS,
            *[(f"{r} - float", r, "fp") for r in ROWS],
            *[(f"{r} - bicubic", r, "bicubic") for r in ["fp", *ROWS]],
        ]:
            d = diff(res, a, b, key)
            if d is not None:
                diffs.append({"test": key, "difference": label, **d})
    out = {"rows": rows, "differences": diffs}
    table = [
        {
            "row": r["row"],
            "seeds": r["seeds"],
            "photos PSNR": _fmt(r["photos_psnr"], r["photos_std"]),
            "photos SSIM": f"{r['photos_ssim']:.4f}",
            "bundled PSNR": _fmt(r["bundled_psnr"], r["bundled_std"]),
            "FAB": _fmt_fab(r["fab"], r["fab_range"]),
            "GBitOPs": "-"
            if r["gbitops"] is None or math.isnan(r["gbitops"])
            else f"{r['gbitops']:.2f}",
            "iters": r["iters"] or "-",
        }
        for r in rows
    ]
    print(json.dumps(out, indent=1))
    print()
    print(format_table(table))
    print("PSNR: mean ± std over seeds (Y channel, border 4); photos = corpus test split (7),")
    print("bundled = astronaut, chelsea. GBitOPs per 64x64 LR input.")
    print()
    dt = [
        {
            "test": d["test"],
            "difference (dB)": d["difference"],
            "mean": f"{d['mean']:+.3f}",
            "95% CI (seeds)": "-" if math.isnan(d["ci95_seed"]) else f"± {d['ci95_seed']:.3f}",
            "n": d["n_seeds"],
            "95% CI (seed x image)": "-"
            if math.isnan(d["ci95_image"])
            else f"± {d['ci95_image']:.3f}",
            "pairs": d["n_pairs"],
        }
        for d in diffs
    ]
    print(format_table(dt))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def _worker(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    try:
        wi, wn = int(i), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= wi < wn:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: need 0 <= I < N")
    return wi, wn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["run", "table", "plan"], help="run, table or plan")
    p.add_argument(
        "--teacher",
        default=str(ROOT / "configs/photos_edsr_baseline_x4_fp.yaml"),
        help="config of the float teacher (default: %(default)s)",
    )
    p.add_argument(
        "--teacher-from",
        default=None,
        metavar="MODEL",
        help="start every run from this float model (run folder, saved model or "
        "pretrained:NAME) instead of training the teacher",
    )
    p.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="K=V",
        help="override of the teacher config (repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="override applied to every quantized run (repeatable)",
    )
    p.add_argument("--iters", type=int, default=300, help="QAT iterations per run (%(default)s)")
    p.add_argument("--lr-patch", type=int, default=32, help="LR patch side (%(default)s)")
    p.add_argument("--batch", type=int, default=16, help="batch size (%(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of multi-seed rows (%(default)s)")
    p.add_argument(
        "--rows",
        type=lambda s: s.split(","),
        default=None,
        help=f"only these rows (comma-separated; all: {','.join(ROWS)})",
    )
    p.add_argument(
        "--test-root", default="data/photos/test", help="corpus test split folder (%(default)s)"
    )
    p.add_argument("--tile", type=int, default=0, help="evaluation tile, 0 = whole image")
    p.add_argument("--runs", default="runs/campaign", help="run folders (%(default)s)")
    p.add_argument(
        "--results", default=str(ROOT / "results/campaign"), help="result JSON folder (%(default)s)"
    )
    p.add_argument(
        "--worker",
        type=_worker,
        default=None,
        metavar="I/N",
        help="this is worker I of N running the same campaign",
    )
    p.add_argument("--device", default="cpu", help="torch device (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the table's JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rows:
        bad = [r for r in args.rows if r not in ROWS]
        if bad:
            p.error(f"unknown row(s) {', '.join(bad)}; rows: {', '.join(ROWS)}")
    from lowbitsr.errors import LowbitsrError

    camp = Campaign(args)
    try:
        if args.command == "table":
            print_table(Path(args.results), args.json)
        elif args.command == "plan":
            for r, s in camp.run_names():
                cfg_d = {"row": r, "seed": s}
                print(yaml.safe_dump(cfg_d, default_flow_style=True).strip())
        else:
            camp.run()
    except LowbitsrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
