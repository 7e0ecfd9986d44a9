"""The input pipeline: datasets, transforms, a resumable sampler and loader builders.

Importing this package registers the ``imagefolder``, ``fashion_mnist`` and ``synthetic`` datasets
in :data:`semmim.registry.DATASETS`.

Every item is ``{"image": FloatTensor (C, H, W) in [0, 1], "label": int (-1 = unlabelled),
"index": int}``; a batch is ``{"image": (N, C, H, W), "label": (N,), "index": (N,)}``. Images are not
normalised here.

Examples:
    >>> from semmim.config import DataConfig
    >>> ds = build_dataset(DataConfig(name="synthetic", limit=8), img_size=32, in_chans=3)
    >>> sampler = ResumableSampler(len(ds), seed=0)
    >>> loader = build_loader(ds, batch_size=4, num_workers=0, pin_memory=False, sampler=sampler)
    >>> next(iter(loader))["image"].shape
    torch.Size([4, 3, 32, 32])
"""

from semmim.data.datasets import (
    IMG_EXTENSIONS,
    ImageDataset,
    ImageFolderDataset,
    SeededDataset,
    SubsetDataset,
    SyntheticDataset,
    decode_image,
    pil_to_tensor01,
    sample_seed,
)
from semmim.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, IdxFormatError, read_idx
from semmim.data.loader import build_dataset, build_loader, describe
from semmim.data.sampler import ResumableSampler
from semmim.data.transforms import Clamp01, eval_transform, pretrain_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "Clamp01",
    "FashionMNIST",
    "IdxFormatError",
    "ImageDataset",
    "ImageFolderDataset",
    "ResumableSampler",
    "SeededDataset",
    "SubsetDataset",
    "SyntheticDataset",
    "build_dataset",
    "build_loader",
    "decode_image",
    "describe",
    "eval_transform",
    "pil_to_tensor01",
    "pretrain_transform",
    "read_idx",
    "sample_seed",
]
