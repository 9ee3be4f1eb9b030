"""lowbitsr: ultra-low-bit (2-4 bit) quantization of image super-resolution networks.

Models take N×3×H×W float32 RGB in [0, rgb_range] (255 by default) and return
N×3×(sH)×(sW) in the same range. Typical use::

    import lowbitsr
    model = lowbitsr.create_model("edsr_baseline", scale=4)
    lowbitsr.load_weights(model, "edsr_baseline_x4-6b446fab.pt")    # EDSR-PyTorch model zoo
    sr = model(lr)                                                 # lr: (1, 3, h, w) in [0, 255]
    print(lowbitsr.psnr(sr, hr, crop_border=4))                    # Y channel, MATLAB protocol
"""

from .checkpoint import load_model, save_model
from .config import ExperimentConfig, load_config
from .data import (
    BenchmarkDataset,
    BundledDataset,
    DIV2KDataset,
    ImageFolderDataset,
    build_dataset,
    read_image,
    write_image,
)
from .errors import CheckpointError, ConfigError, DatasetError, ImageError, LowbitsrError
from .evaluate import EvalResult, evaluate, super_resolve, upscale_image
from .imresize import imresize
from .metrics import psnr, rgb_to_y, ssim
from .models import (
    canonicalize_state_dict,
    create_model,
    list_models,
    load_weights,
    read_state_dict,
    save_weights,
)
from .pretrained import list_pretrained, load_pretrained
from .train import train

__version__ = "0.1.0"

__all__ = [
    "BenchmarkDataset",
    "BundledDataset",
    "CheckpointError",
    "ConfigError",
    "DIV2KDataset",
    "DatasetError",
    "EvalResult",
    "ExperimentConfig",
    "ImageError",
    "ImageFolderDataset",
    "LowbitsrError",
    "build_dataset",
    "canonicalize_state_dict",
    "create_model",
    "evaluate",
    "imresize",
    "list_models",
    "list_pretrained",
    "load_config",
    "load_model",
    "load_pretrained",
    "load_weights",
    "psnr",
    "read_image",
    "read_state_dict",
    "rgb_to_y",
    "save_model",
    "save_weights",
    "ssim",
    "super_resolve",
    "train",
    "upscale_image",
    "write_image",
]
