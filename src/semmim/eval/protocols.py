"""Protocols run end to end on an exported encoder: load it, extract features, score."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from semmim.config import DataConfig
from semmim.eval.knn import extract_features, knn_classify
from semmim.export import load_timm_model, read_normalization, read_timm_config, resolve_encoder_file

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _input_channels(model: nn.Module) -> int:
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
    in_chans = _input_channels(model)
    mean, std = norm if norm else (IMAGENET_MEAN[:in_chans], IMAGENET_STD[:in_chans])
    return model, mean, std


def _loader(dataset: Any, batch_size: int, num_workers: int) -> Any:
    from semmim.data import build_loader

    return build_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=False,
        sampler=None,
        drop_last=False,
    )


def knn_eval(
    encoder: str | os.PathLike[str] | nn.Module,
    data: str = "fashion_mnist",
    root: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "cls",
    batch_size: int = 256,
    num_workers: int = 2,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """kNN top-1/top-5 of an encoder on a labelled dataset's train (memory bank) and test splits.

    For ``data="imagefolder"`` the root must hold ``train/`` and ``val/`` class folders.
    """
    from semmim.data import build_dataset

    if isinstance(encoder, nn.Module):
        model = encoder
        if mean is None or std is None:
            raise ValueError("pass mean and std with an nn.Module encoder")
        m, s = mean, std
    else:
        model, m, s = load_encoder(encoder)
        m, s = mean or m, std or s
    img_size = int(model.get_submodule("patch_embed").img_size[0])  # type: ignore[index,arg-type]
    in_chans = _input_channels(model)
    splits = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        split_root = root
        if data == "imagefolder":
            if root is None:
                raise ValueError("--root is required for imagefolder (a folder holding train/ and val/)")
            split_root = os.path.join(root, "train" if split == "train" else "val")
        cfg = DataConfig(name=data, root=split_root, split=split, limit=limit, mean=m, std=s)
        splits[split] = build_dataset(cfg, img_size=img_size, in_chans=in_chans, train=False, seed=0)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    f_train, y_train = extract_features(model, _loader(splits["train"], batch_size, num_workers), m, s, pool, dev)
    f_test, y_test = extract_features(model, _loader(splits["test"], batch_size, num_workers), m, s, pool, dev)
    out: dict[str, Any] = {}
    for p in f_train:
        res = knn_classify(f_train[p], y_train, f_test[p], y_test, k=k, temperature=temperature)
        if not out:  # the first pooling gives the headline numbers
            out.update(res)
        if len(f_train) > 1:
            out.update({f"top1_{p}": res["top1"], f"top5_{p}": res["top5"]})
    out.update({"protocol": "knn", "pool": pool, "temperature": temperature, "n_train": len(splits["train"])})
    return out
