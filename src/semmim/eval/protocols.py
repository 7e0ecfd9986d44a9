"""Protocols run end to end on an exported encoder: load it, extract features, score."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
    return img_size, _input_channels(model)


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


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def feature_cache_dir() -> Path:
    """``$SEMMIM_CACHE/features``, else ``~/.cache/semmim/features``."""
    base = os.environ.get("SEMMIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "semmim")
    return Path(base) / "features"


def cached_features(
    model: nn.Module,
    encoder_spec: str | os.PathLike[str] | None,
    dataset: Any,
    dataset_key: str,
    mean: list[float],
    std: list[float],
    pool: str = "both",
    batch_size: int = 256,
    num_workers: int = 2,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen features of ``dataset`` (see :func:`extract_features`), extracted once and cached.

    The cache key is the encoder file (path, size, modification time) or ``random:`` spec, the
    dataset key (name, root, split, limit), the normalisation and the pooling; ``cache_dir=""``
    or an ``nn.Module`` without a spec turns caching off.

    Returns:
        {pool: (num_images, D) float32}, labels (num_images,).
    """
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path: Path | None = None
    if encoder_spec is not None and cache_dir != "":
        text = str(encoder_spec)
        weights = resolve_encoder_file(text.removeprefix("random:"))
        ident = ("random:" if text.startswith("random:") else "") + _file_fingerprint(weights)
        key = json.dumps([ident, dataset_key, mean, std, pool, len(dataset)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        path = Path(cache_dir) if cache_dir else feature_cache_dir()
        path = path / f"{digest}.pt"
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                return blob["features"], blob["labels"]
            except Exception as e:  # a broken cache file is rebuilt, never trusted
                warnings.warn(f"ignoring unreadable feature cache {path}: {e}", RuntimeWarning, stacklevel=2)
    feats, labels = extract_features(model, eval_loader(dataset, batch_size, num_workers), mean, std, pool, dev)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"features": feats, "labels": labels}, tmp)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"could not write the feature cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return feats, labels


def dataset_key(data: str, root: str | None, split: str, limit: int | None, img_size: int) -> str:
    return f"{data}|{os.path.abspath(root) if root else ''}|{split}|{limit}|{img_size}"


def frozen_split_features(
    encoder: str | os.PathLike[str] | nn.Module,
    data: str = "fashion_mnist",
    root: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor, dict[str, Any]]:
    """Frozen CLS and mean-pooled features of the train and test splits, cached on disk.

    ``encoder`` is a run directory, an ``encoder.safetensors``, ``random:<spec>``, or an
    ``nn.Module`` (then ``mean`` and ``std`` are required and nothing is cached). Both poolings come
    from one pass and share one cache entry (see :func:`semmim.eval.protocols.cached_features`), so
    kNN, linear and low-shot evaluations of the same encoder and data extract features once.

    Returns:
        train features {"cls", "mean": (N, D)}, train labels (N,), test features {"cls", "mean":
        (M, D)}, test labels (M,), info {"n_train", "n_test", "img_size", "in_chans", "mean", "std"}.
    """
    spec: str | os.PathLike[str] | None
    if isinstance(encoder, nn.Module):
        if mean is None or std is None:
            raise ValueError("pass mean and std with an nn.Module encoder")
        model, spec, m, s = encoder, None, mean, std
    else:
        model, m, s = load_encoder(encoder)
        m, s, spec = mean or m, std or s, encoder
    img_size, in_chans = encoder_geometry(model)
    out: list[tuple[dict[str, Tensor], Tensor]] = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        ds = labelled_split(data, root, split, img_size=img_size, in_chans=in_chans, mean=m, std=s, limit=limit)
        key = dataset_key(data, root, split, limit, img_size)
        cache = None if cache_dir is None else str(cache_dir)
        out.append(cached_features(model, spec, ds, key, m, s, "both", batch_size, num_workers, device, cache))
    (f_train, y_train), (f_test, y_test) = out
    info = {
        "n_train": int(y_train.shape[0]),
        "n_test": int(y_test.shape[0]),
        "img_size": img_size,
        "in_chans": in_chans,
        "mean": m,
        "std": s,
    }
    return f_train, y_train, f_test, y_test, info


def pools_of(pool: str) -> tuple[str, ...]:
    """The poolings a ``pool`` argument asks for: "cls", "mean", or both for "both"."""
    if pool not in ("cls", "mean", "both"):
        raise ValueError(f"pool must be 'cls', 'mean' or 'both', got '{pool}'")
    return ("cls", "mean") if pool == "both" else (pool,)


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
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """kNN top-1/top-5 of an encoder on a labelled dataset's train (memory bank) and test splits.

    For ``data="imagefolder"`` the root must hold ``train/`` and ``val/`` class folders. Features of
    an exported encoder are cached (see :func:`cached_features`).
    """
    pools = pools_of(pool)
    f_train, y_train, f_test, y_test, info = frozen_split_features(
        encoder, data, root, train_limit, test_limit, batch_size, num_workers, mean, std, device, cache_dir
    )
    out: dict[str, Any] = {}
    for p in pools:
        res = knn_classify(f_train[p], y_train, f_test[p], y_test, k=k, temperature=temperature)
        if not out:  # the first pooling gives the headline numbers
            out.update(res)
        if len(pools) > 1:
            out.update({f"top1_{p}": res["top1"], f"top5_{p}": res["top5"]})
    out.update({"protocol": "knn", "pool": pool, "temperature": temperature, "n_train": info["n_train"]})
    return out
