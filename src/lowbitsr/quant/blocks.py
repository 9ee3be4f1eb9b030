"""Quantized versions of the SR residual blocks (docs/methods.md §1.5) and the swap of a whole
float model's blocks (:func:`swap_blocks`). Re-exported by :mod:`lowbitsr.quant.layers`.

The block wrappers keep the float block's conv submodules (swapped for :class:`QuantConv2d`, which
shares the float ``Parameter`` objects) under the same child names, so the float weights keep their
state-dict keys (``body.0.body.0.weight``, ``residual.3.conv1.weight``, ``RDBs.0.LFF.weight``...).
Every wrapper has ``to_float()`` that rebuilds the float block around the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.edsr import EDSR, ResBlock
from ..models.rdn import RDB, RDN, DenseLayer
from ..models.srresnet import SRResBlock, SRResNet
from .qmodules import QuantConv2d


# ------------------------------------------------------------------------------ block wrappers
@dataclass(frozen=True)
class QuantSpec:
    """How a method quantizes the §1.5 positions.

    ``make_act(channels, like)`` builds an activation quantizer for a ``channels``-channel input
    on ``like``'s device and dtype; ``make_conv(conv)`` swaps a body conv; ``make_last_conv``
    swaps RDN's ``GFF.1`` (None keeps it in full precision, docs/methods.md §1.5 "last body conv").
    """

    method: str
    make_act: Callable[[int, Tensor], nn.Module]
    make_conv: Callable[[nn.Conv2d], nn.Module]
    make_last_conv: Callable[[nn.Conv2d], nn.Module] | None = None
    #: ``"paper"`` (§1.5) or ``"integer"`` (EDSR only: conv1 reads the quantized block input and
    #: the upsampler convs and the tail conv get quantized inputs, see :class:`QuantInputConv`)
    layout: str = "paper"
    #: integer layout: the upsampler's activation quantizer and conv (``upsampler_bits``)
    make_wide_act: Callable[[int, Tensor], nn.Module] | None = None
    make_wide_conv: Callable[[nn.Conv2d], nn.Module] | None = None
    #: integer layout: the block-input quantizer QA1 (the residual stream); None = make_act
    make_stream_act: Callable[[int, Tensor], nn.Module] | None = None


def _as_float(m: nn.Module) -> nn.Module:
    return m.to_float() if isinstance(m, QuantConv2d) else m


class QuantResBlock(nn.Module):
    """EDSR :class:`~lowbitsr.models.edsr.ResBlock` with the PAMS/DDTB positions (§1.5):

    ``r = QA1(x); h = QConv1(x); h = QA2(relu(h)); h = QConv2(h) * res_scale; out = QA3(h) + r``

    (conv1 sees the unquantized block input). In the integer layout (``integer`` True) conv1
    reads ``r`` instead, so both convs of the block multiply k-bit codes by k-bit weights and
    the block output is the sum of two k-bit streams, which the next block's ``QA1`` quantizes
    again. Keys (both layouts): ``quant_act1``, ``body.0`` (conv1), ``body.1`` (ReLU),
    ``body.2`` (conv2), ``quant_act2``, ``quant_act3``. Shapes: N×F×H×W → N×F×H×W.
    """

    def __init__(self, block: ResBlock, spec: QuantSpec) -> None:
        super().__init__()
        conv1, conv2 = block.body[0], block.body[2]
        feats, like = conv1.in_channels, conv1.weight
        self.integer = spec.layout == "integer"
        make_stream = spec.make_stream_act if self.integer else None
        self.quant_act1 = (make_stream or spec.make_act)(feats, like)
        self.body = nn.Sequential(spec.make_conv(conv1), block.body[1], spec.make_conv(conv2))
        self.quant_act2 = spec.make_act(conv1.out_channels, like)
        self.quant_act3 = spec.make_act(conv2.out_channels, like)
        self.res_scale = block.res_scale
        self.train(block.training)

    def forward(self, x: Tensor) -> Tensor:
        r = self.quant_act1(x)
        h = self.body[1](self.body[0](r if self.integer else x))
        h = self.body[2](self.quant_act2(h)) * self.res_scale
        return self.quant_act3(h) + r

    def to_float(self) -> ResBlock:
        conv1, conv2 = _as_float(self.body[0]), _as_float(self.body[2])
        with torch.device("meta"):
            blk = ResBlock(conv1.in_channels, conv1.kernel_size[0], self.res_scale)
        blk.body = nn.Sequential(conv1, self.body[1], conv2)
        return blk.train(self.training)

    def extra_repr(self) -> str:
        return f"res_scale={self.res_scale:g}" + (", layout=integer" if self.integer else "")


class QuantInputConv(nn.Module):
    """A conv whose input is quantized: ``conv(quant_act(x))``, its output too when
    ``quant_out`` is given (integer layout's upsampler convs and tail conv). Keys:
    ``quant_act``, ``conv``, ``quant_out``. Shapes: those of ``conv``."""

    def __init__(
        self, quant_act: nn.Module, conv: nn.Module, quant_out: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.quant_act = quant_act
        self.conv = conv
        self.register_module("quant_out", quant_out)
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.quant_act(x))
        return y if self.quant_out is None else self.quant_out(y)

    def to_float(self) -> nn.Module:
        return _as_float(self.conv).train(self.training)


class QuantSRResBlock(nn.Module):
    """SRResNet block with the §1.5 positions:
    ``out = BN2(QConv2(QA2(PReLU(BN1(QConv1(QA1(x))))))) + x`` (the skip is not quantized).

    Keys: ``quant_act1``, ``conv1``, ``in1``, ``relu``, ``quant_act2``, ``conv2``, ``in2``.
    Shapes: N×F×H×W → N×F×H×W.
    """

    def __init__(self, block: SRResBlock, spec: QuantSpec) -> None:
        super().__init__()
        like = block.conv1.weight
        self.quant_act1 = spec.make_act(block.conv1.in_channels, like)
        self.conv1 = spec.make_conv(block.conv1)
        self.in1 = block.in1
        self.relu = block.relu
        self.quant_act2 = spec.make_act(block.conv2.in_channels, like)
        self.conv2 = spec.make_conv(block.conv2)
        self.in2 = block.in2
        self.train(block.training)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.in1(self.conv1(self.quant_act1(x))))
        h = self.in2(self.conv2(self.quant_act2(h)))
        return h + x

    def to_float(self) -> SRResBlock:
        conv1 = _as_float(self.conv1)
        with torch.device("meta"):
            blk = SRResBlock(conv1.in_channels)
        blk.conv1, blk.in1, blk.relu = conv1, self.in1, self.relu
        blk.conv2, blk.in2 = _as_float(self.conv2), self.in2
        return blk.train(self.training)


class QuantDenseLayer(nn.Module):
    """RDN dense layer: ``x = QA(x)`` (if it has a quantizer), ``cat(x, relu(QConv(x)))``.

    The first layer of a block has no quantizer of its own: its input is the block input, already
    quantized by :class:`QuantRDB` (as in the DDTB authors' ``DDTB_RDB_Conv_in``). The quantized
    input is what is concatenated. Keys: ``quant_act`` (layers ≥ 1), ``conv.0`` (the conv).
    """

    def __init__(self, layer: DenseLayer, spec: QuantSpec, quantize_input: bool) -> None:
        super().__init__()
        conv = layer.conv[0]
        self.register_module(
            "quant_act", spec.make_act(conv.in_channels, conv.weight) if quantize_input else None
        )
        self.conv = nn.Sequential(spec.make_conv(conv), *list(layer.conv)[1:])
        self.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.quant_act is not None:
            x = self.quant_act(x)
        return torch.cat((x, self.conv(x)), dim=1)

    def to_float(self) -> DenseLayer:
        conv = _as_float(self.conv[0])
        with torch.device("meta"):
            layer = DenseLayer(conv.in_channels, conv.out_channels, conv.kernel_size[0])
        layer.conv = nn.Sequential(conv, *list(self.conv)[1:])
        return layer.train(self.training)


class QuantRDB(nn.Module):
    """RDN residual dense block with the §1.5 positions (DDTB's ``DDTB_RDB``):

    ``x = QA1(x); out = dense layers(x); return QConvLFF(QA2(out)) + x`` — the block input, every
    later dense-layer input and the 1×1 LFF input are quantized; the local skip adds the quantized
    input. Keys: ``quant_act1``, ``convs.{j}`` (:class:`QuantDenseLayer`), ``quant_act2``, ``LFF``.
    Shapes: N×G0×H×W → N×G0×H×W.
    """

    def __init__(self, block: RDB, spec: QuantSpec) -> None:
        super().__init__()
        lff = block.LFF
        self.quant_act1 = spec.make_act(lff.out_channels, lff.weight)
        self.convs = nn.Sequential(
            *(QuantDenseLayer(layer, spec, j > 0) for j, layer in enumerate(block.convs))
        )
        self.quant_act2 = spec.make_act(lff.in_channels, lff.weight)
        self.LFF = spec.make_conv(lff)
        self.train(block.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant_act1(x)
        return self.LFF(self.quant_act2(self.convs(x))) + x

    def to_float(self) -> RDB:
        with torch.device("meta"):
            blk = RDB(1, 1, 1)
        blk.convs = nn.Sequential(*(layer.to_float() for layer in self.convs))
        blk.LFF = _as_float(self.LFF)
        return blk.train(self.training)


class QuantGFF(nn.Module):
    """RDN global feature fusion: ``GFF.1(QConv GFF.0(QA(cat of RDB outputs)))`` (§1.5).

    Children ``quant_act``, ``0`` (the 1×1 fusion conv, quantized) and ``1`` (the 3×3 conv: full
    precision by default as the last body conv; weight-quantized in official compat, as the
    authors' ``DDTB_RDN`` does), so ``GFF.0.weight``/``GFF.1.weight`` keep their keys.
    """

    def __init__(self, gff: nn.Sequential, spec: QuantSpec) -> None:
        super().__init__()
        fuse, last = gff[0], gff[1]
        self.quant_act = spec.make_act(fuse.in_channels, fuse.weight)
        self.add_module("0", spec.make_conv(fuse))
        self.add_module("1", spec.make_last_conv(last) if spec.make_last_conv else last)
        self.train(gff.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._modules["1"](self._modules["0"](self.quant_act(x)))  # type: ignore[misc]

    def to_float(self) -> nn.Sequential:
        seq = nn.Sequential(_as_float(self._modules["0"]), _as_float(self._modules["1"]))
        return seq.train(self.training)


# ------------------------------------------------------------------------------ architectures
class UnsupportedModelError(ConfigError, TypeError):
    """The model is not one of the architectures the quantization transforms know."""


def _swap_edsr(model: nn.Module, spec: QuantSpec) -> None:
    # Paper layout: head, tail/upsampler, mean shifts and the last body conv (a plain Conv2d) stay
    # FP. Integer layout: the upsampler convs and the tail conv (n_feats -> 3, at the output
    # resolution) get a quantized input and quantized weights, and the tail conv a quantized
    # output (8 bits over the image range, about one grey level per step: the rounding the
    # output image gets anyway), so that every conv after the body sits between two static
    # quantizers and runs on integer kernels.
    for i, blk in enumerate(model.body):
        if isinstance(blk, ResBlock):
            model.body[i] = QuantResBlock(blk, spec)
    if spec.layout != "integer":
        return
    assert spec.make_wide_act is not None and spec.make_wide_conv is not None
    ups, last = model.tail[0], model.tail[1]
    for j, m in list(ups.named_children()):
        if isinstance(m, nn.Conv2d):
            ups[int(j)] = QuantInputConv(
                spec.make_wide_act(m.in_channels, m.weight), spec.make_wide_conv(m)
            )
    model.tail[1] = QuantInputConv(
        spec.make_wide_act(last.in_channels, last.weight),
        spec.make_wide_conv(last),
        spec.make_wide_act(last.out_channels, last.weight),
    )


def _swap_srresnet(model: nn.Module, spec: QuantSpec) -> None:
    for i, blk in enumerate(model.residual):
        if isinstance(blk, SRResBlock):
            model.residual[i] = QuantSRResBlock(blk, spec)


def _swap_rdn(model: nn.Module, spec: QuantSpec) -> None:
    for i, blk in enumerate(model.RDBs):
        if isinstance(blk, RDB):
            model.RDBs[i] = QuantRDB(blk, spec)
    model.GFF = QuantGFF(model.GFF, spec)


_ARCHITECTURES: dict[str, tuple[type[nn.Module], Callable[[nn.Module, QuantSpec], None]]] = {
    "edsr": (EDSR, _swap_edsr),
    "rdn": (RDN, _swap_rdn),
    "srresnet": (SRResNet, _swap_srresnet),
}


def architecture_of(model: nn.Module) -> str:
    """``"edsr"``, ``"rdn"`` or ``"srresnet"`` for models of :mod:`lowbitsr.models`.

    Raises:
        UnsupportedModelError: (a ``ConfigError`` and ``TypeError``) for any other class.
    """
    for name, (cls, _) in _ARCHITECTURES.items():
        if isinstance(model, cls):
            return name
    supported = ", ".join(cls.__name__ for cls, _ in _ARCHITECTURES.values())
    raise UnsupportedModelError(
        f"cannot quantize a {type(model).__name__}: the DDTB/PAMS transforms support {supported} "
        "(build one with lowbitsr.models.create_model, e.g. 'edsr_baseline', 'rdn', 'srresnet')"
    )


def swap_blocks(model: nn.Module, spec: QuantSpec) -> None:
    """Replace, in place, every residual block of ``model`` by its quantized wrapper (§1.5).

    Raises:
        ConfigError: ``spec.layout == "integer"`` on another architecture than EDSR.
    """
    arch = architecture_of(model)
    if spec.layout != "paper" and arch != "edsr":
        raise ConfigError(
            f"quant.layout: {spec.layout!r} is implemented for EDSR only, not {arch}; use "
            "'layout: paper'"
        )
    _ARCHITECTURES[arch][1](model, spec)
