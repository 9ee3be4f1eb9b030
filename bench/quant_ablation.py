"""Where a DDTB/PAMS model loses against float: evaluate it with groups of quantizers switched off.

Not a test. Loads one trained DDTB or PAMS model and evaluates it on a test set as is, then with
one group of quantizers turned into the identity at a time (the trained weights, bounds and gates
unchanged), and with everything off (the QAT-trained float weights):

- ``weights``: every weight quantizer (``QuantConv2d.enabled = False``: float weights);
- ``acts``: every activation quantizer;
- one group per quantizer role (EDSR residual blocks): ``quant_act1`` (the block input on the
  skip path: the residual stream), ``quant_act2`` (conv2's input), ``quant_act3`` (the residual
  branch's output), and the others (upsampler/tail in the integer layout);
- with ``--per-block``: every block's quantizers (activations and weights) off, one block at a time.

``recovered`` is the PSNR gained by switching a group off, against ``all off`` (the loss of the
quantizers as a whole). Groups interact: the amounts need not add up, and switching off one group
can lose (the others were trained around it). PSNR: Y channel, ``scale`` border, whole images.

    python bench/quant_ablation.py runs/campaign/ddtb_w4a4_s0 --json out/ablation.json
    python bench/quant_ablation.py edsr_baseline_x4_ddtb_w2a2 --data bundled:test --per-block

``--ptq BITS`` instead quantizes the given *float* model (``--method ddtb`` or ``pams``, no
gates) and calibrates it on ``--calib-batches`` random batches of LR patches from ``--calib``
(the training split), with no training: what the quantizers cost before QAT::

    python bench/quant_ablation.py runs/photos_edsr_baseline_x4_fp --ptq 4 --json ptq.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbitsr.evaluate import evaluate, format_table
from lowbitsr.quant import quantized_convs, quantizers


def _switch(modules: Iterable[nn.Module], on: bool) -> None:
    for m in modules:
        m.enabled = on


def groups(model: nn.Module, per_block: bool) -> dict[str, list[nn.Module]]:
    """Group name -> quantizer modules (activation and/or weight) to switch off together."""
    acts, convs = quantizers(model), quantized_convs(model)
    out: dict[str, list[nn.Module]] = {
        "weights": [m for _, m in convs],
        "acts": [m for _, m in acts],
    }
    for name, m in acts:
        role = name.rsplit(".", 1)[-1]
        key = role if re.fullmatch(r"quant_act[123]", role) else "other acts"
        out.setdefault(key, []).append(m)
    if per_block:
        for name, m in [*acts, *convs]:
            hit = re.search(r"body\.(\d+)\.", name)
            if hit and re.search(r"quant_act\d$|body\.[02]$", name):
                out.setdefault(f"block {int(hit.group(1)):02d}", []).append(m)
    out["all off"] = out["weights"] + out["acts"]
    return out


def post_training(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``model`` (float) quantized at ``args.ptq`` bits and calibrated, never trained."""
    from torch.utils.data import DataLoader

    from lowbitsr.data import build_dataset
    from lowbitsr.errors import LowbitsrError
    from lowbitsr.quant import calibrate, quantize
    from lowbitsr.quant.apply import config_from_dict
    from lowbitsr.specs import parse_dataset_spec

    if quantizers(model):
        raise LowbitsrError(f"{args.model}: --ptq takes a float model, this one is quantized")
    cfg: dict[str, Any] = {"method": args.method, "bits": args.ptq}
    if args.method == "ddtb":
        cfg.update(dynamic_ratio=0.0, calib_percentile=args.percentile)
    q = quantize(model, config_from_dict(cfg))
    spec = {**parse_dataset_spec(args.calib), "lr_patch": 32, "repeat": 1}
    ds = build_dataset(spec, int(model.model_config["scale"]), "train")
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(ds, batch_size=16, shuffle=True, generator=gen)
    batches = [b["lr"] for _, b in zip(range(args.calib_batches), loader, strict=False)]
    calibrate(q, batches)
    return q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="DDTB/PAMS model: run folder, saved model or pretrained name")
    p.add_argument("--data", default="folder:data/photos/test", help="dataset spec")
    p.add_argument("--per-block", action="store_true", help="also switch off one block at a time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the JSON record here")
    p.add_argument("--ptq", type=int, default=None, metavar="BITS", help="quantize a float model")
    p.add_argument("--method", default="ddtb", choices=["ddtb", "pams"], help="with --ptq")
    p.add_argument("--percentile", type=float, default=None, help="DDTB bound init (--ptq)")
    p.add_argument("--calib", default="folder:data/photos/train", help="--ptq calibration data")
    p.add_argument("--calib-batches", type=int, default=4, help="--ptq: batches of 16 patches")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lowbitsr.data import build_dataset
    from lowbitsr.errors import LowbitsrError
    from lowbitsr.specs import load_any_model, parse_dataset_spec

    try:
        model, _ = load_any_model(args.model)
        if args.ptq is not None:
            model = post_training(model, args)
        if not quantizers(model):
            raise LowbitsrError(f"{args.model}: no DDTB/PAMS activation quantizers in this model")
        scale = int(model.model_config["scale"])
        ds = build_dataset(parse_dataset_spec(args.data), scale, "eval")
    except LowbitsrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()

    def score(tag: str) -> float:
        torch.manual_seed(0)
        res = evaluate(model, ds, scale, model_name=tag, progress=False, tile=0)
        return float(res.to_dict()["psnr"])

    base = score("as is")
    table: dict[str, dict[str, Any]] = {"as is": {"psnr": base, "n": 0}}
    for name, mods in groups(model, args.per_block).items():
        _switch(mods, False)
        try:
            table[name] = {"psnr": score(name), "n": len(mods)}
        finally:
            _switch(mods, True)
        print(f"{name}: {table[name]['psnr']:.3f}", file=sys.stderr)
    record: dict[str, Any] = {"model": args.model, "data": args.data, "psnr": table}
    if args.ptq is not None:
        record["ptq"] = {
            "bits": args.ptq,
            "method": args.method,
            "percentile": args.percentile,
            "calib": args.calib,
            "calib_batches": args.calib_batches,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    rows = [
        {
            "switched off": k,
            "quantizers": v["n"],
            "PSNR": f"{v['psnr']:.3f}",
            "recovered": f"{v['psnr'] - base:+.3f}",
        }
        for k, v in table.items()
    ]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
