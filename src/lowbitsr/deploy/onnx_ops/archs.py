"""ONNX emitters of whole architectures (EDSR, SRResNet, RDN) from the layer emitters."""

from __future__ import annotations

import numpy as np
from torch import nn

from ...models.edsr import EDSR, ResBlock
from ...models.rdn import RDB, RDN, DenseLayer
from ...models.srresnet import SRResBlock, SRResNet
from ...quant.layers import (
    QuantConv2d,
    QuantDenseLayer,
    QuantGFF,
    QuantInputConv,
    QuantRDB,
    QuantResBlock,
    QuantSRResBlock,
)
from .graph import ExportError, _Graph, _QParams
from .layers import _bn, _conv, _pixel_shuffle, _prelu, _seq
from .quantizers import _act, _act_codes, _dequant, _is_static


# ------------------------------------------------------------------------------ architectures
def _edsr(g: _Graph, lr: str, model: EDSR) -> str:
    x = _conv(g, lr, model.sub_mean, "sub_mean")
    x = _seq(g, x, model.head, "head")
    h = x
    for i, blk in enumerate(model.body):
        name = f"body.{i}"
        if isinstance(blk, QuantResBlock) and blk.integer:
            h = _int_block(g, h, blk, name)
        elif isinstance(blk, QuantResBlock):
            r, _ = _act(g, h, blk.quant_act1, f"{name}.quant_act1")
            t = _conv(g, h, blk.body[0], f"{name}.body.0")
            t = _seq(g, t, blk.body[1], f"{name}.body.1")
            t, qp = _act(g, t, blk.quant_act2, f"{name}.quant_act2")
            h = _conv2_and_skip(g, t, qp, r, blk, name)
        elif isinstance(blk, ResBlock):
            t = _seq(g, h, blk.body, f"{name}.body")
            if blk.res_scale != 1.0:
                t = g.op("Mul", [t, g.const(blk.res_scale)], name)
            h = g.op("Add", [t, h], name)
        else:
            h = _seq(g, h, blk, name)
    feat = g.op("Add", [h, x], "body")
    if any(isinstance(m, QuantInputConv) for m in model.tail.modules()):
        return _conv(g, _int_tail(g, feat, model.tail), model.add_mean, "add_mean")
    return _conv(g, _seq(g, feat, model.tail, "tail"), model.add_mean, "add_mean")


def _int_block(g: _Graph, h: str, blk: QuantResBlock, name: str) -> str:
    """An integer-layout EDSR block: ``r = QA1(h)`` feeds conv1 and the skip; conv1 → ReLU →
    QA2 with the ReLU folded into QA2's Clip, so ``DQ → Conv → Q`` becomes ``QLinearConv``; the
    block's ``Add`` of two dequantized streams, quantized by the next block's QA1, becomes
    ``QLinearAdd``."""
    r, qp1 = _act(g, h, blk.quant_act1, f"{name}.quant_act1")
    c2 = None
    if qp1 is not None and g.integer_convs and _is_static(g, blk.quant_act2):
        t = _conv(g, r, blk.body[0], f"{name}.body.0", in_q=qp1, fuse=True)
        c2 = _act_codes(g, t, blk.quant_act2, f"{name}.quant_act2", relu=True)
    if c2 is None:
        between = qp1 is not None and _is_static(g, blk.quant_act2)
        t = _conv(g, r, blk.body[0], f"{name}.body.0", in_q=qp1, qdq_float=between)
        t, qp2 = _act(
            g, _seq(g, t, blk.body[1], f"{name}.body.1"), blk.quant_act2, f"{name}.quant_act2"
        )
    else:
        t, qp2 = _dequant(g, c2[0], c2[1], f"{name}.quant_act2"), c2[1]
    return _conv2_and_skip(g, t, qp2, r, blk, name)


