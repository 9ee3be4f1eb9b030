"""Benchmark: deployment artifacts — size on disk, CPU latency, peak memory, parity, op counts.

Not a test. For every *subject* (a quantized network and its float twin) everything is measured
side by side in one run:

- **latency** of PyTorch FP32, PyTorch fake-quant, onnxruntime FP32 and onnxruntime integer
  (QCDQ + QLinearConv export, :func:`lowbitsr.deploy.export_onnx` defaults), plus optional ORT
  variants (``--variants``), on an LR input of 256×256 (×scale, whole image) and a 4K output
  (960×540 LR ×4, tiled 256 + overlap 16). Each (backend, workload) is a **persistent worker
  process**; the workers of a workload are started together, warmed up once, then timed
  **round-robin** (``--repeats`` rounds, a short pause between runs), so slow drifts of a shared
  machine hit every backend alike. Reported: median and min wall time and the ratios of the
  medians;
- **peak memory**: each worker's resident-set high-water mark (``VmHWM``; it includes the
  interpreter, torch/onnxruntime and the model; ``base MB`` is the RSS after loading);
- **which ops are integer** after onnxruntime's graph optimisation (``QLinearConv``, ``Conv``
  ...: :attr:`~lowbitsr.deploy.onnx_export.ExportReport.optimized_ops`) and, with
  ``--profile``, onnxruntime's per-op time of the FP32 and integer graphs and the share of the
  FP32 time spent in the convs that the integer graph runs as QLinearConv (an Amdahl bound on
  the ratio: ``1 / (1 - share)`` if those convs took no time at all);
- **parity/quality**: PSNR of each ORT export against its PyTorch model on the bundled test
  photos (uint8 outputs) and, for trained models, PSNR/Y against HR of every backend (the issue's
  bound: ORT integer within 0.05 dB of PyTorch fake-quant);
- **size**: the bit-packed artifact (:func:`lowbitsr.deploy.save_packed`) vs the float32
  safetensors (whole file and quantized-body weights) and the ONNX files.

Prints one JSON record, then Markdown tables.

    python bench/bench_deploy.py                                   # shipped edsr_tiny DDTB w4a4
    python bench/bench_deploy.py --model edsr_tiny_x4_pams_w2a2 --variants codes
    python bench/bench_deploy.py --arch edsr_baseline --method ddtb,pams --bits 4,2 --profile
    python bench/bench_deploy.py --quick                           # 128x128 + 1000x1000 check
    python bench/bench_deploy.py --arch edsr_baseline --layout paper,integer --workloads 128,256

Backends: ``torch_fp32``, ``torch_fakequant``, ``ort_fp32``, ``ort_int`` always; ``ov_fp32``
and ``ov_int`` (OpenVINO, f32 inference precision; ``ov_int`` runs the export made with
``target="openvino"``) when openvino is installed; ``torch_int8`` (PyTorch quantized kernels,
:func:`lowbitsr.deploy.torch_int8.to_torch_int8`) for integer-layout subjects. ``--backends``
picks a subset.

``--arch`` builds that architecture with random weights (seed 0), quantizes it and calibrates it
on LR patches of the bundled training photos: its speed and size do not depend on training, its
PSNR against HR is meaningless (only parity is reported).
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbitsr.checkpoint import load_model, save_model
from lowbitsr.deploy import export_onnx, load_packed, save_packed, size_report
from lowbitsr.evaluate import format_table
from lowbitsr.models import create_model
from lowbitsr.quant import (
    DDTBConfig,
    PAMSConfig,
    calibrate,
    dequantize,
    quantize,
    set_gates_applied,
)
from lowbitsr.quant.bitops import count_bitops
from lowbitsr.specs import load_any_model

SHIPPED_DEFAULT = "edsr_tiny_x4_ddtb_w4a4"
BACKENDS = ("torch_fp32", "torch_fakequant", "ort_fp32", "ort_int")
OV_BACKENDS = ("ov_fp32", "ov_int")
#: Extra onnxruntime exports of the quantized model (``--variants``): export_onnx keywords.
VARIANTS: dict[str, dict[str, Any]] = {
    # int8 codes + DequantizeLinear for the float convs too (smaller file, generic float convs)
    "codes": {"float_conv_weights": "codes"},
    # every conv float (float bias kept; parity to float noise)
    "float_convs": {"integer_convs": False},
    # int8 activation containers instead of uint8
    "int8": {"act_container": "int8"},
    # OPT-IN APPROXIMATION: gated DDTB layers with static bounds (mean gate multipliers)
    "static_gates": {"static_gates": "mean"},
}
WORKLOADS: dict[str, dict[str, int]] = {
    # name: LR height/width, tile (0 = whole image), overlap
    "256": {"h": 256, "w": 256, "tile": 0, "overlap": 0},
    "4k": {"h": 540, "w": 960, "tile": 256, "overlap": 16},
    "1000": {"h": 1000, "w": 1000, "tile": 256, "overlap": 16},
    "128": {"h": 128, "w": 128, "tile": 0, "overlap": 0},
}
PEAK_LIMIT_MB = 2048.0
PSNR_BOUND_DB = 0.05
PAUSE_S = 0.3  # between timed runs: lets the previous worker's spinning threads go idle


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


#: ``--quality-dir``: a folder of HR images for the quality section instead of bundled:test
QUALITY_DIR: str | None = None


def bundled_images(split: str, scale: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(lr, hr)`` uint8 H×W×3 pairs of a bundled split (empty if the data is missing); for
    ``test`` with ``--quality-dir``, that folder's images (LR by MATLAB bicubic)."""
    try:
        from lowbitsr.data import BundledDataset, build_dataset

        if split == "test" and QUALITY_DIR:
            ds = build_dataset({"type": "folder", "root": QUALITY_DIR}, scale, "eval")
        else:
            ds = BundledDataset(split, scale, mode="eval")
        out = []
        for i in range(len(ds)):
            item = ds[i]
            lr, hr = (
                item[k].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                for k in ("lr", "hr")
            )
            out.append((lr, hr))
        return out
    except Exception:
        return []


