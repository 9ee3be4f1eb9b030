"""Shared fixtures and helpers: tiny images on disk, tiny float models of the three
architectures and LR batches for the quantization tests (``from conftest import ...``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from lowbitsr.models import create_model

torch.set_num_threads(1)  # tiny models: one thread is faster


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A natural-ish uint8 RGB image: upsampled low-frequency noise plus a little detail."""
    low = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = np.asarray(
        Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=float
    )
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder with four 48×48 RGB PNGs."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.fromarray(smooth_image(rng, 48, 48)).save(d / f"img{i}.png")
    return d


# ------------------------------------------------------------- tiny models for the quant tests
#: the three architectures at their smallest: registry name and overrides (scale 2)
TINY = {
    "edsr": ("edsr_tiny", {"n_resblocks": 2, "n_feats": 8}),
    "rdn": ("rdn", {"G0": 8, "D": 2, "C": 2, "G": 4}),
    "srresnet": ("srresnet", {"n_resblocks": 2, "n_feats": 8}),
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread during the test: for tiny models thread start-up dominates."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def float_model(arch: str, seed: int = 0) -> nn.Module:
    """The tiny float model of ``arch`` (a key of :data:`TINY`), seeded, in eval mode."""
    torch.manual_seed(seed)
    name, kw = TINY[arch]
    return create_model(name, scale=2, **kw).eval()


def lr_batches(n: int = 3, batch: int = 2, size: int = 12, seed: int = 1) -> list[Tensor]:
    """``n`` LR batches in [0, 255] with different brightness and contrast per image, so that
    layer ranges vary across samples (calibration data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = torch.rand(batch, 3, size, size, generator=g)
        gain = torch.linspace(0.3, 1.0, batch).view(batch, 1, 1, 1) * (1 + 0.5 * i)
        out.append((base * gain * 255).clamp(0, 255))
    return out
