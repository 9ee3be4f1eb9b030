"""Image I/O and paired (LR, HR) super-resolution datasets.

* :mod:`~lowbitsr.data.io`: :func:`read_image` / :func:`write_image` (uint8 ``H x W x 3`` RGB)
  and tensor conversion.
* :mod:`~lowbitsr.data.datasets`: DIV2K, benchmark (EDSR layout) and image-folder datasets.
* :mod:`~lowbitsr.data.bundled`: a tiny train/valid/test set from scikit-image's photographs.
* :func:`build_dataset`: a dataset from a config mapping.
"""

from __future__ import annotations

from .build import DATASET_TYPES, build_dataset
from .bundled import BUNDLED_SPLITS, BundledDataset, bundled_data_dir, bundled_image_paths
from .datasets import (
    BenchmarkDataset,
    DIV2KDataset,
    ImageFolderDataset,
    ImagePair,
    PairedImageDataset,
)
from .io import IMAGE_EXTENSIONS, image_to_tensor, read_image, tensor_to_image, write_image
from .transforms import augment_pair, crop_to_multiple, paired_random_crop

__all__ = [
    "BUNDLED_SPLITS",
    "DATASET_TYPES",
    "IMAGE_EXTENSIONS",
    "BenchmarkDataset",
    "BundledDataset",
    "DIV2KDataset",
    "ImageFolderDataset",
    "ImagePair",
    "PairedImageDataset",
    "augment_pair",
    "build_dataset",
    "bundled_data_dir",
    "bundled_image_paths",
    "crop_to_multiple",
    "image_to_tensor",
    "paired_random_crop",
    "read_image",
    "tensor_to_image",
    "write_image",
]
