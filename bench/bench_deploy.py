"""Benchmark: deployment artifacts — size on disk, CPU latency, peak memory, BitOPs, parity.

Not a test. Everything is measured side by side in one run:

- **size**: the bit-packed integer artifact (:func:`lowbitsr.deploy.save_packed`) at 2/3/4 bits
  vs the float32 safetensors of the same network, whole file and body-only (the quantized convs'
  packed codes + scale/zero point vs their float32 weights);
- **latency** (median wall time of ``--repeats`` runs after one warm-up; one run for the big
  tiled workloads) and **peak memory** for PyTorch FP32, PyTorch fake-quant, onnxruntime FP32 and
  onnxruntime integer (QCDQ + QLinearConv) on an LR input of 256×256 (×scale, whole image) and a
  4K output (960×540 LR ×4, tiled); each (backend, workload) runs in **its own subprocess**, whose
  peak memory is the resident-set high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  (``VmHWM`` of /proc/self/status, i.e. ``ru_maxrss`` without the forked parent's pages; it
  includes the interpreter, torch/onnxruntime and the model: ``base_mb`` is the RSS after
  loading, before the workload);
- a check that a 1000×1000 LR image upscaled ×4 with tiling (256 LR px, overlap 16) stays under
  2 GB peak RSS (onnxruntime integer and PyTorch fake-quant);
- **BitOPs** per 256×256 LR input (:func:`lowbitsr.quant.bitops.count_bitops`);
- **parity** of each ONNX export with its PyTorch model (max abs diff, PSNR) and onnxruntime's
  fused op counts, plus the **quality** (PSNR/Y vs HR on the bundled test photos) of every
  backend, so the integer path's numerical change is visible in image terms.

Prints one JSON record, then Markdown tables.

    python bench/bench_deploy.py                    # edsr_tiny_x4 DDTB w4a4 (shipped or built)
    python bench/bench_deploy.py --quick
    python bench/bench_deploy.py --model runs/x/model.json
    python bench/bench_deploy.py --arch edsr_baseline   # random weights: size, speed, BitOPs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbitsr.checkpoint import load_model, save_model
from lowbitsr.deploy import export_onnx, load_packed, save_packed, size_report
from lowbitsr.evaluate import format_table
from lowbitsr.models import create_model
from lowbitsr.pretrained import list_pretrained, load_pretrained
from lowbitsr.quant import (
    DDTBConfig,
    calibrate,
    config_from_dict,
    dequantize,
    quantize,
    set_gates_applied,
)
from lowbitsr.quant.bitops import count_bitops

SHIPPED_DEFAULT = "edsr_tiny_x4_ddtb_w4a4"
BACKENDS = ("torch_fp32", "torch_fakequant", "ort_fp32", "ort_int")
WORKLOADS: dict[str, dict[str, int]] = {
    # name: LR height/width, tile (0 = whole image), overlap
    "256": {"h": 256, "w": 256, "tile": 0, "overlap": 0},
    "4k": {"h": 540, "w": 960, "tile": 256, "overlap": 16},
    "1000": {"h": 1000, "w": 1000, "tile": 256, "overlap": 16},
    "128": {"h": 128, "w": 128, "tile": 0, "overlap": 0},
}
PEAK_LIMIT_MB = 2048.0


# ----------------------------------------------------------------------------------- inputs
def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic natural-ish uint8 H×W×3 image: bicubic-upsampled noise plus grain."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    img = 0.85 * up + 0.15 * torch.rand(1, 3, h, w, generator=g)
    return (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def calibration_batches(scale: int, n: int = 4) -> list[torch.Tensor]:
    """LR patches from the bundled training photos (smooth synthetic images as a fallback)."""
    try:
        from lowbitsr.data import BundledDataset

        ds = BundledDataset("train", scale, lr_patch=48, seed=0)
        return [
            torch.stack([ds[i % len(ds)]["lr"] for i in range(4 * j, 4 * j + 4)]) for j in range(n)
        ]
    except Exception:  # scikit-image data missing: synthetic
        imgs = [smooth_image(48, 48, s) for s in range(4 * n)]
        t = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        return list(t.split(4))


# ----------------------------------------------------------------------------------- models
def build_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, str]:
    """``(float model, quantized model, description)``; both eval, CPU."""
    if args.arch:
        torch.manual_seed(0)
        fp = create_model(args.arch, scale=args.scale).eval()
        q = quantize(fp, DDTBConfig(bits=args.bits))
        calibrate(q, calibration_batches(args.scale, 1))
        set_gates_applied(q, True)
        return (
            fp,
            q.eval(),
            f"{args.arch} x{args.scale}, random weights, DDTB w{args.bits}a{args.bits}",
        )
    name = args.model or (SHIPPED_DEFAULT if SHIPPED_DEFAULT in list_pretrained() else None)
    if name is None:
        fp = load_pretrained("edsr_tiny_x4_fp").eval()
        q = quantize(fp, DDTBConfig(bits=args.bits))
        calibrate(q, calibration_batches(4))
        set_gates_applied(q, True)
        desc = (
            f"edsr_tiny_x4_fp -> DDTB w{args.bits}a{args.bits}, calibrated (not QAT-trained, "
            f"{SHIPPED_DEFAULT} is not shipped yet)"
        )
        return fp, q.eval(), desc
    if name in list_pretrained():
        q = load_pretrained(name)
    elif str(name).endswith(".safetensors") and _is_packed(Path(name)):
        q = load_packed(name)
    else:
        q = load_model(name)
    if getattr(q, "quant_config_dict", None) is None:
        raise SystemExit(f"{name}: a float model; pass a DDTB/PAMS quantized model")
    fp = dequantize(q).eval()
    return fp, q.eval(), str(name)


def _is_packed(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format") == "lowbitsr-packed"


# ----------------------------------------------------------------------------------- worker
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (backend, workload) in this process; latency and ru_maxrss."""
    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    wl = spec["workload"]
    backend = spec["backend"]
    if backend.startswith("ort"):
        from lowbitsr.deploy import OnnxSR, upscale_image_onnx

        sess = OnnxSR(spec["onnx"], threads=threads)

        def run(img: np.ndarray) -> np.ndarray:
            return upscale_image_onnx(sess, img, tile=wl["tile"], overlap=wl["overlap"])

    else:
        from lowbitsr.evaluate import upscale_image

        model = (
            load_packed(spec["packed"]) if backend == "torch_fakequant" else load_model(spec["fp"])
        )
        scale = int(model.model_config["scale"])

        def run(img: np.ndarray) -> np.ndarray:
            return upscale_image(model, img, scale, tile=wl["tile"], overlap=wl["overlap"])

    img = smooth_image(wl["h"], wl["w"], seed=1)
    base_mb = _rss_now_mb()
    times = []
    warmup = int(spec["warmup"])
    for i in range(warmup + int(spec["repeats"])):
        t0 = time.perf_counter()
        out = run(img)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    peak_mb = _peak_rss_mb()
    return {
        "backend": backend,
        "workload": spec["workload_name"],
        "lr": [wl["h"], wl["w"]],
        "out": list(out.shape),
        "tile": wl["tile"],
        "median_s": statistics.median(times),
        "times_s": times,
        "base_mb": base_mb,
        "peak_mb": peak_mb,
    }


