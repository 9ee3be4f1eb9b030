"""ONNX emitters of Granular-DQ (docs/methods.md §2): per-sample bit decision from the
head features and the image entropy, LSQ quantizers and convs of every candidate bit-width.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...quant.functional import lsq_fake_quant
from ...quant.gdq_layers import ENTROPY_BINS, ENTROPY_EPS, ENTROPY_SIGMA, GDQActQuantizer, GDQConv2d
from ...quant.granular_dq.model import GranularDQModel
from .graph import ExportError, _f32, _Graph


# ------------------------------------------------------------------------------ Granular-DQ
def _gdq_conv(g: _Graph, x: str, conv: GDQConv2d, name: str, attrs: dict[str, Any]) -> str:
    """A Granular-DQ conv on its (already quantized) input: the 8-bit LSQ weight, as a float32
    constant or (``float_conv_weights="codes"``) int8 codes + DequantizeLinear at ``w_alpha``
    (``code * alpha``, the fake-quant product); float bias."""
    with torch.no_grad():
        alpha = conv.w_alpha.detach().float()
        if getattr(conv, "official", False):
            # the released grad_scale form, whose forward step can be one ulp away from alpha
            gs = 1.0 / math.sqrt(conv.weight.numel() * (2 ** (conv.w_bits - 1) - 1))
            alpha = (alpha - alpha * gs) + alpha * gs
        wq = lsq_fake_quant(conv.weight.detach().float(), alpha, conv.w_bits, signed=True)
    if g.float_weights or conv.w_bits > 8:
        w = g.init(_f32(wq), f"{name}.weight")
    else:
        codes = torch.round(wq / alpha).to(torch.int8).numpy()
        deq = torch.from_numpy(codes.astype(np.float32)) * alpha
        if not torch.equal(deq, wq):
            raise ExportError(f"{name}: the LSQ weight is not code * alpha in float32")
        w = g.op(
            "DequantizeLinear",
            [g.init(codes, f"{name}.weight_codes"), g.const(float(alpha[0])), g.const(0, np.int8)],
            f"{name}.weight",
        )
        g.report_int_weights.append(name)
    inputs = [x, w] + ([g.init(_f32(conv.bias), f"{name}.bias")] if conv.bias is not None else [])
    return g.op("Conv", inputs, name, **attrs)


def _gdq_act(g: _Graph, x: str, q: GDQActQuantizer, name: str) -> str:
    """§2.3 activation quantizer at each sample's bit-width: ``x + shift`` (default compat),
    ``round(clamp(x / alpha_b, -Qn_b, Qp_b)) * alpha_b`` with ``alpha_b``, ``Qn_b``, ``Qp_b``
    gathered per sample from the layer's tables (float ops, PyTorch's order)."""
    if g.gdq_sel is None:
        raise ExportError(f"{name}: a Granular-DQ layer before the bit decision (head)")
    if q._needs_init:
        raise ExportError(f"{name}: Granular-DQ activation quantizer is not initialised")
    g.report_float_q[name] = "Granular-DQ: per-sample bit-width"
    if not q.official:
        x = g.op("Add", [x, g.init(_f32(q.shift), f"{name}.shift")], name)
    shape = g.const([-1, 1, 1, 1], np.int64)

    def per_sample(table: np.ndarray, what: str) -> str:
        t = g.op("Gather", [g.init(table.astype(np.float32), f"{name}.{what}"), g.gdq_sel], name)
        return g.op("Reshape", [t, shape], name)

    alpha = per_sample(_f32(q.alpha), "alpha")
    lo = per_sample(-_f32(q._qn), "neg_qn")
    hi = per_sample(_f32(q._qp), "qp")
    v = g.op("Div", [x, alpha], name)
    v = g.op("Min", [g.op("Max", [v, lo], name), hi], name)
    return g.op("Mul", [g.op("Round", [v], name), alpha], name)


def _axis_pool_weights(g: _Graph, length: str, out: str, name: str) -> str:
    """``[L]`` weights ``w_i`` with ``mean(adaptive_avg_pool1d(x, O)) = sum_i w_i x_i``: cell
    ``r`` averages ``[floor(rL/O), ceil((r+1)L/O))`` (PyTorch's adaptive pooling)."""
    i64 = np.int64
    r = g.op("Range", [g.const(0, i64), out, g.const(1, i64)], name)
    start = g.op("Div", [g.op("Mul", [r, length], name), out], name)
    r1 = g.op("Add", [r, g.const(1, i64)], name)
    end = g.op(
        "Div",
        [g.op("Add", [g.op("Mul", [r1, length], name), g.op("Sub", [out, g.const(1, i64)])]), out],
        name,
    )
    i = g.op(
        "Unsqueeze",
        [g.op("Range", [g.const(0, i64), length, g.const(1, i64)], name), g.const([1], i64)],
        name,
    )
    inside = g.op(
        "And",
        [g.op("GreaterOrEqual", [i, start], name), g.op("Less", [i, end], name)],
        name,
    )
    size = g.op("Cast", [g.op("Sub", [end, start], name)], name, to=1)
    m = g.op("Div", [g.op("Cast", [inside], name, to=1), size], name)
    w = g.op("ReduceSum", [m, g.const([1], i64)], name, keepdims=0)
    return g.op("Div", [w, g.op("Cast", [out], name, to=1)], name)


def _gdq_descriptor(g: _Graph, z1: str, name: str) -> str:
    """GBC descriptor ``S`` ``[N, 3C]`` (§2.1, :meth:`GranularityBitController.descriptor`)."""
    assert g.gdq is not None
    gbc = g.gdq.controller.gbc
    assert gbc is not None
    i64 = np.int64
    pool = {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 0}
    z2 = g.op("AveragePool", [z1], name, **pool)
    z3 = g.op("AveragePool", [z2], name, **pool)
    s3 = g.op("Shape", [z3], name)
    oh = g.op("Slice", [s3, g.const([2], i64), g.const([3], i64)], name)
    ow = g.op("Slice", [s3, g.const([3], i64), g.const([4], i64)], name)
    oh, ow = (g.op("Squeeze", [t, g.const([0], i64)], name) for t in (oh, ow))
    pooled = []
    for k, z in enumerate((z1, z2, z3)):
        if gbc.norms is not None:
            gn = gbc.norms[k]
            t = g.op("Reshape", [z, g.const([0, gn.num_groups, -1], i64)], name)
            t = g.op(
                "InstanceNormalization",
                [t, g.const(np.ones(gn.num_groups)), g.const(np.zeros(gn.num_groups))],
                name,
                epsilon=float(gn.eps),
            )
            t = g.op("Reshape", [t, g.op("Shape", [z], name)], name)
            c = gn.num_channels
            t = g.op("Mul", [t, g.init(_f32(gn.weight).reshape(c, 1, 1), f"{name}.gn{k}.w")], name)
            z = g.op("Add", [t, g.init(_f32(gn.bias).reshape(c, 1, 1), f"{name}.gn{k}.b")], name)
        sz = g.op("Shape", [z], name)
        h = g.op(
            "Squeeze",
            [g.op("Slice", [sz, g.const([2], i64), g.const([3], i64)], name), g.const([0], i64)],
            name,
        )
        w = g.op(
            "Squeeze",
            [g.op("Slice", [sz, g.const([3], i64), g.const([4], i64)], name), g.const([0], i64)],
            name,
        )
        wy = g.op("Unsqueeze", [_axis_pool_weights(g, h, oh, name), g.const([1], i64)], name)
        wx = _axis_pool_weights(g, w, ow, name)
        t = g.op("Mul", [g.op("Mul", [z, wy], name), wx], name)
        pooled.append(g.op("ReduceSum", [t, g.const([2, 3], i64)], name, keepdims=0))
    if gbc.official:
        pooled = [pooled[2], pooled[0], pooled[1]]
    return g.op("Concat", pooled, name, axis=1)


def _entropy(g: _Graph, lr255: str, name: str) -> str:
    """:func:`~lowbitsr.quant.gdq_layers.patch_entropy` ``[N]`` (default compat)."""
    i64 = np.int64
    ch = [
        g.op("Slice", [lr255, g.const([c], i64), g.const([c + 1], i64), g.const([1], i64)], name)
        for c in range(3)
    ]
    grey = g.op(
        "Add",
        [
            g.op(
                "Add",
                [
                    g.op("Mul", [ch[0], g.const(0.2989)], name),
                    g.op("Mul", [ch[1], g.const(0.5870)], name),
                ],
                name,
            ),
            g.op("Mul", [ch[2], g.const(0.1140)], name),
        ],
        name,
    )
    v = g.op("Reshape", [g.op("Div", [grey, g.const(255.0)], name), g.const([0, -1, 1], i64)])
    bins = g.const(np.linspace(0, 1, ENTROPY_BINS, dtype=np.float32).reshape(1, 1, -1))
    t = g.op("Div", [g.op("Sub", [v, bins], name), g.const(ENTROPY_SIGMA)], name)
    k = g.op("Exp", [g.op("Mul", [g.const(-0.5), g.op("Mul", [t, t], name)], name)], name)
    count = g.op("Slice", [g.op("Shape", [k], name), g.const([1], i64), g.const([2], i64)], name)
    pdf = g.op("ReduceSum", [k, g.const([1], i64)], name, keepdims=0)
    pdf = g.op("Div", [pdf, g.op("Cast", [count], name, to=1)], name)
    tot = g.op("ReduceSum", [pdf, g.const([1], i64)], name, keepdims=1)
    eps = g.const(ENTROPY_EPS)
    pdf = g.op("Add", [g.op("Div", [pdf, g.op("Add", [tot, eps], name)], name), eps], name)
    pos = g.op("Greater", [pdf, g.const(0.0)], name)
    plogp = g.op("Mul", [pdf, g.op("Log", [g.op("Where", [pos, pdf, g.const(1.0)], name)])])
    return g.op("Neg", [g.op("ReduceSum", [plogp, g.const([1], i64)], name, keepdims=0)], name)


def _gdq_in_graph(model: GranularDQModel) -> bool:
    """Whether the export decides the bits itself (deterministic gates)."""
    ctl = model.controller
    return ctl.gate == "fixed" or (ctl.gate == "learned" and not ctl.official)


def _gdq_decide(g: _Graph, z1: str, name: str) -> str:
    """The bit decision of every sample (§2.1 GBC argmax + §2.2 E2B with frozen thresholds) or
    the caller's ``bits`` input where positive; sets ``g.gdq_sel``. Returns ``z1``."""
    model = g.gdq
    if model is None:
        raise ExportError(f"{name}: a Granular-DQ head outside a Granular-DQ model")
    ctl = model.controller
    i64 = np.int64
    cands = np.asarray(ctl.candidates, dtype=i64)
    n = g.op("Slice", [g.op("Shape", [z1], name), g.const([0], i64), g.const([1], i64)], name)
    decided: str | None = None
    if ctl.gate == "fixed":
        decided = g.op("Expand", [g.const([int(ctl.fixed_bits)], i64), n], name)
        g.report_gdq["decision"] = f"fixed {ctl.fixed_bits} bits"
    elif _gdq_in_graph(model):
        assert ctl.gbc is not None
        s = _gdq_descriptor(g, z1, f"{name}.gbc")
        fc = ctl.gbc.fc
        logits = g.op(
            "Gemm",
            [
                s,
                g.init(_f32(fc.weight), f"{name}.gbc.fc.weight"),
                g.init(_f32(fc.bias), f"{name}.gbc.fc.bias"),
            ],
            name,
            transB=1,
        )
        soft = g.op(
            "Softmax", [g.op("Div", [logits, g.const(float(ctl.tau))], name)], name, axis=-1
        )
        gsel = g.op("ArgMax", [soft], name, axis=1, keepdims=0)
        gbits = np.asarray(ctl.gbc_bits, dtype=i64)
        decided = g.op("Gather", [g.const(gbits, i64), gsel], name)
        if ctl.e2b is not None:
            e2b = ctl.e2b
            if not e2b.ready:
                raise ExportError(f"{name}: E2B thresholds are not set")
            lr = "lr"
            if model.rgb_range != 255.0:
                lr = g.op("Mul", [lr, g.const(255.0 / model.rgb_range)], name)
            h = _entropy(g, lr, f"{name}.e2b")
            thr = e2b.thresholds.detach().float().numpy()
            bucket = g.op(
                "Add",
                [
                    g.op("Cast", [g.op("Greater", [h, g.const(float(thr[0]))], name)], name, to=7),
                    g.op("Cast", [g.op("Greater", [h, g.const(float(thr[1]))], name)], name, to=7),
                ],
                name,
            )
            ebits = g.op("Gather", [g.const(np.asarray(ctl.e2b_bits, dtype=i64), i64), bucket])
            top = g.op("Equal", [decided, g.const(int(max(ctl.gbc_bits)), i64)], name)
            decided = g.op("Where", [top, ebits, decided], name)
        g.report_gdq["decision"] = "in graph: GBC argmax" + (
            " + E2B (frozen thresholds)" if ctl.e2b is not None else ""
        )
    else:
        g.report_gdq["decision"] = (
            f"not in the graph ({'official' if ctl.official else ctl.gate} gate draws random "
            "numbers): pass the bits input (e.g. from GranularDQModel.decide_bits)"
        )
    forced = g.op("Cast", ["bits"], name, to=7)
    if decided is None:
        final = forced
    else:
        final = g.op("Where", [g.op("Greater", [forced, g.const(0, i64)], name), forced, decided])
    g.gdq_bits = final
    hit = g.op("Equal", [g.op("Unsqueeze", [final, g.const([1], i64)], name), g.const(cands, i64)])
    g.gdq_sel = g.op("ArgMax", [g.op("Cast", [hit], name, to=6)], name, axis=1, keepdims=0)
    g.report_gdq["candidates"] = [int(b) for b in cands]
    return z1
