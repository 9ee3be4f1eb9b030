"""EDSR (Lim et al., CVPRW 2017), laid out exactly like EDSR-PyTorch's ``src/model/edsr.py``.

State-dict keys (for ``n_resblocks = R``)::

    sub_mean.{weight,bias}  add_mean.{weight,bias}     frozen mean shift (1×1 conv form)
    head.0.{weight,bias}                              conv n_colors → n_feats
    body.{i}.body.0.*, body.{i}.body.2.*  (i < R)     ResBlock conv1, conv2
    body.{R}.*                                        conv after the residual blocks
    tail.0.{0,2,...}.*                                upsampler convs (×2: 0; ×3: 0; ×4: 0, 2)
    tail.1.*                                          conv n_feats → n_colors

so EDSR-PyTorch model-zoo files (``edsr_baseline_x4-6b446fab.pt``, ``edsr_x4-4f62e9ef.pt``, ...)
load with strict key matching and give the same outputs.

File order (timm style): blocks, model, checkpoint key remapping, registered variants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor, nn

from .common import DIV2K_RGB_MEAN, MeanShift, Upsampler, default_conv
from .registry import register_model

__all__ = ["EDSR", "ResBlock", "edsr_keys_from_basicsr", "is_basicsr_edsr"]


# ----------------------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """EDSR residual block: ``x + res_scale * conv2(relu(conv1(x)))``, no BatchNorm.

    The convs live in ``self.body`` (``body.0`` = conv1, ``body.1`` = ReLU, ``body.2`` = conv2) to
    keep EDSR-PyTorch's state-dict keys; ``conv1``, ``act`` and ``conv2`` are named aliases for
    reading *and* assigning (``block.conv1 = QuantConv2d(...)`` replaces ``body.0``).

    Shapes: N×F×H×W → N×F×H×W, float32, any range.
    """

    _ALIASES: ClassVar[dict[str, int]] = {"conv1": 0, "act": 1, "conv2": 2}

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        # A fresh ReLU per block (EDSR-PyTorch shares one inplace instance) so that module swaps
        # and forward hooks see a distinct, non-inplace activation at every position.
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, kernel_size),
            nn.ReLU(),
            default_conv(n_feats, n_feats, kernel_size),
        )
        self.res_scale = float(res_scale)

    @property
    def conv1(self) -> nn.Module:
        return self.body[0]

    @property
    def act(self) -> nn.Module:
        return self.body[1]

    @property
    def conv2(self) -> nn.Module:
        return self.body[2]

    def __setattr__(self, name: str, value: object) -> None:
        # nn.Module.__setattr__ would register a *new* child instead of calling the property, so
        # route the aliases into ``body`` to keep keys and forward in sync.
        if name in self._ALIASES and isinstance(value, nn.Module) and "body" in self._modules:
            self.body[self._ALIASES[name]] = value
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        h = self.act(h)
        h = self.conv2(h)
        return h * self.res_scale + x

    def extra_repr(self) -> str:
        return f"res_scale={self.res_scale:g}"


# ------------------------------------------------------------------------------------------ model
class EDSR(nn.Module):
    """Enhanced Deep Residual network for single-image super-resolution.

    Args:
        scale: upscaling factor (2, 3 or 4; the upsampler also builds 8, 16, ...).
        n_resblocks: number of :class:`ResBlock` in the body.
        n_feats: feature channels.
        res_scale: residual scaling inside each block (0.1 for the 256-channel EDSR).
        rgb_range: value of white in the input/output (255 for EDSR-PyTorch checkpoints).
        n_colors: image channels; must be 3 (the DIV2K mean shift is defined for RGB).
        kernel_size: spatial size of every 3×3-style conv.

    Input/output contract (:meth:`forward`): ``lr`` is N×3×H×W float32 RGB in [0, rgb_range];
    returns N×3×(scale·H)×(scale·W) float32 in the same range, *not* clamped.
    """

    def __init__(
        self,
        scale: int,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float = 1.0,
        rgb_range: float = 255.0,
        n_colors: int = 3,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        _check_positive(n_resblocks=n_resblocks, n_feats=n_feats, kernel_size=kernel_size)
        if rgb_range <= 0:
            raise ValueError(f"rgb_range must be > 0, got {rgb_range}")
        if n_colors != len(DIV2K_RGB_MEAN):
            raise ValueError(
                f"EDSR's mean shift is defined for RGB; n_colors must be 3, got {n_colors}"
            )
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.scale = scale
        self.rgb_range = float(rgb_range)
        self.n_feats = n_feats

        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, kernel_size))
        self.body = nn.Sequential(
            *(ResBlock(n_feats, kernel_size, res_scale) for _ in range(n_resblocks)),
            default_conv(n_feats, n_feats, kernel_size),
        )
        self.tail = nn.Sequential(
            Upsampler(scale, n_feats),
            default_conv(n_feats, n_colors, kernel_size),
        )

    def forward_features(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Super-resolve ``lr`` and also return the pre-tail feature used for distillation.

        Args:
            lr: N×3×H×W float32 RGB in [0, rgb_range].
        Returns:
            ``(sr, feat)``: sr is N×3×(sH)×(sW) in [0, rgb_range] (not clamped); feat is the
            N×n_feats×H×W tensor entering ``tail`` (body output + head output).
        """
        feat = self.features(lr)
        return self.add_mean(self.tail(feat)), feat

    def features(self, lr: Tensor) -> Tensor:
        """Only the pre-tail feature (N×n_feats×H×W): a distillation teacher needs no tail."""
        x = self.head(self.sub_mean(lr))
        return self.body(x) + x

    def forward(self, lr: Tensor) -> Tensor:
        """N×3×H×W RGB in [0, rgb_range] → N×3×(sH)×(sW) in the same range (not clamped)."""
        return self.forward_features(lr)[0]


