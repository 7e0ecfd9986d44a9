"""The input pipeline: datasets, transforms, the training sampler and resumable loaders.

Importing this package registers the ``imagefolder``, ``fashion_mnist``, ``synthetic``, ``manifest``
(image–caption pairs listed in a CSV / JSONL file) and ``webdataset`` (tar shards, streamed) datasets
in :data:`semmim.registry.DATASETS`. Items of datasets with captions also have ``"caption": str``.

Every item is ``{"image": FloatTensor (C, H, W) in [0, 1], "label": int (-1 = unlabelled),
"index": int, "skipped": int, "bad": str}``; a batch is ``{"image": (N, C, H, W), "label": (N,),
"index": (N,), "skipped": (N,), "bad": list[str]}``. ``"bad"`` names the broken file an item replaced
(``"<path>: <reason>"``, or ``""``; see :mod:`semmim.data.badfiles`). Images are not normalised here.

Examples:
    >>> from semmim.config import DataConfig
    >>> ds = build_dataset(DataConfig(name="synthetic", limit=8), img_size=32, in_chans=3)
    >>> sampler = train_sampler(ds, seed=0)
    >>> loader = build_loader(ds, batch_size=4, num_workers=0, pin_memory=False, sampler=sampler)
    >>> next(iter(loader))["image"].shape
    torch.Size([4, 3, 32, 32])
"""

from semmim.data.badfiles import DataError, EpochBadFiles, one_line_error
from semmim.data.captions import (
    TEMPLATES,
    CaptionSubset,
    ClassCaptions,
    ManifestDataset,
    caption_class_name,
    class_prompts,
    has_captions,
    subset_keeping_captions,
)
from semmim.data.datasets import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMG_EXTENSIONS,
    ImageDataset,
    ImageFolderDataset,
    ImageTooLargeError,
    SeededDataset,
    SubsetDataset,
    SyntheticDataset,
    decode_image,
    pil_to_tensor01,
)
from semmim.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, IdxFormatError, read_idx
from semmim.data.loader import build_dataset, build_loader, describe, train_sampler
from semmim.data.seeding import sample_seed, seeded
from semmim.data.shards import (
    ShardStream,
    count_shard_samples,
    expand_urls,
    read_shard_manifest,
    write_shards,
)
from semmim.data.tensor_decode import DECODES, decode_image_tensor
from semmim.data.tensor_transforms import TensorEvalTransform, TensorPretrainTransform
from semmim.data.transforms import Clamp01, eval_transform, pretrain_transform

__all__ = [
    "DECODES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "TEMPLATES",
    "CaptionSubset",
    "Clamp01",
    "ClassCaptions",
    "DataError",
    "EpochBadFiles",
    "FashionMNIST",
    "IdxFormatError",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageTooLargeError",
    "ManifestDataset",
    "SeededDataset",
    "ShardStream",
    "SubsetDataset",
    "SyntheticDataset",
    "TensorEvalTransform",
    "TensorPretrainTransform",
    "build_dataset",
    "build_loader",
    "caption_class_name",
    "class_prompts",
    "count_shard_samples",
    "decode_image",
    "decode_image_tensor",
    "describe",
    "eval_transform",
    "expand_urls",
    "has_captions",
    "one_line_error",
    "pil_to_tensor01",
    "pretrain_transform",
    "read_idx",
    "read_shard_manifest",
    "sample_seed",
    "seeded",
    "subset_keeping_captions",
    "train_sampler",
    "write_shards",
]