# ----------------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """A quantized model, its float twin, and what was built from them."""

    key: str
    desc: str
    fp: nn.Module
    q: nn.Module
    trained: bool
    files: dict[str, str] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)


def build_subjects(args: argparse.Namespace) -> list[Subject]:
    """The subjects of this run (all eval, CPU)."""
    if args.arch:
        torch.manual_seed(0)
        fp = create_model(args.arch, scale=args.scale).eval()
        calib = calibration_batches(args.scale, 2)
        subjects = []
        for layout in args.layout.split(","):
            for method in args.method.split(","):
                for bits in (int(b) for b in str(args.bits).split(",")):
                    cls = DDTBConfig if method == "ddtb" else PAMSConfig
                    stream = args.stream_bits if layout == "integer" else None
                    q = quantize(fp, cls(bits=bits, layout=layout, stream_bits=stream))
                    calibrate(q, calib)
                    set_gates_applied(q, True)
                    tag = "_int" if layout == "integer" else ""
                    tag += f"_s{stream}" if stream else ""
                    subjects.append(
                        Subject(
                            f"{args.arch}_x{args.scale}_{method}_w{bits}a{bits}{tag}",
                            f"{args.arch} x{args.scale}, random weights (seed 0), "
                            f"{method.upper()} w{bits}a{bits}, {layout} layout, calibrated on "
                            "bundled LR patches",
                            fp,
                            q.eval(),
                            trained=False,
                        )
                    )
        return subjects
    name = args.model or SHIPPED_DEFAULT
    q = load_any_model(str(name))[0]
    if getattr(q, "quant_config_dict", None) is None:
        raise SystemExit(f"{name}: a float model; pass a DDTB/PAMS quantized model")
    fp = dequantize(q).eval()
    return [Subject(Path(str(name)).stem, str(name), fp, q.eval(), trained=True)]


