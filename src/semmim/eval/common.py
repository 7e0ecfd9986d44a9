"""Plumbing shared by the evaluation protocols: load an exported encoder, read a labelled split, loaders."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from semmim.config import DataConfig
from semmim.export import load_timm_model, read_normalization, read_timm_config, resolve_encoder_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "encoder_geometry",
    "eval_loader",
    "input_channels",
    "labelled_split",
    "load_encoder",
    "pools_of",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def input_channels(model: nn.Module) -> int:
    """Input channels of a timm / semmim ViT (its patch embedding's)."""
    proj: Any = model.get_submodule("patch_embed.proj")
    return int(proj.in_channels)


def load_encoder(spec: str | os.PathLike[str], seed: int = 0) -> tuple[nn.Module, list[float], list[float]]:
    """An exported encoder and its input normalisation.

    ``spec`` is a run directory or ``encoder.safetensors``; ``random:<spec>`` builds the same
    architecture with random weights (the baseline every pretraining must beat).
    """
    import timm

    text = str(spec)
    random_init = text.startswith("random:")
    path = text.removeprefix("random:")
    if random_init:
        name, kwargs = read_timm_config(path)
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    else:
        model = load_timm_model(path)
    norm = read_normalization(resolve_encoder_file(path))
    in_chans = input_channels(model)
    mean, std = norm if norm else (IMAGENET_MEAN[:in_chans], IMAGENET_STD[:in_chans])
    return model, mean, std


def eval_loader(dataset: Any, batch_size: int, num_workers: int) -> Any:
    """An in-order loader over an evaluation dataset (no shuffling, no dropped samples)."""
    from semmim.data import build_loader

    return build_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=False,
        sampler=None,
        drop_last=False,
    )


def encoder_geometry(model: nn.Module) -> tuple[int, int]:
    """(image size, input channels) of a timm / semmim ViT."""
    img_size = int(model.get_submodule("patch_embed").img_size[0])  # type: ignore[index,arg-type]
    return img_size, input_channels(model)


def labelled_split(
    data: str,
    root: str | None,
    split: str,
    *,
    img_size: int,
    in_chans: int,
    mean: list[float],
    std: list[float],
    limit: int | None = None,
    train_transform: bool = False,
    rand_augment: str | None = None,
    seed: int = 0,
) -> Any:
    """One split of a labelled dataset for evaluation; items ``{"image": (C, H, W) in [0, 1], "label", "index"}``.

    ``split`` is "train" or "test"; for ``data="imagefolder"`` the root must hold ``train/`` and ``val/``
    class folders (the ImageNet layout) and "test" reads ``val/``. ``train_transform`` gives the
    fine-tuning augmentation (random resized crop + flip, optional timm RandAugment ``rand_augment``).
    """
    from semmim.data import build_dataset

    split_root = root
    if data == "imagefolder":
        if root is None:
            raise ValueError("--root is required for imagefolder (a folder holding train/ and val/)")
        split_root = os.path.join(root, "train" if split == "train" else "val")
        if not os.path.isdir(split_root):
            raise FileNotFoundError(f"imagefolder evaluation needs {split_root} (class folders for the {split} split)")
    cfg = DataConfig(
        name=data,
        root=split_root,
        split=split,
        limit=limit,
        mean=mean,
        std=std,
        crop_scale=[0.08, 1.0],
        rand_augment=rand_augment,
    )
    return build_dataset(cfg, img_size=img_size, in_chans=in_chans, train=train_transform, seed=seed)


def pools_of(pool: str) -> tuple[str, ...]:
    """The poolings a ``pool`` argument asks for: "cls", "mean", or both for "both"."""
    if pool not in ("cls", "mean", "both"):
        raise ValueError(f"pool must be 'cls', 'mean' or 'both', got '{pool}'")
    return ("cls", "mean") if pool == "both" else (pool,)