def _peak_rss_mb() -> float:
    """This process's resident-set high-water mark (MB): ``VmHWM`` of /proc/self/status, which
    starts afresh at exec, unlike ``ru_maxrss`` (that one also counts the forked copy of the
    parent before exec). Falls back to ``ru_maxrss`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            f"worker {spec['backend']}/{spec['workload_name']} failed:\n{res.stderr}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- quality
def quality(models: dict[str, Any], scale: int, threads: int) -> dict[str, float]:
    """Mean PSNR (Y, border = scale) on the bundled test photos for every backend."""
    from lowbitsr.data import BundledDataset
    from lowbitsr.deploy import OnnxSR, upscale_image_onnx
    from lowbitsr.evaluate import upscale_image
    from lowbitsr.metrics import psnr

    ds = BundledDataset("test", scale)
    scores: dict[str, list[float]] = {k: [] for k in models}
    for i in range(len(ds)):
        item = ds[i]
        lr8 = item["lr"].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        hr8 = item["hr"].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        for key, m in models.items():
            if isinstance(m, (str, Path)):
                sr8 = upscale_image_onnx(OnnxSR(m, threads=threads), lr8)
            else:
                sr8 = upscale_image(m, lr8, scale)
            scores[key].append(psnr(sr8, hr8, crop_border=scale))
    return {k: float(np.mean(v)) for k, v in scores.items()}


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", help="saved model (folder/.json/.safetensors), packed file or shipped name"
    )
    ap.add_argument(
        "--arch", help="build this architecture with random weights (e.g. edsr_baseline)"
    )
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4, help="bit-width of built models")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the small workload")
    ap.add_argument("--workloads", help="comma list of 256,4k,1000,128 (default depends on model)")
    ap.add_argument("--quick", action="store_true", help="128x128 + the 1000x1000 check only")
    ap.add_argument("--json", type=Path, help="also write the JSON record here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    fp, q, desc = build_models(args)
    scale = int(q.model_config["scale"])
    if args.workloads:
        workloads = args.workloads.split(",")
    elif args.quick:
        workloads = ["128", "1000"]
    elif args.arch and args.arch != "edsr_tiny":
        workloads = ["256"]
    else:
        workloads = ["256", "4k", "1000"]
    record: dict[str, Any] = {
        "model": desc,
        "quant": q.quant_config_dict,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
    }

    # ---- sizes: the model itself, then the same float network packed at 2/3/4 bits
    sizes = []
    cfg = config_from_dict(q.quant_config_dict)
    for bits in (2, 3, 4):
        if getattr(cfg, "bits", None) == bits:
            m = q
        else:
            m = quantize(fp, type(cfg)(bits=bits))
            calibrate(m, calibration_batches(scale, 1))
        r = size_report(m)
        sizes.append({"bits": bits, **r, "body_x_smaller": 1 / r["body_ratio"]})
    record["size"] = sizes

    # ---- BitOPs per 256x256 LR (counted at 64x64; conv MACs are linear in H*W)
    record["bitops_256"] = {
        "fp32_gbitops": count_bitops(fp, (1, 3, 64, 64))["gbitops"] * 16,
        "quant_gbitops": count_bitops(q, (1, 3, 64, 64))["gbitops"] * 16,
    }

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_model(fp, d / "fp")
        save_packed(q, d / "q")
        onnx_fp = export_onnx(fp, d / "fp.onnx")
        onnx_int = export_onnx(q, d / "q_int.onnx")
        onnx_flt = export_onnx(q, d / "q_float.onnx", integer_convs=False)
        record["onnx"] = {
            name: {
                "parity": r.parity,
                "optimized_ops": r.optimized_ops,
                "qcdq_quantizers": len(r.qcdq_quantizers),
                "float_quantizers": len(r.float_quantizers),
                "integer_convs": len(r.fusable_convs),
                "file_bytes": Path(r.path).stat().st_size,
            }
            for name, r in (
                ("ort_fp32", onnx_fp),
                ("ort_int", onnx_int),
                ("ort_qdq_float", onnx_flt),
            )
        }
        if not args.arch:
            record["quality_psnr_y"] = quality(
                {
                    "torch_fp32": fp,
                    "torch_fakequant": q,
                    "ort_fp32": d / "fp.onnx",
                    "ort_int": d / "q_int.onnx",
                    "ort_qdq_float": d / "q_float.onnx",
                },
                scale,
                args.threads,
            )

        # ---- latency and peak memory, one subprocess per (backend, workload)
        runs = []
        for wname in workloads:
            wl = WORKLOADS[wname]
            big = wl["tile"] > 0
            if wname == "1000":
                backends = (
                    ("ort_int",) if args.quick or args.arch else ("ort_int", "torch_fakequant")
                )
            else:
                backends = BACKENDS
            for backend in backends:
                spec = {
                    "backend": backend,
                    "workload": wl,
                    "workload_name": wname,
                    "threads": args.threads,
                    "warmup": 0 if big else 1,
                    "repeats": 1 if big else args.repeats,
                    "fp": str(d / "fp.json"),
                    "packed": str(d / "q.safetensors"),
                    "onnx": str(d / ("fp.onnx" if backend == "ort_fp32" else "q_int.onnx")),
                }
                runs.append(run_worker(spec))
                print(
                    f"  {wname:>5} {backend:<16} {runs[-1]['median_s']:8.3f} s  "
                    f"peak {runs[-1]['peak_mb']:7.0f} MB",
                    file=sys.stderr,
                )
        record["runs"] = runs
    check = [r for r in runs if r["workload"] == "1000"]
    if check:
        record["check_1000x1000_tiled"] = {
            "peak_mb": {r["backend"]: r["peak_mb"] for r in check},
            "limit_mb": PEAK_LIMIT_MB,
            "ok": all(r["peak_mb"] < PEAK_LIMIT_MB for r in check),
        }
    record["bench_seconds"] = time.perf_counter() - t_start

    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    print_tables(record)


def print_tables(record: dict[str, Any]) -> None:
    print(f"\n### {record['model']}\n")
    print(
        format_table(
            [
                {
                    "bits": s["bits"],
                    "packed KB": s["packed_bytes"] / 1024,
                    "fp32 KB": s["fp32_bytes"] / 1024,
                    "file ratio": s["ratio"],
                    "body packed KB": s["body_packed_bytes"] / 1024,
                    "body fp32 KB": s["body_fp32_bytes"] / 1024,
                    "body ratio": f"1/{s['body_x_smaller']:.2f}",
                }
                for s in record["size"]
            ]
        )
    )
    print()
    rows = []
    by = {(r["workload"], r["backend"]): r for r in record["runs"]}
    for (wname, backend), r in by.items():
        ref = by.get((wname, "torch_fp32"))
        rows.append(
            {
                "workload": f"{r['lr'][0]}x{r['lr'][1]} LR"
                + (f" tile {r['tile']}" if r["tile"] else ""),
                "backend": backend,
                "median s": r["median_s"],
                "vs torch fp32": (ref["median_s"] / r["median_s"]) if ref else float("nan"),
                "base MB": r["base_mb"],
                "peak MB": r["peak_mb"],
            }
        )
    print(format_table(rows))
    print()
    rows = []
    for name, o in record["onnx"].items():
        fused = {k.split(":")[-1]: v for k, v in o["optimized_ops"].items() if "QLinear" in k}
        rows.append(
            {
                "export": name,
                "max abs diff": max(p["max_abs_diff"] for p in o["parity"]),
                "PSNR ort vs torch": min(p["psnr"] for p in o["parity"]),
                "QCDQ acts": o["qcdq_quantizers"],
                "float-op acts": o["float_quantizers"],
                "fused": json.dumps(fused) if fused else "-",
                "PSNR/Y vs HR": record.get("quality_psnr_y", {}).get(name, float("nan")),
            }
        )
    print(format_table(rows))
    b = record["bitops_256"]
    q = record.get("quality_psnr_y", {})
    print(
        f"\nBitOPs per 256x256 LR: fp32 {b['fp32_gbitops']:.1f} G, quantized "
        f"{b['quant_gbitops']:.1f} G ({b['fp32_gbitops'] / b['quant_gbitops']:.2f}x fewer)"
    )
    if q:
        print(
            f"PSNR/Y on bundled test: torch fp32 {q['torch_fp32']:.2f}, torch fake-quant "
            f"{q['torch_fakequant']:.2f} dB"
        )
    if "check_1000x1000_tiled" in record:
        c = record["check_1000x1000_tiled"]
        peaks = ", ".join(f"{k} {v:.0f} MB" for k, v in c["peak_mb"].items())
        print(
            f"1000x1000 LR x4 tiled: peak RSS {peaks} (limit {c['limit_mb']:.0f} MB): "
            f"{'OK' if c['ok'] else 'EXCEEDED'}"
        )
    print(f"bench time {record['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
