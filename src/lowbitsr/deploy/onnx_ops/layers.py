"""ONNX emitters of the float and quantized layers: convolutions (integer QDQ weights),
BatchNorm, PReLU, Sequential, pixel shuffle.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...models.common import MeanShift
from ...quant.gdq_layers import GDQConv2d
from ...quant.granular_dq.model import _HeadTap
from ...quant.layers import (
    QuantConv2d,
)
from ..pack import weight_codes
from .gdq import _gdq_act, _gdq_conv, _gdq_decide
from .graph import ExportError, _f32, _Graph, _QParams


# ------------------------------------------------------------------------------ layers
def _conv(
    g: _Graph,
    x: str,
    conv: nn.Module,
    name: str,
    *,
    in_q: _QParams | None = None,
    fuse: bool = False,
    qdq_float: bool = False,
    post_scale: float = 1.0,
) -> str:
    """``Conv`` of a float, quantized or mean-shift conv; ``post_scale`` multiplies the output
    (folded into the weight scale and bias); ``fuse`` (with ``in_q``) quantizes the bias to
    int32 at ``x_scale * w_scale`` for onnxruntime's QLinearConv fusion. ``qdq_float``: the conv
    sits between two QCDQ quantizers but must stay float (``integer_convs=False``): its weight
    then stays int8 + DequantizeLinear and its bias a separate Add, because onnxruntime would
    quantize a constant float weight and bias of a ``DQ → Conv → Q`` group itself (its
    weight/bias quantization pass), which changes the numbers."""
    if isinstance(conv, _HeadTap):
        return _gdq_decide(g, _seq(g, x, conv.inner, name), name)
    if isinstance(conv, GDQConv2d):
        x = _gdq_act(g, x, conv.act_quant, f"{name}.act_quant")
    if isinstance(conv, MeanShift):
        w = g.init(_f32(conv.weight), f"{name}.weight")
        b = g.init(_f32(conv.bias), f"{name}.bias")
        return g.op("Conv", [x, w, b], name, kernel_shape=[1, 1])
    if not isinstance(conv, nn.Conv2d):
        raise ExportError(f"{name}: cannot export a {type(conv).__name__} as a convolution")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ExportError(f"{name}: only zero padding given as integers is supported")
    attrs = {
        "kernel_shape": list(conv.kernel_size),
        "strides": list(conv.stride),
        "dilations": list(conv.dilation),
        "group": conv.groups,
        "pads": [conv.padding[0], conv.padding[1], conv.padding[0], conv.padding[1]],
    }
    bias = conv.bias
    codes = None
    if isinstance(conv, QuantConv2d) and conv.enabled:
        codes = weight_codes(conv)
        if codes.scheme == "float":
            codes = None
    integer = False
    if codes is not None:
        step, zero = codes.step_and_zero()
        q = codes.codes.cpu().numpy().astype(np.int64)
        grid = q - zero
        peak = max(1, int(np.abs(grid).max()))
        integer = fuse and in_q is not None and peak <= 127
        if not integer and g.float_weights and not (qdq_float or fuse):
            # A conv that runs in float anyway: its fake-quant weight as a float32 constant, so
            # onnxruntime can pre-pack it for its blocked (NCHWc) kernels; a DequantizeLinear
            # output is not constant-folded and would leave the conv on the slower generic path.
            codes = None
    if isinstance(conv, GDQConv2d):
        return _gdq_conv(g, x, conv, name, attrs)
    if codes is None:
        if isinstance(conv, QuantConv2d):
            with torch.no_grad():
                w_np = _f32(conv.quantized_weight())
        else:
            w_np = _f32(conv.weight)
        if post_scale != 1.0:
            w_np = w_np * np.float32(post_scale)
        w = g.init(w_np, f"{name}.weight")
        w_step = None
    else:
        if integer:
            # Integer conv: zero-point-free grid indices (``q - zero``, so onnxruntime can use its
            # symmetric-weight kernels) times M, at step/M. Same weights; the int32 bias step
            # x_scale * w_scale becomes M times finer, so its rounding moves the conv output M
            # times less. M keeps |stored| <= 127 and the u8*s8 pair sums below 2**15 (the
            # saturating 16-bit pair add of AVX2 kernels; VNNI kernels accumulate in 32 bits).
            mult = max(1, min(127 // peak, 32767 // (2 * max(1, in_q.hi) * peak)))
            stored, w_zero, w_step = grid * mult, 0, step * post_scale / mult
        else:
            stored, w_zero, w_step = q, zero, step * post_scale
        w_step = float(np.float32(w_step))
        wq = g.init(stored.astype(np.int8), f"{name}.weight_codes")
        w = g.op(
            "DequantizeLinear",
            [wq, g.const(w_step), g.const(w_zero, np.int8)],
            f"{name}.weight",
        )
        g.report_int_weights.append(name)
    inputs = [x, w]
    if bias is not None:
        b_np = _f32(bias) * np.float32(post_scale)
        if fuse and in_q is not None and w_step is not None:
            b_step = np.float32(in_q.step) * np.float32(w_step)
            bq = np.round(b_np.astype(np.float64) / float(b_step))
            if np.all(np.abs(bq) < 2**31 - 1):
                bq_name = g.init(bq.astype(np.int32), f"{name}.bias_codes")
                inputs.append(
                    g.op(
                        "DequantizeLinear",
                        [bq_name, g.const(float(b_step)), g.const(0, np.int32)],
                        f"{name}.bias",
                    )
                )
                g.report_fusable.append(name)
            else:
                inputs.append(g.init(b_np, f"{name}.bias"))
        elif in_q is not None and codes is not None:
            # A float bias on a DQ -> Conv would be rounded to int32 by onnxruntime's own
            # bias quantization; adding it after the conv keeps the conv float and exact.
            y = g.op("Conv", inputs, name, **attrs)
            shape = (1, -1) + (1,) * (len(conv.kernel_size))
            return g.op("Add", [y, g.init(b_np.reshape(shape), f"{name}.bias")], name)
        else:
            inputs.append(g.init(b_np, f"{name}.bias"))
    elif fuse and in_q is not None and w_step is not None:
        g.report_fusable.append(name)
    return g.op("Conv", inputs, name, **attrs)


def _bn(g: _Graph, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{name}: BatchNorm without running statistics cannot be exported")
    c = bn.num_features
    w = _f32(bn.weight) if bn.weight is not None else np.ones(c, np.float32)
    b = _f32(bn.bias) if bn.bias is not None else np.zeros(c, np.float32)
    ins = [
        x,
        g.init(w, f"{name}.weight"),
        g.init(b, f"{name}.bias"),
        g.init(_f32(bn.running_mean), f"{name}.running_mean"),
        g.init(_f32(bn.running_var), f"{name}.running_var"),
    ]
    return g.op("BatchNormalization", ins, name, epsilon=float(bn.eps))


def _bn_torch_order(g: _Graph, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    """Eval BatchNorm in PyTorch's CPU arithmetic: ``invstd = 1/sqrt(var + eps)``,
    ``alpha = w * invstd``, ``beta = fma(-mean, alpha, b)`` (float32 each), ``out = fma(x, alpha,
    beta)``; the fused multiply-add is emulated in float64 (``x * alpha`` is exact there), so only
    a double rounding can differ. Used in the gates, whose ``Q2`` sits on a lattice of values
    where a one-ulp BN difference would flip rounding ties."""
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"{name}: BatchNorm without running statistics cannot be exported")
    c = bn.num_features
    var = bn.running_var.detach().cpu().to(torch.float32)
    invstd = 1.0 / torch.sqrt(var + bn.eps)
    w = bn.weight.detach().cpu().float() if bn.weight is not None else torch.ones(c)
    b = bn.bias.detach().cpu().float() if bn.bias is not None else torch.zeros(c)
    alpha = (w * invstd).double()
    beta = (b.double() - bn.running_mean.detach().cpu().double() * alpha).float().double()
    shape = (1, c, 1, 1)
    x64 = g.op("Cast", [x], name, to=11)  # DOUBLE
    y = g.op("Mul", [x64, g.init(alpha.numpy().reshape(shape), f"{name}.alpha")], name)
    y = g.op("Add", [y, g.init(beta.numpy().reshape(shape), f"{name}.beta")], name)
    return g.op("Cast", [y], name, to=1)  # FLOAT


def _prelu(g: _Graph, x: str, act: nn.PReLU, name: str) -> str:
    slope = _f32(act.weight)
    if slope.size > 1:
        slope = slope.reshape(-1, 1, 1)
    return g.op("PRelu", [x, g.init(slope, f"{name}.weight")], name)


def _seq(g: _Graph, x: str, mod: nn.Module, name: str) -> str:
    """Float modules: Conv2d, PixelShuffle, ReLU, PReLU, BatchNorm2d, MeanShift, Sequential."""
    if isinstance(mod, nn.Sequential):
        for child_name, child in mod.named_children():
            x = _seq(g, x, child, f"{name}.{child_name}")
        return x
    if isinstance(mod, (nn.Conv2d, MeanShift, _HeadTap)):
        return _conv(g, x, mod, name)
    if isinstance(mod, nn.PixelShuffle):
        return _pixel_shuffle(g, x, int(mod.upscale_factor), name)
    if isinstance(mod, nn.ReLU):
        return g.op("Relu", [x], name)
    if isinstance(mod, nn.PReLU):
        return _prelu(g, x, mod, name)
    if isinstance(mod, nn.BatchNorm2d):
        return _bn(g, x, mod, name)
    raise ExportError(
        f"{name}: no ONNX export for a {type(mod).__name__}; supported models are those of "
        "lowbitsr.models (EDSR, SRResNet, RDN), float or DDTB/PAMS-quantized"
    )


def _pixel_shuffle(g: _Graph, x: str, r: int, name: str) -> str:
    """PyTorch's ``PixelShuffle(r)`` (ONNX ``DepthToSpace``, CRD). With ``g.pixel_shuffle ==
    "transpose"`` as two transposes that onnxruntime runs as row moves rather than its generic
    6-D shuffle: ``[NC, r1, r2, H, W] → [NC, r2, H, r1, W]`` (whole W-rows move) ``→
    [NC, H·r1·W, r2]`` (one interleave). Pure data movement: the same values either way."""
    if g.pixel_shuffle == "depth_to_space":
        return g.op("DepthToSpace", [x], name, blocksize=r, mode="CRD")
    i64 = np.int64
    shape = g.op("Shape", [x], name)
    n = g.op("Slice", [shape, g.const([0], i64), g.const([1], i64)], name)
    h = g.op("Slice", [shape, g.const([2], i64), g.const([3], i64)], name)
    w = g.op("Slice", [shape, g.const([3], i64), g.const([4], i64)], name)
    s1 = g.op("Concat", [g.const([-1, r, r], i64), h, w], name, axis=0)
    t = g.op("Reshape", [x, s1], name)
    t = g.op("Transpose", [t], name, perm=[0, 2, 3, 1, 4])
    t = g.op("Reshape", [t, g.const([0, r, -1], i64)], name)
    t = g.op("Transpose", [t], name, perm=[0, 2, 1])
    hr = g.op("Mul", [h, g.const([r], i64)], name)
    wr = g.op("Mul", [w, g.const([r], i64)], name)
    s2 = g.op("Concat", [n, g.const([-1], i64), hr, wr], name, axis=0)
    return g.op("Reshape", [t, s2], name)