def _conv2_and_skip(
    g: _Graph, t: str, qp2: _QParams | None, r: str, blk: QuantResBlock, name: str
) -> str:
    """The end of a quantized EDSR block (both layouts): conv2 on QA2's output (integer when
    QA3 is static too, ``res_scale`` folded in), QA3, and the skip ``Add`` with ``r``."""
    between = qp2 is not None and _is_static(g, blk.quant_act3)
    t = _conv(
        g,
        t,
        blk.body[2],
        f"{name}.body.2",
        in_q=qp2,
        fuse=between and g.integer_convs,
        qdq_float=between and not g.integer_convs,
        post_scale=blk.res_scale,
    )
    t, qp3 = _act(g, t, blk.quant_act3, f"{name}.quant_act3")
    if qp3 is not None and g.skip_guard:
        # Exact no-op (DQ outputs never exceed the top code's value; same float32 product as
        # DequantizeLinear) that stops OpenVINO's CPU plugin from fusing the Add and the next
        # quantizer into conv2's post-ops, where it drops QA3's rounding (clamp only).
        top = float(np.float32(qp3.hi - qp3.zero) * np.float32(qp3.step))
        t = g.op("Min", [t, g.const(top)], f"{name}.quant_act3")
    return g.op("Add", [t, r], name)


def _int_tail(g: _Graph, feat: str, tail: nn.Module) -> str:
    """The integer layout's tail: upsampler convs (:class:`QuantInputConv`) whose output is
    quantized by the next conv's input quantizer *before* the pixel shuffle (exact: quantization
    is elementwise, the shuffle a permutation), so each is ``DQ → Conv → Q`` (``QLinearConv``)
    and the shuffle moves 8-bit codes. The tail conv (float weights) reads dequantized codes."""
    mods = [(f"tail.0.{j}", m) for j, m in tail[0].named_children()] + [("tail.1", tail[1])]
    x, codes = feat, None  # codes: (name, QParams) of the next quantizer's codes of x
    for k, (name, m) in enumerate(mods):
        if isinstance(m, nn.PixelShuffle):
            r = int(m.upscale_factor)
            if codes is not None:
                codes = (_pixel_shuffle(g, codes[0], r, name), codes[1])
            else:
                x = _pixel_shuffle(g, x, r, name)
            continue
        if not isinstance(m, QuantInputConv):
            if codes is not None:
                x, codes = _dequant(g, codes[0], codes[1], name), None
            x = _seq(g, x, m, name)
            continue
        if codes is not None:
            x, qp = _dequant(g, codes[0], codes[1], f"{name}.quant_act"), codes[1]
            codes = None
        else:
            x, qp = _act(g, x, m.quant_act, f"{name}.quant_act")
        # the next quantizer: this conv's own output quantizer, or the next conv's input
        # quantizer if only pixel shuffles lie between
        nxt = None
        if m.quant_out is not None:
            nxt = (f"{name}.quant_out", m.quant_out)
        else:
            for nname, nm in mods[k + 1 :]:
                if isinstance(nm, QuantInputConv):
                    nxt = (f"{nname}.quant_act", nm.quant_act)
                if not isinstance(nm, nn.PixelShuffle):
                    break
        fuse = (
            qp is not None
            and nxt is not None
            and isinstance(m.conv, QuantConv2d)
            and _is_static(g, nxt[1])
        )
        y = _conv(
            g,
            x,
            m.conv,
            f"{name}.conv",
            in_q=qp,
            fuse=fuse and g.integer_convs,
            qdq_float=fuse and not g.integer_convs,
        )
        c = None
        if fuse and g.integer_convs:
            c = _act_codes(g, y, nxt[1], nxt[0])  # type: ignore[index]
        if c is None:
            x = y
            if m.quant_out is not None:
                x, _ = _act(g, x, m.quant_out, f"{name}.quant_out")
        elif m.quant_out is not None:
            x = _dequant(g, c[0], c[1], f"{name}.quant_out")
        else:
            codes = c
    if codes is not None:
        x = _dequant(g, codes[0], codes[1], "tail")
    return x


