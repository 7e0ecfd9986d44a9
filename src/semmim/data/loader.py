"""Build datasets and data loaders from a :class:`semmim.config.DataConfig`."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from semmim.config import DataConfig
from semmim.data.captions import ClassCaptions, subset_keeping_captions
from semmim.data.datasets import DEFAULT_MAX_IMAGE_PIXELS, SeededDataset
from semmim.data.shards import MAX_IMAGE_PIXELS, ShardStream
from semmim.data.summary import describe
from semmim.data.tensor_decode import decode_conflict
from semmim.data.tensor_transforms import TensorEvalTransform, TensorPretrainTransform
from semmim.data.transforms import eval_transform, pretrain_transform
from semmim.registry import DATASETS

__all__ = ["CAPTION_SOURCES", "DEFAULT_SYNTHETIC_SIZE", "build_dataset", "build_loader", "describe", "train_sampler"]

DEFAULT_SYNTHETIC_SIZE = 1024
"""Size of the ``synthetic`` dataset when ``data.limit`` is not set."""

CAPTION_SOURCES = ("templates",)
"""Values of ``data.captions`` (besides ``None``): ``templates`` = class-name templates."""


def _filtered(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keyword arguments ``factory`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _imagefolder_root(cfg: DataConfig) -> str:
    if cfg.root is None:
        raise ValueError("data.root is not set; point it at an image folder with data.root=PATH")
    root = Path(cfg.root).expanduser()
    # ImageNet layout: root/train and root/val hold the class folders.
    if cfg.split and (root / cfg.split).is_dir():
        return str(root / cfg.split)
    return str(root)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size: from torch.distributed, else $RANK / $WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _build_shard_stream(
    cfg: DataConfig, transform: Any, *, in_chans: int, train: bool, seed: int, require_captions: bool = False
) -> ShardStream:
    if cfg.root is None:
        raise ValueError(
            "data.root is not set; for data.name=webdataset point it at the shards: a folder, a brace pattern "
            "such as data/shard-{000000..000099}.tar, or patterns joined by '::'"
        )
    if getattr(cfg, "captions", None) == "templates":
        raise ValueError(
            "data.captions=templates does not apply to data.name=webdataset: the captions are the shards' .txt "
            "files; write template captions into the shards with `semmim data shards --captions templates`"
        )
    if cfg.limit is not None:
        raise ValueError("data.limit is not read by data.name=webdataset: remove it and use fewer shards")
    rank, world = _rank_world()
    return ShardStream(
        cfg.root,
        transform=transform,
        seed=seed,
        shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 1000)),
        rank=rank,
        world_size=world,
        num_samples=getattr(cfg, "num_samples", None),
        shuffle=train,
        in_chans=in_chans,
        batch_size=cfg.batch_size,
        drop_last=train,
        require_captions=require_captions,
        max_pixels=cfg.max_image_pixels if cfg.max_image_pixels is not None else MAX_IMAGE_PIXELS,
        decode=getattr(cfg, "decode", "pil"),
    )


def build_dataset(
    cfg: DataConfig, *, img_size: int, in_chans: int, train: bool = True, seed: int = 0, require_captions: bool = False
) -> SeededDataset | ShardStream:
    """The dataset named by ``cfg.name``, limited to ``cfg.limit`` samples, with seeded augmentation.

    ``imagefolder`` reads ``cfg.root`` (or ``cfg.root/cfg.split`` when that folder exists);
    ``fashion_mnist`` uses ``cfg.root``, ``cfg.split`` and ``cfg.download``; ``synthetic`` has
    ``cfg.limit`` (default :data:`DEFAULT_SYNTHETIC_SIZE`) samples; ``manifest`` reads the CSV / JSONL
    file ``cfg.root`` with the columns ``cfg.manifest_image_key`` and ``cfg.manifest_caption_key``.
    Other registered datasets get the subset of ``root, split, img_size, in_chans, download,
    max_bad_fraction, max_image_pixels`` they accept.

    ``cfg.decode == "torchvision"`` (``imagefolder``, ``manifest``, ``webdataset``) decodes files into uint8 tensors and
    augments them with :mod:`semmim.data.tensor_transforms` instead of PIL and torchvision's PIL transforms.

    ``cfg.captions == "templates"`` captions a labelled dataset with class-name templates
    (:class:`semmim.data.ClassCaptions`); items of a dataset with captions have ``"caption": str``.

    ``webdataset`` is different: it returns a :class:`semmim.data.ShardStream` (an ``IterableDataset``,
    use it without a sampler) over the shards ``cfg.root``, split over the ranks of an initialised
    ``torch.distributed`` group, with ``cfg.shuffle_buffer`` and ``cfg.num_samples``; samples and
    shards are shuffled only when ``train``. Resume it through a ``StatefulDataLoader`` (its state holds each
    worker's position). Its bad samples (undecodable, lost to a truncated shard, too large, and with
    ``require_captions`` those without a caption) are replaced and marked in the items' ``"skipped"`` and
    ``"bad"``, which the trainer checks against ``cfg.max_bad_fraction`` (see :class:`ShardStream`).

    Args:
        cfg: the data section of the run config.
        img_size: output height and width.
        in_chans: 1 or 3 image channels.
        train: pretraining augmentation (random resized crop + flip) if true, else the eval transform.
        seed: base seed of the augmentation.
        require_captions: the method trains on captions (``clip``, ``rils``): for ``webdataset``, a sample
            without a caption is a bad sample instead of an empty string (``ShardStream.require_captions``).

    Returns:
        A :class:`SeededDataset` whose items are ``{"image": (in_chans, img_size, img_size) in [0, 1],
        "label": int, "index": int}`` (+ ``"caption": str``), or for ``webdataset`` a :class:`ShardStream`
        with the same items.
    """
    name = cfg.name
    captions = getattr(cfg, "captions", None)
    if captions is not None and captions not in CAPTION_SOURCES:
        raise ValueError(f"data.captions must be one of {', '.join(CAPTION_SOURCES)} or null, got {captions!r}")
    decode = getattr(cfg, "decode", "pil")
    conflict = decode_conflict(decode, name, DATASETS.get(name), cfg.rand_augment)
    if conflict is not None:
        raise ValueError(conflict)
    transform: Any
    if decode == "torchvision":
        transform = (
            TensorPretrainTransform(img_size, crop_scale=cfg.crop_scale, hflip=cfg.hflip, uint8=cfg.uint8)
            if train
            else TensorEvalTransform(img_size, uint8=cfg.uint8)
        )
    elif train:
        transform = pretrain_transform(
            img_size,
            crop_scale=tuple(cfg.crop_scale),
            hflip=cfg.hflip,
            rand_augment=cfg.rand_augment,
            uint8=cfg.uint8,
        )
    else:
        transform = eval_transform(img_size, uint8=cfg.uint8)
    if name == "webdataset":
        return _build_shard_stream(
            cfg, transform, in_chans=in_chans, train=train, seed=seed, require_captions=require_captions
        )
    factory = DATASETS.get(name)
    kwargs: dict[str, Any]
    if name == "manifest":
        if cfg.root is None:
            raise ValueError("data.root is not set; for data.name=manifest point it at the manifest (.csv / .jsonl)")
        kwargs = {
            "path": cfg.root,
            "image_key": getattr(cfg, "manifest_image_key", "image"),
            "caption_key": getattr(cfg, "manifest_caption_key", "caption"),
            "in_chans": in_chans,
            "max_bad_fraction": cfg.max_bad_fraction,
            "max_image_pixels": getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            "decode": decode,
        }
    elif name == "imagefolder":
        kwargs = {
            "root": _imagefolder_root(cfg),
            "max_bad_fraction": cfg.max_bad_fraction,
            "in_chans": in_chans,
            "max_image_pixels": getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            "decode": decode,
        }
    elif name == "fashion_mnist":
        kwargs = {"root": cfg.root, "split": cfg.split, "in_chans": in_chans, "download": cfg.download}
    elif name == "synthetic":
        size = cfg.limit if cfg.limit is not None else DEFAULT_SYNTHETIC_SIZE
        kwargs = {"size": size, "img_size": img_size, "in_chans": in_chans, "seed": seed}
    else:
        candidates = {
            "root": cfg.root,
            "split": cfg.split,
            "img_size": img_size,
            "in_chans": in_chans,
            "download": cfg.download,
            "max_bad_fraction": cfg.max_bad_fraction,
            "max_image_pixels": getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            "decode": decode,
        }
        kwargs = _filtered(factory, candidates)
    dataset = DATASETS.build(name, **kwargs)
    if not hasattr(dataset, "load"):
        raise TypeError(
            f"dataset '{name}' ({type(dataset).__name__}) has no load(i) -> (PIL.Image, label) method; "
            f"derive it from semmim.data.ImageDataset"
        )
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {cfg.limit}")
        if cfg.limit < len(dataset):
            dataset = subset_keeping_captions(dataset, range(cfg.limit))
    if captions == "templates":
        if not list(getattr(dataset, "classes", []) or []):
            raise ValueError(
                f"data.captions=templates needs a labelled dataset with class names, but '{name}' has none "
                "(unlabelled data); use a dataset with classes, or set data.captions=null and give the captions "
                "another way (data.name=manifest or webdataset)"
            )
        dataset = ClassCaptions(dataset, seed=seed)
    return SeededDataset(dataset, seed=seed, transform=transform)


def train_sampler(dataset: Sized, *, seed: int, rank: int = 0, world_size: int = 1) -> StatefulDistributedSampler:
    """The training order of a map-style dataset: shuffled per epoch, split over ranks, resumable.

    A :class:`torch.utils.data.DistributedSampler` (``shuffle=True, drop_last=True``): epoch ``e`` permutes
    the indices with a generator seeded by ``seed + e``, drops the tail that does not split evenly, and rank
    ``r`` of ``W`` takes ``indices[r::W]``. It is torchdata's ``StatefulDistributedSampler`` subclass, whose
    ``state_dict()`` is ``{"yielded": samples drawn this epoch}``: a :func:`build_loader` loader saves and
    restores it, and ``load_state_dict({"yielded": k})`` starts the next epoch pass at sample ``k``.
    Call ``set_epoch(e)`` before each epoch.

    Examples:
        >>> s = train_sampler(range(10), seed=0, rank=1, world_size=2)
        >>> len(s), sorted(set(s) | set(train_sampler(range(10), seed=0, rank=0, world_size=2)))[:3]
        (5, [0, 1, 2])
    """
    return StatefulDistributedSampler(
        cast(Any, dataset), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )


def build_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    sampler: Sampler[int] | None,
    drop_last: bool = True,
) -> StatefulDataLoader:
    """A resumable DataLoader over ``dataset`` in ``sampler``'s order (torchdata's ``StatefulDataLoader``).

    ``loader.state_dict()`` is the position after the last batch it yielded: the sampler's position for a
    map-style dataset, and for an ``IterableDataset`` each worker's ``dataset.state_dict()`` (taken inside the
    worker with every batch); ``loader.load_state_dict(state)`` makes the next ``iter(loader)`` continue from
    there. The state depends on ``num_workers`` (one entry per worker).

    Workers are not persistent, so :meth:`SeededDataset.set_epoch` called in the main process
    reaches them every epoch. Memory pinning is only requested when CUDA is available.

    Args:
        dataset: usually a :class:`SeededDataset`.
        batch_size: samples per batch.
        num_workers: worker processes (0 loads in the main process).
        pin_memory: pin batches for faster host-to-device copies.
        sampler: index order (e.g. :func:`train_sampler`); ``None`` = sequential.
        drop_last: drop the last incomplete batch.

    Returns:
        A ``StatefulDataLoader`` yielding ``{"image": (N, C, H, W), "label": (N,), "index": (N,)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    with warnings.catch_warnings():  # torchdata calls torch.set_vital, deprecated since torch 2.9
        warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated", category=UserWarning)
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=bool(pin_memory) and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=False,
        )
