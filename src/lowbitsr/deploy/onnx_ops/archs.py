"""ONNX emitters of whole architectures (EDSR, SRResNet, RDN) from the layer emitters."""

from __future__ import annotations

from torch import nn

from ...models.edsr import EDSR, ResBlock
from ...models.rdn import RDB, RDN, DenseLayer
from ...models.srresnet import SRResBlock, SRResNet
from ...quant.layers import (
    QuantDenseLayer,
    QuantGFF,
    QuantRDB,
    QuantResBlock,
    QuantSRResBlock,
)
from .graph import ExportError, _Graph, _QParams
from .layers import _bn, _conv, _prelu, _seq
from .quantizers import _act, _is_static


# ------------------------------------------------------------------------------ architectures
def _edsr(g: _Graph, lr: str, model: EDSR) -> str:
    x = _conv(g, lr, model.sub_mean, "sub_mean")
    x = _seq(g, x, model.head, "head")
    h = x
    for i, blk in enumerate(model.body):
        name = f"body.{i}"
        if isinstance(blk, QuantResBlock):
            r, _ = _act(g, h, blk.quant_act1, f"{name}.quant_act1")
            t = _conv(g, h, blk.body[0], f"{name}.body.0")
            t = _seq(g, t, blk.body[1], f"{name}.body.1")
            t, qp = _act(g, t, blk.quant_act2, f"{name}.quant_act2")
            between = qp is not None and _is_static(g, blk.quant_act3)
            t = _conv(
                g,
                t,
                blk.body[2],
                f"{name}.body.2",
                in_q=qp,
                fuse=between and g.integer_convs,
                qdq_float=between and not g.integer_convs,
                post_scale=blk.res_scale,
            )
            t, _ = _act(g, t, blk.quant_act3, f"{name}.quant_act3")
            h = g.op("Add", [t, r], name)
        elif isinstance(blk, ResBlock):
            t = _seq(g, h, blk.body, f"{name}.body")
            if blk.res_scale != 1.0:
                t = g.op("Mul", [t, g.const(blk.res_scale)], name)
            h = g.op("Add", [t, h], name)
        else:
            h = _seq(g, h, blk, name)
    feat = g.op("Add", [h, x], "body")
    return _conv(g, _seq(g, feat, model.tail, "tail"), model.add_mean, "add_mean")


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