def _srresnet(g: _Graph, lr: str, model: SRResNet) -> str:
    h = _prelu(g, _conv(g, lr, model.conv_input, "conv_input"), model.relu, "relu")
    t = h
    for i, blk in enumerate(model.residual):
        name = f"residual.{i}"
        if isinstance(blk, QuantSRResBlock):
            a, qp = _act(g, t, blk.quant_act1, f"{name}.quant_act1")
            u = _conv(g, a, blk.conv1, f"{name}.conv1", in_q=qp)
            u = _prelu(g, _bn(g, u, blk.in1, f"{name}.in1"), blk.relu, f"{name}.relu")
            a, qp = _act(g, u, blk.quant_act2, f"{name}.quant_act2")
            u = _bn(g, _conv(g, a, blk.conv2, f"{name}.conv2", in_q=qp), blk.in2, f"{name}.in2")
        elif isinstance(blk, SRResBlock):
            u = _conv(g, t, blk.conv1, f"{name}.conv1")
            u = _prelu(g, _bn(g, u, blk.in1, f"{name}.in1"), blk.relu, f"{name}.relu")
            u = _bn(g, _conv(g, u, blk.conv2, f"{name}.conv2"), blk.in2, f"{name}.in2")
        else:
            raise ExportError(f"{name}: unexpected {type(blk).__name__} in SRResNet.residual")
        t = g.op("Add", [u, t], name)
    feat = _bn(g, _conv(g, t, model.conv_mid, "conv_mid"), model.bn_mid, "bn_mid")
    feat = g.op("Add", [feat, h], "feat")
    return _conv(g, _seq(g, feat, model.upscale, "upscale"), model.conv_output, "conv_output")


def _dense(g: _Graph, x: str, layer: nn.Module, qp: _QParams | None, name: str) -> str:
    if isinstance(layer, QuantDenseLayer):
        if layer.quant_act is not None:
            x, qp = _act(g, x, layer.quant_act, f"{name}.quant_act")
        y = _conv(g, x, layer.conv[0], f"{name}.conv.0", in_q=qp)
        for j, m in list(layer.conv.named_children())[1:]:
            y = _seq(g, y, m, f"{name}.conv.{j}")
    elif isinstance(layer, DenseLayer):
        y = _seq(g, x, layer.conv, f"{name}.conv")
    else:
        raise ExportError(f"{name}: unexpected {type(layer).__name__} in an RDB")
    return g.op("Concat", [x, y], name, axis=1)


def _rdn(g: _Graph, lr: str, model: RDN) -> str:
    f1 = _conv(g, lr, model.SFENet1, "SFENet1")
    x = _conv(g, f1, model.SFENet2, "SFENet2")
    outs = []
    for i, rdb in enumerate(model.RDBs):
        name = f"RDBs.{i}"
        if isinstance(rdb, QuantRDB):
            xin, qp = _act(g, x, rdb.quant_act1, f"{name}.quant_act1")
            cur = xin
            for j, layer in enumerate(rdb.convs):
                cur = _dense(g, cur, layer, qp if j == 0 else None, f"{name}.convs.{j}")
            a, qp2 = _act(g, cur, rdb.quant_act2, f"{name}.quant_act2")
            x = g.op("Add", [_conv(g, a, rdb.LFF, f"{name}.LFF", in_q=qp2), xin], name)
        elif isinstance(rdb, RDB):
            cur = x
            for j, layer in enumerate(rdb.convs):
                cur = _dense(g, cur, layer, None, f"{name}.convs.{j}")
            x = g.op("Add", [_conv(g, cur, rdb.LFF, f"{name}.LFF"), x], name)
        else:
            raise ExportError(f"{name}: unexpected {type(rdb).__name__} in RDN.RDBs")
        outs.append(x)
    cat = g.op("Concat", outs, "GFF", axis=1)
    gff = model.GFF
    if isinstance(gff, QuantGFF):
        a, qp = _act(g, cat, gff.quant_act, "GFF.quant_act")
        t = _conv(g, a, gff._modules["0"], "GFF.0", in_q=qp)  # type: ignore[arg-type]
        t = _conv(g, t, gff._modules["1"], "GFF.1")  # type: ignore[arg-type]
    else:
        t = _seq(g, cat, gff, "GFF")
    feat = g.op("Add", [t, f1], "feat")
    return _seq(g, feat, model.UPNet, "UPNet")


_ARCH_EMITTERS = ((EDSR, _edsr), (SRResNet, _srresnet), (RDN, _rdn))