def prepare(subj: Subject, d: Path, variants: Sequence[str], scale: int) -> None:
    """Write the float/packed models and the ONNX exports of a subject into ``d``."""
    from lowbitsr.deploy.onnx_export import mean_gate_multipliers

    d.mkdir(parents=True, exist_ok=True)
    save_model(subj.fp, d / "fp")
    save_packed(subj.q, d / "q")
    subj.files = {"fp": str(d / "fp.json"), "packed": str(d / "q.safetensors")}
    exports: dict[str, dict[str, Any]] = {"ort_fp32": {}, "ort_int": {}}
    for v in variants:
        exports[f"ort_int_{v}"] = dict(VARIANTS[v])
    if _has_openvino():
        exports["ov_int"] = {"target": "openvino"}
    for key, kw in exports.items():
        model = subj.fp if key == "ort_fp32" else subj.q
        if kw.get("static_gates") == "mean":
            lrs = [
                torch.from_numpy(lr).permute(2, 0, 1)[None].float()
                for lr, _ in bundled_images("train", scale)
            ] or calibration_batches(scale, 2)
            kw = {**kw, "static_gates": mean_gate_multipliers(subj.q, lrs)}
        path = d / f"{key}.onnx"
        r = export_onnx(model, path, **kw)
        subj.files[key] = str(path)
        ops = r.optimized_ops
        subj.onnx[key] = {
            "options": {k: (v if k != "static_gates" else "mean") for k, v in kw.items()},
            "parity_random": r.parity,
            "optimized_ops": ops,
            "integer_conv_ops": sum(
                v for k, v in ops.items() if k.split(":")[-1] in ("QLinearConv", "ConvInteger")
            ),
            "float_conv_ops": sum(
                v for k, v in ops.items() if k.split(":")[-1] in ("Conv", "FusedConv")
            ),
            "qcdq_quantizers": len(r.qcdq_quantizers),
            "float_quantizers": len(r.float_quantizers),
            "static_gates": len(r.static_gates),
            "prepared_integer_convs": r.fusable_convs,
            "file_bytes": path.stat().st_size,
        }


