"""Worker for tests/test_distributed.py, launched as
``torchrun --standalone --nproc_per_node=N tests/dist_worker.py OUT_DIR SCENARIO...``.

Also importable in a single process (``run_scenario``) to produce the reference results with the
same code. Each scenario writes ``<out>/<scenario>/rank<r>.safetensors`` (weights after training
and the gradients of the last step, prefixed ``w.`` and ``g.``) and ``rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbitsr.config import load_config
from lowbitsr.distributed import context, init_from_env
from lowbitsr.errors import LowbitsrError
from lowbitsr.train import FloatRecipe, train

COMMON = [
    "seed=3",
    "data.val=null",
    "data.train={type: bundled, split: train, lr_patch: 12}",
    "train.batch_size=4",
    "train.iterations=2",
    "train.lr=1e-4",
    "train.checkpoint_every=100",
]

SCENARIOS: dict[str, list[str]] = {
    # plain float training
    "float": ["model.name=edsr_tiny", "model.scale=2"],
    # SRResNet has BatchNorm: synchronised across ranks
    "bn": [
        "model.name=srresnet",
        "model.scale=2",
        "model.overrides={n_feats: 8, n_resblocks: 2}",
    ],
    # DDTB QAT: calibration on rank 0 broadcast to rank 1; gates on from step 1
    "ddtb": [
        "model.name=edsr_tiny",
        "model.scale=4",
        "model.init=pretrained:edsr_tiny_x4_fp",
        "quant={method: ddtb, bits: 2, recipe: {gate_stage_iters: 1}}",
        "data.train={type: bundled, split: train, lr_patch: 16}",
    ],
    # Granular-DQ: entropy table + LSQ init on rank 0, broadcast; per-rank Gumbel noise
    "gdq": [
        "model.name=edsr_tiny",
        "model.scale=4",
        "model.init=pretrained:edsr_tiny_x4_fp",
        "quant={method: granular_dq}",
        "data.train={type: bundled, split: train, lr_patch: 16}",
    ],
    # a NaN loss on the last rank only must stop every rank (no hang)
    "nan": ["model.name=edsr_tiny", "model.scale=2", "train.max_nonfinite=2"],
}


def _capture(base: type) -> type:
    class Capturing(base):  # type: ignore[misc, valid-type]
        def prepare(self, model, batches, resume_state=None):  # type: ignore[no-untyped-def]
            self.model = super().prepare(model, batches, resume_state)
            return self.model

        def loss(self, model, batch, step):  # type: ignore[no-untyped-def]
            loss, logs = super().loss(model, batch, step)
            ctx = context()
            if self.nan_last_rank and ctx.rank == ctx.world_size - 1:
                loss = loss * float("nan")
            return loss, logs

    return Capturing


def run_scenario(name: str, out: Path) -> dict[str, Any]:
    """Run one scenario in this process (single-process or as one rank); write its outputs."""
    ctx = context()
    where = [f"output_root={out / 'runs'}", f"name={name}_w{ctx.world_size}"]
    cfg = load_config(None, [*COMMON, *SCENARIOS[name], *where])
    if cfg.quant and cfg.quant["method"] == "granular_dq":
        from lowbitsr.quant.granular_dq import GranularDQRecipe

        recipe = _capture(GranularDQRecipe)(cfg)
    elif cfg.quant:
        from lowbitsr.quant.recipes import QATRecipe

        recipe = _capture(QATRecipe)(cfg)
    else:
        recipe = _capture(FloatRecipe)(cfg)
    recipe.nan_last_rank = name == "nan" and ctx.world_size > 1
    info: dict[str, Any] = {"rank": ctx.rank, "world": ctx.world_size}
    try:
        res = train(cfg, progress=False, recipe=recipe)
        info["step"] = res.step
    except LowbitsrError as exc:
        info["error"] = str(exc)
        if name != "nan":
            raise
    model = recipe.model
    tensors = {f"w.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"g.{k}"] = p.grad.detach().clone().contiguous()
    info["recipe_state"] = recipe.state()
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / f"rank{ctx.rank}_w{ctx.world_size}.safetensors"))
    (d / f"rank{ctx.rank}_w{ctx.world_size}.json").write_text(json.dumps(info))
    return info


def run_eval(out: Path) -> None:
    """Evaluate a shipped model on a 3-image folder (uneven split over 2 ranks)."""
    from lowbitsr.data import build_dataset
    from lowbitsr.evaluate import evaluate
    from lowbitsr.pretrained import load_pretrained

    ctx = context()
    ds = build_dataset({"type": "folder", "root": str(out / "eval_images")}, 2, "eval")
    res = evaluate(load_pretrained("edsr_tiny_x2_fp"), ds, 2, progress=False)
    d = out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{ctx.rank}_w{ctx.world_size}.json").write_text(json.dumps(res.to_dict()))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    init_from_env("cpu")
    out = Path(argv[0])
    for name in argv[1:]:
        if name == "eval":
            run_eval(out)
        else:
            run_scenario(name, out)


if __name__ == "__main__":
    main(sys.argv[1:])
