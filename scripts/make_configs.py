"""Write the QAT experiment configs in configs/ (the paper recipes and the reduced CPU recipe).

    python scripts/make_configs.py

Paper recipe (docs/methods.md §1.6): DIV2K, batch 16, 1000 iterations per epoch, 60 epochs
(PAMS: 30), Adam lr 1e-4 (bounds 1e-2), StepLR every 10 epochs x0.5, calibration then 4 epochs
of first stage.
Validation is on DIV2K 791-800 (held out of training), never on a benchmark.
Reduced recipe: the demo network (edsr_tiny) x4 on the bundled photos, a few minutes per run on
2 CPU cores; every row of the RESULTS.md quality table uses the same budget.
"""

from __future__ import annotations

from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "configs"

# arch -> (float model name, scales, lr_patch per scale, FP init file hint)
PAPER_ARCHS = {
    "edsr_baseline": {2: 48, 4: 48},
    "rdn": {2: 32, 4: 24},
    "srresnet": {2: 48, 4: 48},
}


def paper_config(arch: str, scale: int, method: str, bits: int) -> dict:
    epochs = 60 if method == "ddtb" else 30
    quant: dict = {"method": method, "bits": bits}
    recipe = {"bound_lr": 1.0e-2, "kd_weight": 1000.0, "calib_batches": 1}
    if method == "ddtb":
        recipe["gate_stage_iters"] = 4000
    quant["recipe"] = recipe
    return {
        "name": f"{arch}_x{scale}_{method}_w{bits}a{bits}",
        "seed": 0,
        "output_root": "runs",
        "model": {
            "name": arch,
            "scale": scale,
            "init": None,  # a float checkpoint: --set model.init=PATH
        },
        "data": {
            "train": {
                "type": "div2k",
                "root": "/path/to/DIV2K",
                "split": "train",
                "index_range": [1, 790],
                "lr_patch": PAPER_ARCHS[arch][scale],
                "repeat": 20,
            },
            "val": {
                "type": "div2k",
                "root": "/path/to/DIV2K",
                "split": "train",
                "index_range": [791, 800],
            },
        },
        "train": {
            "iterations": epochs * 1000,
            "batch_size": 16,
            "lr": 1.0e-4,
            "lr_step": 10000,
            "lr_gamma": 0.5,
            "val_every": 1000,
            "checkpoint_every": 1000,
            "num_workers": 4,
        },
        "quant": quant,
    }


ITERS = 300  # reduced budget: every CPU-table row trains this many iterations


def cpu_config(method: str, bits: int, gates: bool = True) -> dict:
    iters = ITERS
    quant: dict = {"method": method, "bits": bits}
    recipe = {"bound_lr": 1.0e-2, "kd_weight": 1000.0, "calib_batches": 1}
    suffix = ""
    if method == "ddtb":
        recipe["gate_stage_iters"] = iters // 5
        if not gates:
            quant["dynamic_ratio"] = 0.0
            suffix = "_nogate"
    quant["recipe"] = recipe
    return {
        "name": f"edsr_tiny_x4_{method}{suffix}_w{bits}a{bits}",
        "seed": 0,
        "output_root": "runs",
        "model": {"name": "edsr_tiny", "scale": 4, "init": "pretrained:edsr_tiny_x4_fp"},
        "data": {
            "train": {"type": "bundled", "split": "train", "lr_patch": 32, "repeat": 200},
            "val": {"type": "bundled", "split": "valid"},
        },
        "train": {
            "iterations": iters,
            "batch_size": 16,
            "lr": 1.0e-4,
            "lr_step": iters // 2,
            "lr_gamma": 0.5,
            "val_every": 50,
            "checkpoint_every": 50,
        },
        "quant": quant,
    }


def gdq_paper_config(arch: str, scale: int) -> dict:
    """Granular-DQ paper recipe (docs/methods.md §2.4): L1 only, LR crop 48, batch 16, 300K
    iterations, lr 2e-4 halved at 250K; entropy thresholds built from the training set at
    start-up."""
    cfg = paper_config(arch, scale, "ddtb", 2)
    cfg["name"] = f"{arch}_x{scale}_gdq"
    cfg["data"]["train"]["lr_patch"] = 48
    cfg["train"].update(
        {
            "iterations": 300_000,
            "lr": 2.0e-4,
            "lr_step": 250_000,
            "val_every": 5000,
            "checkpoint_every": 5000,
        }
    )
    cfg["quant"] = {"method": "granular_dq"}
    return cfg


def gdq_cpu_config(variant: str) -> dict:
    """Reduced Granular-DQ recipe: same budget as the DDTB CPU table, plus the baselines."""
    cfg = cpu_config("ddtb", 2)
    quant: dict = {"method": "granular_dq", "atc_iterations": ITERS // 10}
    if variant.startswith("w8a"):  # fixed-bit baseline with the same quantizers, no gate
        quant.update({"gate": "fixed", "fixed_bits": int(variant[3:]), "use_e2b": False})
    elif variant == "random":
        # the control the paper did not run: a random gate whose bit frequencies are those the
        # learned gate picked (bench/gdq_table.py measures them), then the same E2B
        quant.update({"gate": "random", "random_probs": [0.34, 0.33, 0.33]})
    name = "gdq" if variant == "learned" else f"gdq_{variant}"
    cfg["name"] = f"edsr_tiny_x4_{name}"
    cfg["train"]["lr"] = 2.0e-4
    cfg["quant"] = quant
    return cfg


def write(cfg: dict, header: str) -> None:
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)
    (OUT / f"{cfg['name']}.yaml").write_text(header + text)


def main() -> None:
    paper = "# Paper recipe (docs/methods.md §1.6); "
    paper += "set the DIV2K root and the float init checkpoint:\n"
    paper += "#   lowbitsr quantize configs/{name}.yaml --set data.train.root=... "
    paper += "--set data.val.root=... --set model.init=...\n"
    for arch, scales in PAPER_ARCHS.items():
        for scale in scales:
            for method in ("ddtb", "pams"):
                for bits in (2, 3, 4):
                    cfg = paper_config(arch, scale, method, bits)
                    write(cfg, paper.replace("{name}", cfg["name"]))
    cpu = "# Reduced CPU recipe (bundled photos, edsr_tiny x4):\n"
    cpu += "#   lowbitsr quantize configs/{name}.yaml\n"
    for method in ("ddtb", "pams"):
        for bits in (2, 3, 4):
            cfg = cpu_config(method, bits)
            write(cfg, cpu.replace("{name}", cfg["name"]))
    cfg = cpu_config("ddtb", 2, gates=False)
    write(cfg, cpu.replace("{name}", cfg["name"]) + "# Ablation: DDTB without dynamic gates.\n")
    for arch, scales in PAPER_ARCHS.items():
        for scale in scales:
            cfg = gdq_paper_config(arch, scale)
            write(cfg, paper.replace("{name}", cfg["name"]).replace("§1.6", "§2.4"))
    for variant in ("learned", "random", "w8a4", "w8a6", "w8a8"):
        cfg = gdq_cpu_config(variant)
        write(cfg, cpu.replace("{name}", cfg["name"]))


if __name__ == "__main__":
    main()
