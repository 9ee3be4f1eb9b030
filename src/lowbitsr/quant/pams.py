"""PAMS — Parameterized Max Scale (Li et al., ECCV 2020), the baseline DDTB is compared with.

:class:`PAMSConfig` and :func:`pams_transform` (docs/methods.md §1.8). Quantizer positions are
those of DDTB (§1.5), which are PAMS's own for EDSR (``PAMS_ResBlock``: ``quant_act1`` on the skip,
``quant_act2`` after the ReLU, ``quant_act3`` on the scaled residual, conv1 on the unquantized
input) and for RDN (block input, later dense inputs, LFF input, GFF input). PAMS has no SRResNet;
the DDTB positions are used. Weights: symmetric per-tensor max-abs in every quantized conv.
Differences from the PAMS code: RDN's ``GFF.1`` stays FP (docs/methods.md §1.5), and the
``alpha`` initialisation is an explicit calibration step (see
:func:`~lowbitsr.quant.calibrate.calibrate`) instead of the first training epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn

from ..errors import ConfigError
from .ddtb import check_layout, wide_conv
from .layers import PAMSActQuant, QuantConv2d, QuantSpec, swap_blocks

__all__ = ["PAMSConfig", "pams_transform"]


@dataclass(frozen=True)
class PAMSConfig:
    """PAMS quantization settings (docs/methods.md §1.8).

    Attributes:
        bits: weight and activation bit-width, 2..8.
        ema_decay: decay of the ``alpha`` EMA over the calibration batches (PAMS: 0.9997).
        compat: only ``"default"`` (the PAMS numerics are reproduced as is).
        layout: ``"paper"`` (§1.5) or ``"integer"`` (EDSR only, see
            :class:`~lowbitsr.quant.ddtb.DDTBConfig`).
        upsampler_bits: integer layout: bit-width of the upsampler weights and inputs (8).
        stream_bits: integer layout: bit-width of each block's input quantizer (None = bits).
    """

    method: ClassVar[str] = "pams"

    bits: int = 2
    ema_decay: float = 0.9997
    compat: Literal["default"] = "default"
    layout: Literal["paper", "integer"] = "paper"
    upsampler_bits: int = 8
    stream_bits: int | None = None

    def __post_init__(self) -> None:
        check_layout(self.layout, self.upsampler_bits, self.stream_bits)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(
                f"quant.bits: PAMS quantizes to 2..8 bits, got {self.bits!r}; write e.g. 'bits: 4'"
            )
        d = self.ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ConfigError(
                f"quant.ema_decay: must be a number in [0, 1), got {d!r}; PAMS uses "
                "'ema_decay: 0.9997'"
            )
        object.__setattr__(self, "ema_decay", float(d))
        if self.compat != "default":
            raise ConfigError(
                f"quant.compat: PAMS has only 'default', got {self.compat!r}; remove the key or "
                "write 'compat: default'"
            )


def pams_transform(model: nn.Module, config: PAMSConfig) -> None:
    """Swap ``model``'s residual blocks for PAMS-quantized ones, in place (§1.5 positions).

    Every ``alpha`` starts at 10; :func:`~lowbitsr.quant.calibrate.calibrate` sets it.
    """

    def make_act(channels: int, like: Tensor) -> nn.Module:
        del channels  # one clip value per layer, whatever its width
        return PAMSActQuant(
            config.bits, ema_decay=config.ema_decay, device=like.device, dtype=like.dtype
        )

    def make_conv(conv: nn.Conv2d) -> nn.Module:
        return QuantConv2d.from_float(conv, w_bits=config.bits, w_mode="pams")

    def make_wide_act(channels: int, like: Tensor, bits: int | None = None) -> nn.Module:
        del channels
        bits = config.upsampler_bits if bits is None else bits
        return PAMSActQuant(bits, ema_decay=config.ema_decay, device=like.device, dtype=like.dtype)

    stream = config.stream_bits

    spec = QuantSpec(
        "pams",
        make_act,
        make_conv,
        None,
        layout=config.layout,
        make_wide_act=make_wide_act,
        make_wide_conv=lambda conv: wide_conv(conv, config.upsampler_bits),
        make_stream_act=None if stream is None else lambda c, like: make_wide_act(c, like, stream),
    )
    swap_blocks(model, spec)
