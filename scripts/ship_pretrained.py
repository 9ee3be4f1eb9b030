"""Copy a finished run's selected model into the package's shipped weights.

    python scripts/ship_pretrained.py runs/edsr_tiny_x4_fp [--name edsr_tiny_x4_fp] [--packed]

The run's ``model.safetensors``/``model.json`` (the validation-selected weights) become
``src/lowbitsr/pretrained/<name>.safetensors``/``.json``; the JSON keeps the run's config and
metrics and records the command that trained it, so every shipped file says where it came from.
With ``--packed`` a DDTB/PAMS model ships as bit-packed integer weight codes (``lowbitsr convert``'s
format, a few times smaller; loaded back bit-exactly by ``load_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "src" / "lowbitsr" / "pretrained"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", default=None, help="shipped name (default: the run folder's name)")
    p.add_argument("--packed", action="store_true", help="ship bit-packed weight codes")
    p.add_argument("--made-by", default=None, help="the command that trained it (recorded)")
    args = p.parse_args()
    name = args.name or args.run_dir.name
    header = json.loads((args.run_dir / "model.json").read_text())
    cfg = header["meta"].get("config", {})
    sub = "quantize" if header.get("quant") else "train"
    header["meta"]["made_by"] = (
        args.made_by or f"lowbitsr {sub} configs/{cfg.get('name', name)}.yaml"
    )
    if args.packed:
        from lowbitsr.checkpoint import load_model
        from lowbitsr.deploy.pack import PACKED_FORMAT, save_packed

        save_packed(load_model(args.run_dir / "model"), DEST / f"{name}.safetensors")
        header["format"] = PACKED_FORMAT
    else:
        shutil.copyfile(args.run_dir / "model.safetensors", DEST / f"{name}.safetensors")
    (DEST / f"{name}.json").write_text(json.dumps(header, indent=2) + "\n")
    size = (DEST / f"{name}.safetensors").stat().st_size
    print(
        f"shipped {name}: {size / 1024:.0f} KiB, "
        f"best val PSNR {header['meta'].get('best_val_psnr')}"
    )


if __name__ == "__main__":
    main()
