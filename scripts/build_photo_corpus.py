#!/usr/bin/env python3
"""Build the lowbitsr photo corpus from photographs that ship in Debian packages.

DIV2K cannot be downloaded everywhere; this corpus can be rebuilt on any Debian or Ubuntu machine
that reaches a package mirror. The packages are fetched with ``apt-get download`` at pinned
versions, their sha256 checked, and unpacked with ``dpkg-deb -x`` into a temporary folder (nothing
is installed). Only the photographs listed in ``scripts/photo_corpus.tsv`` are used (vector art
and rendered wallpapers are left out), each checked against the sha256 recorded there.

Each photo is shrunk with lowbitsr's MATLAB-compatible bicubic so that its JPEG 8x8 blocks vanish:
by at least 2x per side and to at most about 1.2 megapixels, then cropped to a multiple of 12
pixels (so x2, x3 and x4 LR images align). The result is::

    OUT/train/<name>.png   (25 photos)
    OUT/val/<name>.png     (3 photos)
    OUT/test/<name>.png    (7 photos)

which the datasets read as ``folder:OUT/train`` etc. (LR images are made on the fly with the same
bicubic). The split is by photo and fixed in the manifest.

Usage::

    python scripts/build_photo_corpus.py --out data/photos [--debs data/debs]

Re-running skips photos already written (and re-checks nothing else); a PNG in ``OUT`` that this
script did not write is never overwritten. ``apt-get update`` must have been run once.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "photo_corpus.tsv"

#: package -> (version, sha256 of the .deb) — Debian 12 "bookworm" main
PACKAGES: dict[str, tuple[str, str]] = {
    "mate-backgrounds": (
        "1.26.0-1",
        "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
    ),
    "lomiri-wallpapers-16.04": (
        "20.04.0-2",
        "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
    ),
    "plasma-workspace-wallpapers": (
        "4:5.27.5-2",
        "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
    ),
}

TARGET_PIXELS = 1.2e6  # about 1-1.5 MP, like DIV2K's 2K images shrunk once
MAX_FACTOR = 0.5  # shrink at least 2x per side so JPEG blocks vanish
MULTIPLE = 12


class CorpusError(Exception):
    """A problem the user can fix; printed as one line."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path = MANIFEST) -> list[dict[str, str]]:
    """Rows ``{name, split, package, path, sha256}`` of the manifest (``#`` lines skipped)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise CorpusError(f"{path}:{n}: expected 5 tab-separated fields, got {len(parts)}")
        name, split, package, rel, digest = parts
        if split not in ("train", "val", "test"):
            raise CorpusError(f"{path}:{n}: split {split!r} is not train, val or test")
        if package not in PACKAGES:
            raise CorpusError(f"{path}:{n}: package {package!r} is not pinned in this script")
        rows.append({"name": name, "split": split, "package": package, "path": rel,
                     "sha256": digest})
    return rows


def _require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        raise CorpusError(
            f"{tool} not found: this script needs Debian's or Ubuntu's apt-get and dpkg-deb "
            "to fetch the photo packages"
        )


def fetch_deb(package: str, debs: Path) -> Path:
    """The pinned ``.deb`` of ``package`` in ``debs`` (downloaded if absent), sha256-checked."""
    version, digest = PACKAGES[package]
    debs.mkdir(parents=True, exist_ok=True)
    found = [p for p in debs.glob(f"{package}_*.deb") if sha256(p) == digest]
    if found:
        return found[0]
    _require_tool("apt-get")
    cmd = ["apt-get", "download", f"{package}={version}"]
    res = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusError(
            f"apt-get download {package}={version} failed ({last}); "
            "run 'apt-get update' once, and check that a Debian 12 mirror is reachable"
        )
    for p in debs.glob(f"{package}_*.deb"):
        if sha256(p) == digest:
            return p
    raise CorpusError(f"{debs}: the downloaded {package} .deb does not have sha256 {digest}")


def shrink(img: np.ndarray) -> np.ndarray:
    """Shrink an ``H x W x 3`` uint8 photo (see the module docstring) with MATLAB bicubic."""
    from lowbitsr.imresize import imresize

    h, w = img.shape[:2]
    factor = min(MAX_FACTOR, math.sqrt(TARGET_PIXELS / (h * w)))
    oh, ow = round(h * factor), round(w * factor)
    out = imresize(img, output_shape=(oh, ow))
    return np.ascontiguousarray(out[: oh - oh % MULTIPLE, : ow - ow % MULTIPLE])


def build(out: Path, debs: Path, *, progress: bool = True) -> dict[str, int]:
    """Write the corpus to ``out``; return the number of photos per split."""
    _require_tool("dpkg-deb")
    rows = read_manifest()
    counts: dict[str, int] = {}
    todo = []
    for r in rows:
        dst = out / r["split"] / f"{r['name']}.png"
        counts[r["split"]] = counts.get(r["split"], 0) + 1
        if dst.exists():
            stamp = dst.with_name(f".{dst.name}.lowbitsr")
            if not stamp.exists():
                raise CorpusError(
                    f"{dst}: exists but was not written by this script; move it away or "
                    "choose another --out"
                )
            continue
        todo.append(r)
    if not todo:
        return counts
    with tempfile.TemporaryDirectory(prefix="lowbitsr-corpus-") as tmp:
        unpacked: dict[str, Path] = {}
        for i, r in enumerate(todo, 1):
            pkg = r["package"]
            if pkg not in unpacked:
                deb = fetch_deb(pkg, debs)
                root = Path(tmp) / pkg
                res = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    raise CorpusError(f"{deb}: dpkg-deb -x failed: {res.stderr.strip()}")
                unpacked[pkg] = root
            src = unpacked[pkg] / r["path"]
            if not src.is_file():
                raise CorpusError(f"{src}: listed in {MANIFEST.name} but not in {pkg}")
            if sha256(src) != r["sha256"]:
                raise CorpusError(f"{src}: sha256 differs from {MANIFEST.name}")
            with Image.open(src) as im:
                img = np.asarray(im.convert("RGB"))
            hr = shrink(img)
            dst = out / r["split"] / f"{r['name']}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp_png = dst.with_name(f".{dst.name}.tmp")
            Image.fromarray(hr).save(tmp_png, format="PNG")
            dst.with_name(f".{dst.name}.lowbitsr").write_text(r["sha256"] + "\n")
            tmp_png.replace(dst)
            if progress:
                print(f"[{i}/{len(todo)}] {r['split']}/{dst.name} {hr.shape[1]}x{hr.shape[0]}",
                      flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/photos"),
                    help="output folder (default: data/photos)")
    ap.add_argument("--debs", type=Path, default=Path("data/debs"),
                    help="where the .deb files are kept (default: data/debs)")
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args(argv)
    try:
        counts = build(args.out, args.debs, progress=not args.quiet)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"photo corpus in {args.out}: {summary} "
          f"(use folder:{args.out}/train, folder:{args.out}/val, folder:{args.out}/test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
