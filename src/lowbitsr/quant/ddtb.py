"""DDTB — Dynamic Dual Trainable Bounds (Zhong et al., ECCV 2022): config and model transform.

:class:`DDTBConfig` is the validated, frozen description of a DDTB quantization;
:func:`ddtb_transform` swaps the residual blocks of an EDSR / RDN / SRResNet for quantized ones
(docs/methods.md §1.5) built from :class:`~lowbitsr.quant.layers.DDTBActQuant` and
:class:`~lowbitsr.quant.layers.QuantConv2d`. Users call :func:`lowbitsr.quant.apply.quantize` and
then :func:`lowbitsr.quant.calibrate.calibrate`; this module only knows the DDTB specifics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn

from ..errors import ConfigError
from .layers import DDTBActQuant, QuantConv2d, QuantSpec, architecture_of, swap_blocks

__all__ = [
    "DDTB_DEFAULT_PERCENTILE",
    "DDTB_DEFAULT_RATIO",
    "DDTBConfig",
    "ddtb_transform",
    "resolved_percentile",
    "resolved_ratio",
]

#: Fraction of quantizers that get a dynamic gate, per architecture (docs/methods.md §1.3).
DDTB_DEFAULT_RATIO: dict[str, float] = {"edsr": 0.3, "srresnet": 0.1, "rdn": 0.5}
#: Percentile ``M`` of the bound initialisation, per architecture (docs/methods.md §1.4).
DDTB_DEFAULT_PERCENTILE: dict[str, float] = {"edsr": 99.0, "srresnet": 99.0, "rdn": 95.0}
#: Weight quantizer per architecture (docs/methods.md §1.2).
_WEIGHT_MODE: dict[str, Literal["percentile", "minmax"]] = {
    "edsr": "percentile",
    "srresnet": "percentile",
    "rdn": "minmax",
}
_COMPAT = ("default", "official")
_LAYOUTS = ("paper", "integer")
#: Percentile of the bound initialisation of the integer layout's upsampler quantizers: at 8
#: bits, clipping 1 % of each tail (the k-bit default) would cost more than the resolution.
WIDE_PERCENTILE = 99.99


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class DDTBConfig:
    """DDTB quantization settings (docs/methods.md §1).

    Attributes:
        bits: weight and activation bit-width, 2, 3 or 4.
        dynamic_ratio: fraction of activation quantizers that get a dynamic gate (top dynamic
            intensity); None = per architecture (EDSR 0.3, SRResNet 0.1, RDN 0.5).
        gate_channels: hidden width of each gate (32).
        gate_bits: bit-width inside the gate (2, ternary weights).
        calib_percentile: ``M`` of the bound initialisation, bounds = ``(100-M)``-th/``M``-th
            percentile; None = 99 for EDSR/SRResNet, 95 for RDN.
        compat: ``"default"`` (the paper's intent: per-sample gate and statistics, trainable gate,
            percentile init at every bit-width) or ``"official"`` (the released code's numerics,
            to load and reproduce the authors' checkpoints).
        layout: ``"paper"`` (§1.5: conv1 of each block reads the unquantized block input; head,
            upsampler and tail in float) or ``"integer"`` (EDSR only; conv1 reads the quantized
            block input, the upsampler convs and the tail conv's input are quantized at
            ``upsampler_bits``, so every body and upsampler conv can run on integer kernels).
            The integer layout has no dynamic gates: a per-sample bound is a per-sample scale
            that integer convolution kernels do not take (``dynamic_ratio`` must be 0 or null).
        upsampler_bits: integer layout: bit-width of the upsampler's weights (symmetric,
            per tensor) and of the quantizers before the upsampler convs and the tail (8).
        stream_bits: integer layout: bit-width of each block's input quantizer (the residual
            stream that conv1 and the skip read); None = ``bits`` (the papers' skip precision).
    """

    method: ClassVar[str] = "ddtb"

    bits: int = 2
    dynamic_ratio: float | None = None
    gate_channels: int = 32
    gate_bits: int = 2
    calib_percentile: float | None = None
    compat: Literal["default", "official"] = "default"
    layout: Literal["paper", "integer"] = "paper"
    upsampler_bits: int = 8
    stream_bits: int | None = None

    def __post_init__(self) -> None:
        check_layout(self.layout, self.upsampler_bits, self.stream_bits)
        if self.layout == "integer":
            if self.dynamic_ratio:
                raise ConfigError(
                    f"quant.dynamic_ratio: the integer layout has static bounds only (a gate's "
                    f"per-sample scale does not fit integer kernels), got {self.dynamic_ratio!r}; "
                    "remove the key or use 'layout: paper'"
                )
            if self.compat == "official":
                raise ConfigError(
                    "quant.layout: 'integer' is not the authors' layout; use it with "
                    "'compat: default'"
                )
        if not _is_int(self.bits) or self.bits not in (2, 3, 4):
            raise ConfigError(
                f"quant.bits: DDTB quantizes to 2, 3 or 4 bits, got {self.bits!r}; write e.g. "
                "'bits: 2' (for 8 bits use method: pams)"
            )
        if self.dynamic_ratio is not None:
            if not _is_number(self.dynamic_ratio) or not 0.0 <= self.dynamic_ratio <= 1.0:
                raise ConfigError(
                    f"quant.dynamic_ratio: must be a number in [0, 1] or null, got "
                    f"{self.dynamic_ratio!r}; write e.g. 'dynamic_ratio: 0.3', or null for the "
                    "per-architecture default"
                )
            object.__setattr__(self, "dynamic_ratio", float(self.dynamic_ratio))
        if not _is_int(self.gate_channels) or self.gate_channels < 1:
            raise ConfigError(
                f"quant.gate_channels: must be a positive int, got {self.gate_channels!r}; the "
                "paper uses 'gate_channels: 32'"
            )
        if not _is_int(self.gate_bits) or not 2 <= self.gate_bits <= 8:
            raise ConfigError(
                f"quant.gate_bits: must be an int in 2..8, got {self.gate_bits!r}; the paper uses "
                "'gate_bits: 2'"
            )
        if self.calib_percentile is not None:
            p = self.calib_percentile
            if not _is_number(p) or not 50.0 < p <= 100.0:
                raise ConfigError(
                    f"quant.calib_percentile: must be a percentile in (50, 100] or null, got "
                    f"{p!r}; write e.g. 'calib_percentile: 99'"
                )
            object.__setattr__(self, "calib_percentile", float(p))
        if self.compat not in _COMPAT:
            raise ConfigError(
                f"quant.compat: must be 'default' or 'official', got {self.compat!r}; use "
                "'official' only to load or reproduce the DDTB authors' checkpoints"
            )


def check_layout(layout: object, upsampler_bits: object, stream_bits: object = None) -> None:
    """Validate the ``layout``, ``upsampler_bits`` and ``stream_bits`` keys of DDTB and PAMS.

    Raises:
        ConfigError: an unknown layout or a bit-width outside 2..8 (the key named).
    """
    if layout not in _LAYOUTS:
        raise ConfigError(
            f"quant.layout: must be 'paper' or 'integer', got {layout!r}; 'integer' quantizes "
            "every body and upsampler conv input so the model runs on integer kernels"
        )
    for key, v in (("upsampler_bits", upsampler_bits), ("stream_bits", stream_bits)):
        if key == "stream_bits" and v is None:
            continue
        if not _is_int(v) or not 2 <= v <= 8:  # type: ignore[operator]
            raise ConfigError(
                f"quant.{key}: must be an int in 2..8, got {v!r}; write e.g. '{key}: 8'"
            )
    if stream_bits is not None and layout != "integer":
        raise ConfigError("quant.stream_bits: only for 'layout: integer'; remove the key")


def resolved_ratio(config: DDTBConfig, arch: str) -> float:
    """``config.dynamic_ratio``, or the architecture default when it is None (0 in the integer
    layout, which has no gates)."""
    if config.layout == "integer":
        return 0.0
    return DDTB_DEFAULT_RATIO[arch] if config.dynamic_ratio is None else config.dynamic_ratio


def resolved_percentile(config: DDTBConfig, arch: str) -> float:
    """``config.calib_percentile``, or the architecture default when it is None."""
    if config.calib_percentile is None:
        return DDTB_DEFAULT_PERCENTILE[arch]
    return config.calib_percentile


def ddtb_transform(model: nn.Module, config: DDTBConfig) -> None:
    """Swap ``model``'s residual blocks for DDTB-quantized ones, in place (docs/methods.md §1.5).

    Activation quantizers start static with bounds ``±10``; gates are attached and bounds set by
    :func:`~lowbitsr.quant.calibrate.calibrate` (or by loading a checkpoint).
    """
    arch = architecture_of(model)
    official = config.compat == "official"
    percentile = resolved_percentile(config, arch)
    w_mode = _WEIGHT_MODE[arch]

    def make_act(channels: int, like: Tensor) -> nn.Module:
        return DDTBActQuant(
            config.bits,
            channels,
            calib_percentile=percentile,
            official=official,
            gate_channels=config.gate_channels,
            gate_bits=config.gate_bits,
            device=like.device,
            dtype=like.dtype,
        )

    def make_conv(conv: nn.Conv2d) -> nn.Module:
        return QuantConv2d.from_float(
            conv, w_bits=config.bits, w_mode=w_mode, clamp_codes=not official
        )

    def make_wide_act(channels: int, like: Tensor, bits: int | None = None) -> nn.Module:
        bits = config.upsampler_bits if bits is None else bits
        return DDTBActQuant(
            bits,
            channels,
            calib_percentile=WIDE_PERCENTILE if bits >= 8 else percentile,
            device=like.device,
            dtype=like.dtype,
        )

    stream = config.stream_bits

    # The authors' DDTB_RDN also min/max-quantizes GFF.1's weight (not its input); our layout
    # (docs/methods.md §1.5) keeps the last body conv FP, so only the official compat mode does it.
    last = make_conv if (official and arch == "rdn") else None
    spec = QuantSpec(
        "ddtb",
        make_act,
        make_conv,
        last,
        layout=config.layout,
        make_wide_act=make_wide_act,
        make_wide_conv=lambda conv: wide_conv(conv, config.upsampler_bits),
        make_stream_act=None if stream is None else lambda c, like: make_wide_act(c, like, stream),
    )
    swap_blocks(model, spec)


def wide_conv(conv: nn.Conv2d, bits: int) -> QuantConv2d:
    """An upsampler conv of the integer layout: symmetric per-tensor max-abs weights at ``bits``
    (codes ``-(2**(bits-1)-1) .. 2**(bits-1)-1``: zero-point-free, what the s8 weight kernels
    take), its input at ``bits`` too (``a_bits``, for the BitOPs count)."""
    q = QuantConv2d.from_float(conv, w_bits=bits, w_mode="pams")
    q.a_bits = bits
    return q
