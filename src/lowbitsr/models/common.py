"""Building blocks shared by the float SR architectures.

The layouts (module nesting, index positions inside ``nn.Sequential``) follow EDSR-PyTorch
(``sanghyun-son/EDSR-PyTorch``, ``src/model/common.py``) so that the state-dict keys of its model
zoo load unchanged. Everything here is plain float PyTorch: no quantization knowledge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DIV2K_RGB_MEAN", "MeanShift", "Upsampler", "default_conv", "supported_upsampler_scale"]

#: Per-channel RGB mean of the DIV2K training set, as fractions of the full range.
DIV2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)


def default_conv(
    in_channels: int, out_channels: int, kernel_size: int, bias: bool = True
) -> nn.Conv2d:
    """A stride-1 ``nn.Conv2d`` with "same" padding (``kernel_size // 2``), bias on by default."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Module):
    """Adds ``sign * rgb_range * rgb_mean / rgb_std`` per channel (after dividing by ``rgb_std``).

    Numerically and in its state dict (``weight`` [C, C, 1, 1], ``bias`` [C]) this is EDSR-PyTorch's
    frozen 1×1 convolution. Two deliberate differences:

    * ``weight``/``bias`` are *buffers*, so they never reach an optimizer and are not listed by
      ``parameters()`` (EDSR-PyTorch keeps them as parameters with ``requires_grad=False``; the
      state-dict keys are the same either way).
    * it is not an ``nn.Conv2d`` subclass, so transforms that swap every ``nn.Conv2d`` for a
      quantized one leave the mean shift in full precision, as both DDTB and PAMS do.

    Input/output: N×C×H×W float tensors in the network's RGB range; not clamped.
    """

    weight: Tensor
    bias: Tensor

    def __init__(
        self,
        rgb_range: float,
        rgb_mean: tuple[float, ...] = DIV2K_RGB_MEAN,
        rgb_std: tuple[float, ...] = (1.0, 1.0, 1.0),
        sign: int = -1,
    ) -> None:
        super().__init__()
        if len(rgb_mean) != len(rgb_std):
            raise ValueError(f"rgb_mean has {len(rgb_mean)} entries but rgb_std has {len(rgb_std)}")
        channels = len(rgb_mean)
        std = torch.tensor(rgb_std, dtype=torch.float32)
        weight = torch.eye(channels).view(channels, channels, 1, 1) / std.view(channels, 1, 1, 1)
        bias = sign * rgb_range * torch.tensor(rgb_mean, dtype=torch.float32) / std
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.rgb_range = float(rgb_range)
        self.sign = sign

    def forward(self, x: Tensor) -> Tensor:
        # A 1×1 conv (not x + bias) so that a checkpoint carrying a non-identity weight, e.g. a
        # per-channel std, is honoured exactly as the original implementation did.
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"rgb_range={self.rgb_range:g}, sign={self.sign:+d}"


def supported_upsampler_scale(scale: int) -> bool:
    """Whether :class:`Upsampler` can build ``scale`` (a power of two, or 3)."""
    return scale >= 2 and ((scale & (scale - 1)) == 0 or scale == 3)


class Upsampler(nn.Sequential):
    """Sub-pixel upsampler: N×C×H×W → N×C×(sH)×(sW).

    For ``scale = 2**n`` it stacks n × (conv C→4C, PixelShuffle(2)); for ``scale = 3`` one
    conv C→9C then PixelShuffle(3). No activation and no normalisation (EDSR's default), which
    puts the convs at indices 0, 2, ... as in EDSR-PyTorch (``tail.0.0``, ``tail.0.2``).
    """

    def __init__(self, scale: int, n_feats: int, bias: bool = True) -> None:
        if not supported_upsampler_scale(scale):
            raise ValueError(f"Upsampler supports scale 3 or a power of two >= 2, got {scale}")
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [default_conv(n_feats, 9 * n_feats, 3, bias), nn.PixelShuffle(3)]
        else:
            for _ in range(round(math.log2(scale))):
                layers += [default_conv(n_feats, 4 * n_feats, 3, bias), nn.PixelShuffle(2)]
        super().__init__(*layers)