def _check_positive(**values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------- checkpoint key remapping
_BASICSR_BLOCK = re.compile(r"^body\.(\d+)\.conv([12])\.(weight|bias)$")
_BASICSR_UPSAMPLE = re.compile(r"^upsample\.(\d+)\.(weight|bias)$")


def is_basicsr_edsr(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses BasicSR's EDSR key names (``conv_first``, ``conv_after_body``).

    ``conv_first`` alone is not enough: BasicSR's RRDBNet and others use it too.
    """
    return "conv_first.weight" in state_dict and "conv_after_body.weight" in state_dict


def edsr_keys_from_basicsr(
    state_dict: Mapping[str, Tensor], rgb_range: float = 255.0
) -> dict[str, Tensor]:
    """Rename a BasicSR ``EDSR`` state dict (``basicsr/archs/edsr_arch.py``) into our layout.

    Key mapping (R = number of residual blocks found)::

        conv_first.*            -> head.0.*
        body.{i}.conv1.*        -> body.{i}.body.0.*
        body.{i}.conv2.*        -> body.{i}.body.2.*
        conv_after_body.*       -> body.{R}.*
        upsample.{j}.*          -> tail.0.{j}.*
        conv_last.*             -> tail.1.*

    Mean handling: BasicSR keeps the DIV2K mean as a plain attribute (not saved) and computes
    ``conv_first((x - mean) * img_range)`` on x in [0, 1], returning ``y / img_range + mean``.
    Our EDSR computes ``conv_first(X - rgb_range * mean)`` on X in [0, rgb_range] and returns
    ``y + rgb_range * mean``. With ``rgb_range == img_range`` (255 in every BasicSR EDSR config)
    and ``X = img_range * x`` the two are the same function: identical in exact arithmetic and
    equal to float32 rounding (about 1e-6 relative), with our output scaled by ``img_range``.
    So: build the target model with ``rgb_range`` = BasicSR's ``img_range`` and feed it
    [0, rgb_range] input. The returned ``sub_mean``/``add_mean`` tensors are built for
    ``rgb_range``; if the file carries a ``mean`` tensor (3 values, some forks register the mean as
    a buffer) those values replace the DIV2K mean. Unrecognised keys are passed through unchanged
    so that a strict load reports them.

    Args:
        state_dict: a canonicalised BasicSR EDSR state dict (no ``params``/``params_ema`` wrapper).
        rgb_range: the target model's ``rgb_range``.
    Returns:
        A new dict in EDSR-PyTorch key layout, including ``sub_mean``/``add_mean``.
    """
    n_blocks = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := _BASICSR_BLOCK.match(k))), default=-1
    )
    out: dict[str, Tensor] = {}
    rgb_mean: tuple[float, ...] = DIV2K_RGB_MEAN
    for key, value in state_dict.items():
        if key == "mean" and value.numel() == len(DIV2K_RGB_MEAN):
            rgb_mean = tuple(float(v) for v in value.flatten())
            continue
        if m := _BASICSR_BLOCK.match(key):
            idx = 0 if m.group(2) == "1" else 2
            out[f"body.{m.group(1)}.body.{idx}.{m.group(3)}"] = value
        elif m := _BASICSR_UPSAMPLE.match(key):
            out[f"tail.0.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith("conv_first."):
            out["head.0." + key.removeprefix("conv_first.")] = value
        elif key.startswith("conv_after_body."):
            out[f"body.{n_blocks}." + key.removeprefix("conv_after_body.")] = value
        elif key.startswith("conv_last."):
            out["tail.1." + key.removeprefix("conv_last.")] = value
        else:
            out[key] = value
    for prefix, sign in (("sub_mean", -1), ("add_mean", 1)):
        shift = MeanShift(rgb_range, rgb_mean=rgb_mean, sign=sign)
        out[f"{prefix}.weight"] = shift.weight
        out[f"{prefix}.bias"] = shift.bias
    return out


# --------------------------------------------------------------------------------------- variants
@register_model("edsr_baseline", scales=(2, 3, 4))
def edsr_baseline(
    scale: int = 4,
    *,
    n_resblocks: int = 16,
    n_feats: int = 64,
    res_scale: float = 1.0,
    rgb_range: float = 255.0,
    n_colors: int = 3,
) -> EDSR:
    """EDSR-baseline: 16 blocks, 64 features, res_scale 1 (EDSR-PyTorch ``r16f64``)."""
    return EDSR(scale, n_resblocks, n_feats, res_scale, rgb_range, n_colors)


@register_model("edsr", scales=(2, 3, 4))
def edsr(
    scale: int = 4,
    *,
    n_resblocks: int = 32,
    n_feats: int = 256,
    res_scale: float = 0.1,
    rgb_range: float = 255.0,
    n_colors: int = 3,
) -> EDSR:
    """Full EDSR: 32 blocks, 256 features, res_scale 0.1 (EDSR-PyTorch ``r32f256``)."""
    return EDSR(scale, n_resblocks, n_feats, res_scale, rgb_range, n_colors)


@register_model("edsr_tiny", scales=(2, 3, 4))
def edsr_tiny(
    scale: int = 4,
    *,
    n_resblocks: int = 4,
    n_feats: int = 32,
    res_scale: float = 1.0,
    rgb_range: float = 255.0,
    n_colors: int = 3,
) -> EDSR:
    """A 4-block, 32-feature EDSR for CPU demos and tests (same code as the others)."""
    return EDSR(scale, n_resblocks, n_feats, res_scale, rgb_range, n_colors)
