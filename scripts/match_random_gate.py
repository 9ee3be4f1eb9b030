"""Bit frequencies of a trained Granular-DQ gate, for the matched random-gate control.

    python scripts/match_random_gate.py runs/edsr_tiny_x4_gdq
    # -> prints e.g. [0.41, 0.22, 0.37]; then
    lowbitsr quantize configs/edsr_tiny_x4_gdq_random.yaml \\
        --set "quant.random_probs=[0.41,0.22,0.37]"

The learned granularity-bit controller (before E2B) is run on every tile of the training split
(the tile size of the model's config); the printed list is the fraction of tiles it sends to each
of ``gbc_bits``. A random gate drawing from those probabilities, followed by the same E2B, uses
the same bit-widths on average, but ignores the content: the difference in PSNR is what the
learned gate contributes.
"""

from __future__ import annotations

import argparse
import json

import torch

from lowbitsr.checkpoint import load_model
from lowbitsr.data import BundledDataset


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--split", default="train")
    args = p.parse_args()
    model = load_model(args.run).eval()
    ctrl = model.controller
    if ctrl.gbc is None:
        raise SystemExit(f"{args.run}: not a learned-gate Granular-DQ model")
    feats: list[torch.Tensor] = []
    hook = ctrl.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
    scale = model.model_config["scale"]
    ds = BundledDataset(args.split, scale, mode="eval")
    t = model.config.tile
    counts = torch.zeros(len(ctrl.gbc_bits))
    for i in range(len(ds)):
        lr = ds[i]["lr"]
        tiles = lr.unfold(1, t, t).unfold(2, t, t).permute(1, 2, 0, 3, 4).reshape(-1, 3, t, t)
        feats.clear()
        model(tiles)
        counts += torch.bincount(ctrl.gbc(feats[0]).argmax(1), minlength=len(counts)).float()
    hook.remove()
    probs = (counts / counts.sum()).tolist()
    print(
        json.dumps(
            {
                "gbc_bits": list(ctrl.gbc_bits),
                "tiles": int(counts.sum()),
                "random_probs": [round(x, 4) for x in probs],
            }
        )
    )


if __name__ == "__main__":
    main()
