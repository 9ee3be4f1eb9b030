"""RDN, Residual Dense Network (Zhang et al., CVPR 2018), laid out like EDSR-PyTorch's ``rdn.py``.

State-dict keys (D residual dense blocks of C dense layers each)::

    SFENet1.*, SFENet2.*                  shallow feature extraction (3×3 convs)
    RDBs.{i}.convs.{j}.conv.0.*           dense layer j of block i: conv (G0 + j·G) → G, then ReLU
    RDBs.{i}.LFF.*                        local feature fusion, 1×1 conv (G0 + C·G) → G0
    GFF.0.*, GFF.1.*                      global feature fusion: 1×1 (D·G0 → G0), 3×3 (G0 → G0)
    UPNet.{0,2}.*     (×2, ×3)            conv G0 → G·s², PixelShuffle(s), conv G → n_colors
    UPNet.{0,2,4}.*   (×4)                conv G0 → 4G, PS(2), conv G → 4G, PS(2), conv G → n_colors

Like EDSR-PyTorch (and the DDTB authors' copy) RDN has **no mean shift**: it takes RGB in
[0, rgb_range] as is. ``rgb_range`` is therefore not part of the architecture; it only records
which range the weights expect (255 for EDSR-PyTorch/DDTB checkpoints) for the data pipeline.

File order (timm style): blocks, model, variants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model

__all__ = ["RDB", "RDN", "DenseLayer"]


# ----------------------------------------------------------------------------------------- blocks
class DenseLayer(nn.Module):
    """One densely connected layer: ``cat(x, relu(conv(x)))`` (EDSR-PyTorch's ``RDB_Conv``).

    ``self.conv`` is ``Sequential(Conv2d, ReLU)`` so the conv's keys are ``conv.0.*``.
    Shapes: N×Cin×H×W → N×(Cin+G)×H×W.
    """

    def __init__(self, in_channels: int, growth: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, growth, kernel_size, padding=(kernel_size - 1) // 2),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x)), dim=1)


class RDB(nn.Module):
    """Residual dense block: C dense layers, a 1×1 local fusion conv and a local skip.

    ``out = LFF(convs(x)) + x``; shapes N×G0×H×W → N×G0×H×W.
    """

    def __init__(self, G0: int, G: int, C: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(DenseLayer(G0 + c * G, G, kernel_size) for c in range(C)))
        self.LFF = nn.Conv2d(G0 + C * G, G0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.LFF(self.convs(x)) + x


# ------------------------------------------------------------------------------------------ model
class RDN(nn.Module):
    """Residual Dense Network.

    Args:
        scale: upscaling factor, 2, 3 or 4.
        G0: feature channels between blocks (64 in both paper configs).
        D: number of residual dense blocks (config B: 16; config A: 20).
        C: dense layers per block (B: 8; A: 6).
        G: growth rate, channels added per dense layer (B: 64; A: 32).
        rgb_range: input/output range the weights expect; informational (no mean shift).
        n_colors: image channels.
        kernel_size: spatial size of the non-1×1 convs (EDSR-PyTorch's ``RDNkSize``).

    Input/output contract (:meth:`forward`): ``lr`` is N×n_colors×H×W float32 in
    [0, rgb_range]; returns N×n_colors×(sH)×(sW) float32 in the same range, not clamped.
    """

    def __init__(
        self,
        scale: int,
        G0: int = 64,
        D: int = 16,
        C: int = 8,
        G: int = 64,
        rgb_range: float = 255.0,
        n_colors: int = 3,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        for k, v in {"G0": G0, "D": D, "C": C, "G": G, "n_colors": n_colors}.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if rgb_range <= 0:
            raise ValueError(f"rgb_range must be > 0, got {rgb_range}")
        if scale not in (2, 3, 4):
            raise ValueError(f"RDN supports scale 2, 3 or 4, got {scale}")
        self.scale = scale
        self.rgb_range = float(rgb_range)
        self.n_feats = G0
        pad = (kernel_size - 1) // 2

        self.SFENet1 = nn.Conv2d(n_colors, G0, kernel_size, padding=pad)
        self.SFENet2 = nn.Conv2d(G0, G0, kernel_size, padding=pad)
        self.RDBs = nn.ModuleList(RDB(G0, G, C, kernel_size) for _ in range(D))
        self.GFF = nn.Sequential(
            nn.Conv2d(D * G0, G0, 1),
            nn.Conv2d(G0, G0, kernel_size, padding=pad),
        )
        if scale == 4:
            up: list[nn.Module] = [
                nn.Conv2d(G0, G * 4, kernel_size, padding=pad),
                nn.PixelShuffle(2),
                nn.Conv2d(G, G * 4, kernel_size, padding=pad),
                nn.PixelShuffle(2),
            ]
        else:
            up = [
                nn.Conv2d(G0, G * scale * scale, kernel_size, padding=pad),
                nn.PixelShuffle(scale),
            ]
        self.UPNet = nn.Sequential(*up, nn.Conv2d(G, n_colors, kernel_size, padding=pad))

    def forward_features(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        """Super-resolve ``lr`` and also return the pre-upsampler feature for distillation.

        Args:
            lr: N×n_colors×H×W float32 in [0, rgb_range].
        Returns:
            ``(sr, feat)``: sr is N×n_colors×(sH)×(sW) (not clamped); feat is the N×G0×H×W
            tensor entering ``UPNet`` (GFF output + SFENet1 output).
        """
        feat = self.features(lr)
        return self.UPNet(feat), feat

    def features(self, lr: Tensor) -> Tensor:
        """Only the pre-upsampler feature (N×G0×H×W): a distillation teacher needs no UPNet."""
        f1 = self.SFENet1(lr)
        x = self.SFENet2(f1)
        block_outputs = []
        for rdb in self.RDBs:
            x = rdb(x)
            block_outputs.append(x)
        return self.GFF(torch.cat(block_outputs, dim=1)) + f1

    def forward(self, lr: Tensor) -> Tensor:
        """N×n_colors×H×W in [0, rgb_range] → N×n_colors×(sH)×(sW), same range, not clamped."""
        return self.forward_features(lr)[0]


# --------------------------------------------------------------------------------------- variants
@register_model("rdn", scales=(2, 3, 4))
def rdn(
    scale: int = 4,
    *,
    G0: int = 64,
    D: int = 16,
    C: int = 8,
    G: int = 64,
    rgb_range: float = 255.0,
    n_colors: int = 3,
) -> RDN:
    """RDN config B (G0 = 64, D = 16, C = 8, G = 64), as used by EDSR-PyTorch and DDTB."""
    return RDN(scale, G0, D, C, G, rgb_range, n_colors)