# ----------------------------------------------------------------------------------- worker
def _make_runner(spec: dict[str, Any]) -> Any:
    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    wl = spec["workload"]
    backend = spec["backend"]
    if backend in ("ort", "ov"):
        from lowbitsr.deploy import OnnxSR, OpenVinoSR, upscale_image_onnx

        if backend == "ov":
            sess = OpenVinoSR(spec["onnx"], threads=threads)
        else:
            sess = OnnxSR(spec["onnx"], threads=threads, mem_arena=spec.get("mem_arena", True))

        def run(img: np.ndarray) -> np.ndarray:
            return upscale_image_onnx(sess, img, tile=wl["tile"], overlap=wl["overlap"])

        return run
    from lowbitsr.evaluate import upscale_image

    model = load_model(spec["fp"]) if backend == "torch_fp32" else load_packed(spec["packed"])
    if backend == "torch_int8":
        from lowbitsr.deploy.torch_int8 import to_torch_int8

        model = to_torch_int8(model)
    model.eval()
    scale = int(model.model_config["scale"])

    def run_t(img: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return upscale_image(model, img, scale, tile=wl["tile"], overlap=wl["overlap"])

    return run_t


def worker(spec: dict[str, Any]) -> None:
    """Persistent worker of one (backend, workload): ``ready`` after loading and one warm-up
    run, then one timed run per ``run`` line on stdin; ``exit`` reports the peak RSS."""
    run = _make_runner(spec)
    wl = spec["workload"]
    img = smooth_image(wl["h"], wl["w"], seed=1)
    base_mb = _rss_now_mb()
    out = run(img)
    print(json.dumps({"ready": True, "base_mb": base_mb, "out": list(out.shape)}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            c0, t0 = time.process_time(), time.perf_counter()
            run(img)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(json.dumps({"t": dt, "cpu": cpu}), flush=True)
        elif cmd == "exit":
            print(json.dumps({"peak_mb": _peak_rss_mb()}), flush=True)
            return


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


class _Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(
                f"worker {self.spec['backend']}/{self.spec['workload_name']} failed:\n{err}"
            )
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict[str, Any]:
        r = self.ask("exit")
        self.proc.wait(timeout=60)
        return r


def time_workload(
    subj: Subject, wname: str, backends: Sequence[str], threads: int, repeats: int
) -> list[dict[str, Any]]:
    """Start one worker per backend, warm up, time them round-robin; one row per backend."""
    wl = WORKLOADS[wname]
    workers = {}
    for b in backends:
        lean = b.endswith("_noarena")
        onnx_key = b.removesuffix("_noarena") if b.startswith(("ort", "ov")) else None
        if b == "ov_fp32":
            onnx_key = "ort_fp32"  # the same float graph
        spec = {
            "mem_arena": not lean,
            "backend": ("ov" if b.startswith("ov") else "ort") if onnx_key else b,
            "workload": wl,
            "workload_name": wname,
            "threads": threads,
            "fp": subj.files["fp"],
            "packed": subj.files["packed"],
            "onnx": subj.files.get(onnx_key or "", ""),
        }
        workers[b] = _Worker(spec)
    times: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    try:
        for _ in range(repeats):
            for b, w in workers.items():
                time.sleep(PAUSE_S)
                times[b].append(w.ask("run"))
    finally:
        peaks = {}
        for b, w in workers.items():
            try:
                peaks[b] = w.close()["peak_mb"]
            except Exception:
                w.proc.kill()
                peaks[b] = float("nan")
    rows = []
    for b in backends:
        t = [r["t"] for r in times[b]]
        rows.append(
            {
                "subject": subj.key,
                "backend": b,
                "workload": wname,
                "lr": [wl["h"], wl["w"]],
                "out": workers[b].info["out"],
                "tile": wl["tile"],
                "median_s": statistics.median(t),
                "min_s": min(t),
                "times_s": t,
                "cpu_s": statistics.median(r["cpu"] for r in times[b]),
                "base_mb": workers[b].info["base_mb"],
                "peak_mb": peaks[b],
            }
        )
        print(
            f"  {subj.key} {wname:>5} {b:<22} median {rows[-1]['median_s']:8.3f} s  "
            f"min {rows[-1]['min_s']:8.3f} s  peak {peaks[b]:7.0f} MB",
            file=sys.stderr,
        )
    return rows


# ----------------------------------------------------------------------------------- quality
def quality(subj: Subject, scale: int, threads: int) -> dict[str, Any]:
    """On the bundled test photos: PSNR (RGB, uint8 outputs, all pixels) of every ORT export
    against its PyTorch model, and (trained models) PSNR/Y vs HR of every backend."""
    from lowbitsr.deploy import OnnxSR, upscale_image_onnx
    from lowbitsr.evaluate import upscale_image
    from lowbitsr.metrics import psnr

    pairs = bundled_images("test", scale)
    if not pairs:
        return {}
    outs: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        outs["torch_fp32"] = [upscale_image(subj.fp, lr, scale) for lr, _ in pairs]
        outs["torch_fakequant"] = [upscale_image(subj.q, lr, scale) for lr, _ in pairs]
        if _is_integer_layout(subj.q):
            from lowbitsr.deploy.torch_int8 import to_torch_int8

            t8 = to_torch_int8(subj.q)
            outs["torch_int8"] = [upscale_image(t8, lr, scale) for lr, _ in pairs]
    for key in subj.onnx:
        if key.startswith("ov"):
            from lowbitsr.deploy import OpenVinoSR

            sess: Any = OpenVinoSR(subj.files[key], threads=threads)
        else:
            sess = OnnxSR(subj.files[key], threads=threads)
        outs[key] = [upscale_image_onnx(sess, lr) for lr, _ in pairs]
    res: dict[str, Any] = {"images": len(pairs), "parity_psnr": {}, "psnr_y_vs_hr": {}}
    for key, o in outs.items():
        if key.startswith(("ort", "ov", "torch_int8")):
            ref = outs["torch_fp32" if key == "ort_fp32" else "torch_fakequant"]
            res["parity_psnr"][key] = float(
                np.mean(
                    [
                        psnr(a, b, crop_border=0, test_y_channel=False)
                        for a, b in zip(o, ref, strict=True)
                    ]
                )
            )
        if subj.trained:
            res["psnr_y_vs_hr"][key] = float(
                np.mean(
                    [psnr(a, hr, crop_border=scale) for a, (_, hr) in zip(o, pairs, strict=True)]
                )
            )
    return res


# ----------------------------------------------------------------------------------- profile
def profile(subj: Subject, hw: int, threads: int, runs: int = 3) -> dict[str, Any]:
    """onnxruntime's per-op time (ms, the minimum over ``runs`` of each node) of the FP32 and
    integer graphs on a hw×hw LR input, and the share of the FP32 time in the convs that the
    integer graph runs as QLinearConv."""
    import onnxruntime as ort

    x = (np.random.default_rng(0).random((1, 3, hw, hw)) * 255).astype(np.float32)
    out: dict[str, Any] = {"lr": hw, "threads": threads}
    node_ms: dict[str, dict[str, float]] = {}
    for key in ("ort_fp32", "ort_int"):
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.profile_file_prefix = str(Path(subj.files[key]).with_suffix(""))
        sess = ort.InferenceSession(subj.files[key], so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, {"lr": x})
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink()
        per: dict[str, list[float]] = {}
        op_of: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per.setdefault(e["name"], []).append(e["dur"] / 1000.0)
                op_of[e["name"]] = e["args"]["op_name"]
        mins = {n: min(v[1:] or v) for n, v in per.items()}
        node_ms[key] = mins
        by_op: dict[str, float] = {}
        for n, t in mins.items():
            by_op[op_of[n]] = by_op.get(op_of[n], 0.0) + t
        out[key] = {
            "total_ms": sum(mins.values()),
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        }
    convs = subj.onnx["ort_int"]["prepared_integer_convs"]
    fp_nodes = node_ms["ort_fp32"]
    # The FP32 graph's conv nodes keep the float module's name as prefix ("tail.0.0" for the
    # integer layout's "tail.0.0.conv"); a conv fused with its ReLU is named after the ReLU
    # ("body.i.body.1" for conv1 "body.i.body.0").
    prefixes = set()
    for c in convs:
        c = c.removesuffix(".conv")
        prefixes.add(f"{c}/")
        if c.endswith(".body.0"):
            prefixes.add(f"{c[:-1]}1/")
    in_int = sum(t for n, t in fp_nodes.items() if any(n.startswith(p) for p in prefixes))
    total = out["ort_fp32"]["total_ms"]
    out["fp32_ms_in_integer_convs"] = in_int
    out["integer_share_of_fp32"] = in_int / total if total else float("nan")
    out["amdahl_bound"] = total / (total - in_int) if total > in_int else float("inf")
    int_q = sum(v for k, v in out["ort_int"]["by_op_ms"].items() if k == "QLinearConv")
    out["qlinearconv_ms"] = int_q
    out["qlinearconv_speedup"] = in_int / int_q if int_q else float("nan")
    return out


# ----------------------------------------------------------------------------------- GDQ
def gdq_section(name: str, threads: int, repeats: int) -> dict[str, Any]:
    """Granular-DQ: the ONNX export (float-op quantizers with per-tile scales, bits decided in
    the graph) against PyTorch, both with the §2.4 tiled inference (96/90 tiles): PSNR/Y vs HR
    and bit maps on the bundled test photos, and the latency of a 256x256 LR image."""
    from lowbitsr.deploy.runtime import OnnxSR, upscale_image_gdq_onnx
    from lowbitsr.metrics import psnr
    from lowbitsr.quant.bitops import fab
    from lowbitsr.quant.granular_dq import gdq_super_resolve

    model = load_any_model(name)[0].eval()
    scale = int(model.model_config["scale"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gdq.onnx"
        rep = export_onnx(model, path)
        sess = OnnxSR(path, threads=threads)

        def run_torch(lr8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lr = torch.from_numpy(lr8).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                sr, bits = gdq_super_resolve(model, lr, scale)
            out = sr[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            return out, bits.numpy()

        res: dict[str, Any] = {
            "model": name,
            "decision": rep.granular_dq.get("decision"),
            "candidates": rep.granular_dq.get("candidates"),
            "parity_random": rep.parity,
            "optimized_ops": rep.optimized_ops,
            "file_bytes": path.stat().st_size,
            "images": [],
        }
        for lr8, hr8 in bundled_images("test", scale):
            t8, tb = run_torch(lr8)
            o8, ob = upscale_image_gdq_onnx(sess, lr8)
            res["images"].append(
                {
                    "lr": list(lr8.shape[:2]),
                    "psnr_y_torch": psnr(t8, hr8, crop_border=scale),
                    "psnr_y_ort": psnr(o8, hr8, crop_border=scale),
                    "bits_equal": bool(np.array_equal(tb, ob)),
                    "fab": fab(torch.from_numpy(ob).flatten()),
                }
            )
        img = smooth_image(256, 256, seed=1)
        times: dict[str, list[float]] = {"torch_gdq": [], "ort_gdq": []}
        torch.set_num_threads(threads)
        run_torch(img)
        upscale_image_gdq_onnx(sess, img)
        for _ in range(repeats):
            for key in times:
                t0 = time.perf_counter()
                if key == "torch_gdq":
                    run_torch(img)
                else:
                    upscale_image_gdq_onnx(sess, img)
                times[key].append(time.perf_counter() - t0)
                time.sleep(PAUSE_S)
        res["latency_256"] = {
            k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()
        }
    return res


def print_gdq(r: dict[str, Any]) -> None:
    print(f"\n### Granular-DQ export: {r['model']}\n")
    print(
        f"Bits {r['candidates']} per tile, decision {r['decision']}; parity on random inputs: "
        + ", ".join(f"{p['psnr']:.1f} dB" for p in r["parity_random"])
        + f"; ONNX {r['file_bytes'] / 1024:.0f} KB; ops after ORT optimisation: "
        + _op_summary(r["optimized_ops"])
    )
    rows = [
        {
            "LR": f"{i['lr'][0]}x{i['lr'][1]}",
            "PSNR/Y torch": i["psnr_y_torch"],
            "PSNR/Y ORT": i["psnr_y_ort"],
            "delta dB": i["psnr_y_ort"] - i["psnr_y_torch"],
            "same bit map": i["bits_equal"],
            "FAB": i["fab"],
        }
        for i in r["images"]
    ]
    print(format_table(rows))
    lat = r["latency_256"]
    print(
        f"256x256 LR, 96/90 tiles: torch {lat['torch_gdq']['median_s']:.3f} s, ORT "
        f"{lat['ort_gdq']['median_s']:.3f} s (median)"
    )


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", help="saved model (folder/.json/.safetensors), packed file or shipped name"
    )
    ap.add_argument("--arch", help="build this architecture with random weights (edsr_baseline)")
    ap.add_argument("--method", default="ddtb", help="with --arch: comma list of ddtb,pams")
    ap.add_argument("--bits", default="4", help="with --arch: comma list of bit-widths")
    ap.add_argument("--layout", default="paper", help="with --arch: comma list of paper,integer")
    ap.add_argument(
        "--stream-bits",
        type=int,
        default=None,
        help="with --layout integer: bit-width of the residual stream (default: --bits)",
    )
    ap.add_argument(
        "--backends",
        help="time only these backends (comma list of torch_fp32, torch_fakequant, ort_fp32, "
        "ort_int, ov_fp32, ov_int, torch_int8, ort_int_<variant>)",
    )
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of small workloads")
    ap.add_argument(
        "--big-repeats", type=int, default=1, help="timed rounds of tiled (4k/1000) workloads"
    )
    ap.add_argument("--workloads", help="comma list of 256,4k,1000,128 (default 256,4k)")
    ap.add_argument(
        "--variants",
        default="",
        help=f"extra ORT exports of the quantized model, comma list of {','.join(VARIANTS)}",
    )
    ap.add_argument("--profile", action="store_true", help="ORT per-op profile (128x128 LR)")
    ap.add_argument(
        "--no-arena",
        action="store_true",
        help="also time ort_int with onnxruntime's CPU memory arena off (lower peak memory)",
    )
    ap.add_argument("--no-quality", action="store_true", help="skip the bundled-test PSNRs")
    ap.add_argument(
        "--quality-dir",
        help="HR images for the quality section (e.g. data/photos/test) instead of bundled:test",
    )
    ap.add_argument("--quick", action="store_true", help="128x128 + the 1000x1000 check only")
    ap.add_argument(
        "--gdq",
        nargs="?",
        const="edsr_tiny_x4_gdq",
        help="also export a Granular-DQ model (default the shipped edsr_tiny_x4_gdq) and compare "
        "it with PyTorch",
    )
    ap.add_argument("--gdq-only", action="store_true", help="only the --gdq part")
    ap.add_argument("--json", type=Path, help="also write the JSON record here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    torch.set_num_threads(args.threads)
    global QUALITY_DIR
    QUALITY_DIR = args.quality_dir
    t_start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    if args.workloads:
        workloads = args.workloads.split(",")
    elif args.quick:
        workloads = ["128", "1000"]
    else:
        workloads = ["256", "4k"]
    subjects = [] if args.gdq_only else build_subjects(args)
    import onnxruntime

    record: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": _openvino_version(),
            "loadavg_start": os.getloadavg(),
        },
        "subjects": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for subj in subjects:
            scale = int(subj.q.model_config["scale"])
            sv = [v for v in variants if v != "static_gates" or _has_gates(subj.q)]
            prepare(subj, Path(tmp) / subj.key, sv, scale)
            r = size_report(subj.q)
            entry: dict[str, Any] = {
                "key": subj.key,
                "model": subj.desc,
                "quant": subj.q.quant_config_dict,
                "trained": subj.trained,
                "size": {**r, "body_x_smaller": 1 / r["body_ratio"]},
                "bitops_256": {
                    "fp32_gbitops": count_bitops(subj.fp, (1, 3, 64, 64))["gbitops"] * 16,
                    "quant_gbitops": count_bitops(subj.q, (1, 3, 64, 64))["gbitops"] * 16,
                },
                "onnx": subj.onnx,
            }
            if not args.no_quality:
                entry["quality"] = quality(subj, scale, args.threads)
            if args.profile:
                entry["profile"] = profile(subj, 128, args.threads)
            runs = []
            for wname in workloads:
                big = WORKLOADS[wname]["tile"] > 0
                if wname == "1000":  # the memory check: every quantized backend
                    backends: list[str] = ["ort_int", "torch_fakequant"]
                    if _has_openvino():
                        backends.append("ov_int")
                    if _is_integer_layout(subj.q):
                        backends.append("torch_int8")
                else:
                    backends = [*BACKENDS, *(f"ort_int_{v}" for v in sv)]
                    if _has_openvino():
                        backends += OV_BACKENDS
                    if _is_integer_layout(subj.q):
                        backends.append("torch_int8")
                    if args.no_arena:
                        backends.append("ort_int_noarena")
                if args.backends:
                    keep = args.backends.split(",")
                    backends = [b for b in backends if b in keep]
                runs += time_workload(
                    subj, wname, backends, args.threads, args.big_repeats if big else args.repeats
                )
            entry["runs"] = runs
            check = [r for r in runs if r["workload"] == "1000"]
            if check:
                entry["check_1000x1000_tiled"] = {
                    "peak_mb": {r["backend"]: r["peak_mb"] for r in check},
                    "limit_mb": PEAK_LIMIT_MB,
                    "ok": all(r["peak_mb"] < PEAK_LIMIT_MB for r in check),
                }
            record["subjects"].append(entry)
    if args.gdq or args.gdq_only:
        record["granular_dq"] = gdq_section(
            args.gdq or "edsr_tiny_x4_gdq", args.threads, args.repeats
        )
    record["quality_set"] = args.quality_dir or "bundled test"
    record["machine"]["loadavg_end"] = os.getloadavg()
    record["bench_seconds"] = time.perf_counter() - t_start
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    print_tables(record)


def _openvino_version() -> str | None:
    if not _has_openvino():
        return None
    import openvino

    return str(openvino.__version__)


def _has_openvino() -> bool:
    from lowbitsr.deploy.openvino_rt import openvino_available

    return openvino_available()


def _is_integer_layout(model: nn.Module) -> bool:
    return (getattr(model, "quant_config_dict", None) or {}).get("layout") == "integer"


def _has_gates(model: nn.Module) -> bool:
    from lowbitsr.quant.layers import DDTBActQuant

    return any(isinstance(m, DDTBActQuant) and m.gate is not None for m in model.modules())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _op_summary(ops: dict[str, int]) -> str:
    short: dict[str, int] = {}
    for k, v in ops.items():
        name = k.split(":")[-1]
        if name in ("QLinearConv", "ConvInteger", "Conv", "FusedConv", "DequantizeLinear"):
            short[name] = short.get(name, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(short.items()))


def print_tables(record: dict[str, Any]) -> None:
    m = record["machine"]
    print(
        f"\nMachine: {m['processor']}, {m['cpus']} CPUs, {m['threads']} threads, torch "
        f"{m['torch']}, onnxruntime {m['onnxruntime']}; load average at start "
        f"{m['loadavg_start'][0]:.1f}, at end {m['loadavg_end'][0]:.1f}"
    )
    for s in record["subjects"]:
        print(f"\n### {s['key']}: {s['model']}\n")
        z = s["size"]
        print(
            f"Size: packed {z['packed_bytes'] / 1024:.0f} KB vs fp32 {z['fp32_bytes'] / 1024:.0f} "
            f"KB (file ratio {z['ratio']:.3f}); quantized body weights "
            f"{z['body_packed_bytes'] / 1024:.0f} KB vs {z['body_fp32_bytes'] / 1024:.0f} KB "
            f"(1/{z['body_x_smaller']:.2f})"
        )
        b = s["bitops_256"]
        print(
            f"BitOPs per 256x256 LR: fp32 {b['fp32_gbitops']:.1f} G, quantized "
            f"{b['quant_gbitops']:.1f} G ({b['fp32_gbitops'] / b['quant_gbitops']:.2f}x fewer)\n"
        )
        rows = []
        by = {(r["workload"], r["backend"]): r for r in s["runs"]}
        for (wname, backend), r in by.items():
            ort_ref = by.get((wname, "ort_fp32"))
            t_ref = by.get((wname, "torch_fp32"))
            rows.append(
                {
                    "workload": f"{r['lr'][0]}x{r['lr'][1]} LR -> {r['out'][0]}x{r['out'][1]}"
                    + (f" tile {r['tile']}" if r["tile"] else ""),
                    "backend": backend,
                    "median s": r["median_s"],
                    "min s": r["min_s"],
                    "runs": len(r["times_s"]),
                    "vs ORT fp32": (ort_ref["median_s"] / r["median_s"]) if ort_ref else "",
                    "vs torch fp32": (t_ref["median_s"] / r["median_s"]) if t_ref else "",
                    "base MB": r["base_mb"],
                    "peak MB": r["peak_mb"],
                }
            )
        print(format_table(rows))
        print()
        q = s.get("quality", {})
        rows = []
        for name, o in s["onnx"].items():
            rows.append(
                {
                    "export": name,
                    "after ORT optimisation": _op_summary(o["optimized_ops"]),
                    "QCDQ acts": o["qcdq_quantizers"],
                    "float-op acts": o["float_quantizers"],
                    "static gates": o["static_gates"],
                    "file KB": o["file_bytes"] / 1024,
                    "parity PSNR (random)": min(p["psnr"] for p in o["parity_random"]),
                    "parity PSNR (test)": q.get("parity_psnr", {}).get(name, float("nan")),
                    "PSNR/Y vs HR": q.get("psnr_y_vs_hr", {}).get(name, float("nan")),
                }
            )
        print(format_table(rows))
        hr = q.get("psnr_y_vs_hr", {})
        if hr:
            fq = hr["torch_fakequant"]
            print(
                f"\nPSNR/Y on {record.get('quality_set', 'bundled test')} ({q['images']} images): "
                f"torch fp32 "
                f"{hr['torch_fp32']:.3f}, torch fake-quant {fq:.3f} dB; "
                + ", ".join(
                    f"{k} {v - fq:+.4f} dB"
                    for k, v in hr.items()
                    if k.startswith(("ort_int", "ov_int", "torch_int8"))
                )
                + f" vs fake-quant (bound {PSNR_BOUND_DB} dB)"
            )
        p = s.get("profile")
        if p:
            print(
                f"\nORT profile ({p['lr']}x{p['lr']} LR, {p['threads']} threads, per-node minimum "
                f"of runs): FP32 graph {p['ort_fp32']['total_ms']:.0f} ms, integer graph "
                f"{p['ort_int']['total_ms']:.0f} ms. The convs that run as QLinearConv take "
                f"{p['fp32_ms_in_integer_convs']:.0f} ms = {100 * p['integer_share_of_fp32']:.1f}% "
                f"of the FP32 graph (Amdahl bound {p['amdahl_bound']:.2f}x if they took no time); "
                f"as QLinearConv they take {p['qlinearconv_ms']:.0f} ms "
                f"({p['qlinearconv_speedup']:.2f}x faster)."
            )
            ops = sorted(set(p["ort_fp32"]["by_op_ms"]) | set(p["ort_int"]["by_op_ms"]))
            rows = [
                {
                    "op": op,
                    "FP32 ms": p["ort_fp32"]["by_op_ms"].get(op, 0.0),
                    "integer ms": p["ort_int"]["by_op_ms"].get(op, 0.0),
                }
                for op in ops
            ]
            rows.sort(key=lambda r: -(r["FP32 ms"] + r["integer ms"]))
            print(format_table(rows[:14]))
        if "check_1000x1000_tiled" in s:
            c = s["check_1000x1000_tiled"]
            peaks = ", ".join(f"{k} {v:.0f} MB" for k, v in c["peak_mb"].items())
            print(
                f"1000x1000 LR x4 tiled: peak RSS {peaks} (limit {c['limit_mb']:.0f} MB): "
                f"{'OK' if c['ok'] else 'EXCEEDED'}"
            )
    if "granular_dq" in record:
        print_gdq(record["granular_dq"])
    summary = []
    for s in record["subjects"]:
        by = {(r["workload"], r["backend"]): r for r in s["runs"]}
        for (wname, backend), r in by.items():
            ref = by.get((wname, "ort_fp32"))
            if backend.startswith(("ort_int", "ov_int", "torch_int8")) and ref:
                summary.append(
                    {
                        "subject": s["key"],
                        "workload": wname,
                        "backend": backend,
                        "speed-up vs ORT fp32 (median)": ref["median_s"] / r["median_s"],
                        "(min)": ref["min_s"] / r["min_s"],
                    }
                )
    if summary:
        print("\n### Integer backends vs onnxruntime FP32: speed-up\n")
        print(format_table(summary))
    print(f"bench time {record['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
