"""SRResNet with BatchNorm (Ledig et al., CVPR 2017), keyed like the DDTB authors' ``bnsrresnet``.

This follows ``model/bnsrresnet_org.py`` of ``zysxmu/DDTB`` (the float teacher whose checkpoints
``bnsrresnet_baseline_x{2,4}.pt`` their quantized runs start from). State-dict keys::

    conv_input.weight                     9×9 conv n_colors → F, no bias
    relu.weight                           PReLU (one shared slope)
    residual.{i}.conv1.weight             3×3, no bias
    residual.{i}.in1.*                    BatchNorm2d (weight, bias, running_*, num_batches_tracked)
    residual.{i}.relu.weight              PReLU
    residual.{i}.conv2.weight, .in2.*
    conv_mid.weight, bn_mid.*             3×3 conv + BN after the blocks
    upscale.{0,2}.*           (×2)        conv F → 4F, PixelShuffle(2), PReLU
    upscale.{0,2,3,5}.*       (×4)        the same twice
    conv_output.weight                    9×9 conv F → n_colors, no bias

Input convention (as in the DDTB code, whose ``rgb_range`` defaults to 255): RGB in [0, 255] fed
directly, **no mean shift and no normalisation**; the output is in the same range, not clamped.
``rgb_range`` only records that range for the data pipeline.

File order (timm style): blocks, model, variants.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .registry import register_model

__all__ = ["SRResBlock", "SRResNet"]


# ----------------------------------------------------------------------------------------- blocks
class SRResBlock(nn.Module):
    """``x + in2(conv2(relu(in1(conv1(x)))))`` with 3×3 bias-free convs, BN and PReLU.

    Shapes: N×F×H×W → N×F×H×W.
    """

    def __init__(self, n_feats: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False)
        self.in1 = nn.BatchNorm2d(n_feats)
        self.relu = nn.PReLU()
        self.conv2 = nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False)
        self.in2 = nn.BatchNorm2d(n_feats)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.in1(self.conv1(x)))
        h = self.in2(self.conv2(h))
        return h + x


# ------------------------------------------------------------------------------------------ model
class SRResNet(nn.Module):
    """SRResNet (BN variant) for ×2 or ×4.

    Args:
        scale: 2 or 4.
        n_resblocks: number of :class:`SRResBlock` (16 in the paper and DDTB).
        n_feats: feature channels (64).
        rgb_range: the input range the weights expect (255); informational, no mean shift.
        n_colors: image channels.

    Input/output contract (:meth:`forward`): ``lr`` is N×n_colors×H×W float32 in
    [0, rgb_range]; returns N×n_colors×(sH)×(sW) float32 in the same range, not clamped.
    BatchNorm makes train-mode outputs batch dependent; call ``.eval()`` for inference.
    """

    def __init__(
        self,
        scale: int,
        n_resblocks: int = 16,
        n_feats: int = 64,
        rgb_range: float = 255.0,
        n_colors: int = 3,
    ) -> None:
        super().__init__()
        for k, v in {"n_resblocks": n_resblocks, "n_feats": n_feats, "n_colors": n_colors}.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if rgb_range <= 0:
            raise ValueError(f"rgb_range must be > 0, got {rgb_range}")
        if scale not in (2, 4):
            raise ValueError(f"SRResNet supports scale 2 or 4, got {scale}")
        self.scale = scale
        self.rgb_range = float(rgb_range)
        self.n_feats = n_feats

        self.conv_input = nn.Conv2d(n_colors, n_feats, 9, padding=4, bias=False)
        self.relu = nn.PReLU()
        self.residual = nn.Sequential(*(SRResBlock(n_feats) for _ in range(n_resblocks)))
        self.conv_mid = nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False)
        self.bn_mid = nn.BatchNorm2d(n_feats)
        up: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            up += [
                nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1, bias=False),
                nn.PixelShuffle(2),
                nn.PReLU(),
            ]
        self.upscale = nn.Sequential(*up)
        self.conv_output = nn.Conv2d(n_feats, n_colors, 9, padding=4, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal over fan-out (k·k·out), the SRResNet reference init the DDTB code also uses.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Super-resolve ``lr`` and also return the pre-upsampler feature for distillation.

        Args:
            lr: N×n_colors×H×W float32 in [0, rgb_range].
        Returns:
            ``(sr, feat)``: sr is N×n_colors×(sH)×(sW) (not clamped); feat is the N×n_feats×H×W
            tensor entering ``upscale`` (``bn_mid(conv_mid(residual(h))) + h``, h the head output).
        """
        feat = self.features(lr)
        return self.conv_output(self.upscale(feat)), feat

    def features(self, lr: Tensor) -> Tensor:
        """Only the pre-upsampler feature (N×n_feats×H×W): a distillation teacher needs no tail."""
        h = self.relu(self.conv_input(lr))
        return self.bn_mid(self.conv_mid(self.residual(h))) + h

    def forward(self, lr: Tensor) -> Tensor:
        """N×n_colors×H×W in [0, rgb_range] → N×n_colors×(sH)×(sW), same range, not clamped."""
        return self.forward_features(lr)[0]


# --------------------------------------------------------------------------------------- variants
@register_model("srresnet", scales=(2, 4))
def srresnet(
    scale: int = 4,
    *,
    n_resblocks: int = 16,
    n_feats: int = 64,
    rgb_range: float = 255.0,
    n_colors: int = 3,
) -> SRResNet:
    """SRResNet with BatchNorm: 16 blocks, 64 features (DDTB's ``bnsrresnet``)."""
    return SRResNet(scale, n_resblocks, n_feats, rgb_range, n_colors)
