"""Shared fixtures: tiny images on disk and tiny experiment configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
