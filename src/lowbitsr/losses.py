"""Training losses: pixel L1 and PAMS/DDTB structured knowledge transfer (attention transfer).

docs/methods.md §1.6: ``loss = L1(sr, hr) + 1000 * AT(feat_student, feat_teacher)`` with
``AT(a, b) = mean((f(a) - f(b))**2)``, where ``f(t)`` is the channel mean of ``t**2`` flattened
per sample and L2-normalised (Zagoruyko & Komodakis' attention map, as used by PAMS).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_map", "attention_transfer", "l1"]


def l1(sr: Tensor, hr: Tensor) -> Tensor:
    """Mean absolute error; sr, hr: (N, 3, H, W) in the same range."""
    return F.l1_loss(sr, hr)


def attention_map(feat: Tensor, eps: float = 1e-12) -> Tensor:
    """Spatial attention of a feature map.

    Args:
        feat: (N, C, H, W).
    Returns:
        (N, H·W): channel mean of ``feat**2``, flattened, L2-normalised per sample.
    """
    a = feat.pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=eps)


def attention_transfer(student: Tensor, teacher: Tensor) -> Tensor:
    """Structured knowledge transfer loss ``mean((f(student) - f(teacher))**2)``.

    Args:
        student, teacher: (N, C, H, W) pre-tail features (the teacher's is detached here).
    Returns:
        0-dim tensor.
    """
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()
