"""Does this OpenVINO drop a quantizer's rounding when it fuses a conv with a skip add?

Not a test. Builds one residual-block tail as a small ONNX graph, the pattern every exported
EDSR block has (``lowbitsr export``):

    x -> Q/Clip/DQ (2-bit) -> Conv (int8 weights, int32 bias) -> Q -> Clip(0, 3) -> DQ (QA3)
      -> [Min(., top grid value)] -> Add(r) -> Q -> DQ (the next block's 8-bit quantizer)

and runs it in onnxruntime (which follows the graph) and OpenVINO (f32 inference precision),
without and with the ``Min`` guard that ``export_onnx(target="openvino")`` inserts. The guard is
an exact no-op: the dequantized codes never exceed the top grid value. OpenVINO 2026.4's CPU
plugin fuses Conv -> Q -> Clip -> DQ -> Add -> Q into one int8 convolution and, inside it, QA3
clamps without rounding; the guard keeps the Add out of the fusion. Prints JSON and a table:
the largest |OpenVINO - onnxruntime| per variant, the share of outputs that differ, and whether
onnxruntime's own output is unchanged by the guard.

    python bench/openvino_qdq_fusion.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

C = 8  # channels
S_IN, S3, S1 = 0.4871, 0.6137, 0.0517  # scales, chosen so that no value lies on a rounding tie
Z3, Z1 = 1, 128  # zero points of QA3 and of the next quantizer
W_SCALE = 0.2913


def build(guard: bool, opset: int = 17) -> Any:
    """The block tail as an ONNX model; ``guard``: the ``Min`` before the skip ``Add``."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = []

    def init(a: np.ndarray, name: str) -> None:
        inits.append(nh.from_array(a, name))

    init(np.array(S_IN, np.float32), "s_in")
    init(np.array(0, np.uint8), "z_in")
    init(np.array(0, np.uint8), "c0")
    init(np.array(3, np.uint8), "c3")
    init(rng.integers(-1, 2, (C, C, 3, 3)).astype(np.int8), "wq")
    init(np.array(W_SCALE, np.float32), "ws")
    init(np.array(0, np.int8), "wz")
    init(rng.integers(-3, 4, C).astype(np.int32), "bq")
    init(np.array(np.float32(S_IN) * np.float32(W_SCALE), np.float32), "bs")
    init(np.array(0, np.int32), "bz")
    init(np.array(S3, np.float32), "s3")
    init(np.array(Z3, np.uint8), "z3")
    init(np.array(S1, np.float32), "s1")
    init(np.array(Z1, np.uint8), "z1")
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
        node("Clip", ["xq", "c0", "c3"], ["xc"]),
        node("DequantizeLinear", ["xc", "s_in", "z_in"], ["xd"]),
        node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
        node("DequantizeLinear", ["bq", "bs", "bz"], ["b"]),
        node("Conv", ["xd", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        node("QuantizeLinear", ["y", "s3", "z3"], ["q3"]),
        node("Clip", ["q3", "c0", "c3"], ["q3c"]),
        node("DequantizeLinear", ["q3c", "s3", "z3"], ["d3"]),
    ]
    branch = "d3"
    if guard:  # the top code's dequantized value, the same float32 product DequantizeLinear makes
        init(np.array(np.float32(3 - Z3) * np.float32(S3), np.float32), "top3")
        nodes.append(node("Min", ["d3", "top3"], ["d3g"]))
        branch = "d3g"
    nodes += [
        node("Add", [branch, "r"], ["a"]),
        node("QuantizeLinear", ["a", "s1", "z1"], ["q1"]),
        node("DequantizeLinear", ["q1", "s1", "z1"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", C, "H", "W"]) for n in ("x", "r")
    ]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "block_tail", inputs, out, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run_ort(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def run_ov(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model.SerializeToString(), b""),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1},
    )
    result = compiled.create_infer_request().infer(feeds)
    return np.asarray(next(iter(result.values())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write the JSON record here")
    args = p.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import openvino
    except ImportError as exc:
        print(f"error: needs onnx, onnxruntime and openvino ({exc})", file=sys.stderr)
        return 2
    from lowbitsr.evaluate import format_table

    rng = np.random.default_rng(1)
    feeds = {
        "x": (rng.random((1, C, 12, 12)) * 2).astype(np.float32),
        "r": (rng.standard_normal((1, C, 12, 12)) * 0.3).astype(np.float32),
    }
    ort_plain = run_ort(build(False), feeds)
    rows = []
    for guard in (False, True):
        model = build(guard)
        a, b = run_ort(model, feeds), run_ov(model, feeds)
        diff = np.abs(b - a)
        rows.append(
            {
                "graph": "with the Min guard" if guard else "without the guard",
                "max abs(OV - ORT)": float(diff.max()),
                "outputs differing": float(np.mean(diff > 1e-4)),
                "ORT unchanged": bool(np.array_equal(a, ort_plain)),
            }
        )
    record = {"openvino": openvino.__version__, "rows": rows, "grid_step_out": S1}
    print(json.dumps(record))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
