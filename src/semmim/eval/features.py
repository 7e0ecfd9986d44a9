"""Frozen features of evaluation splits: extraction, an on-disk cache, and both splits at once.

kNN, linear and low-shot evaluations of the same encoder and data share one cache entry, so features
are extracted once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semmim.data.badfiles import EpochBadFiles
from semmim.eval.common import encoder_geometry, eval_loader, labelled_split, load_encoder
from semmim.eval.config import encoder_batch
from semmim.export import resolve_encoder_file

__all__ = [
    "cached_features",
    "dataset_key",
    "extract_features",
    "feature_cache_dir",
    "file_fingerprint",
    "frozen_split_features",
    "pool_tokens",
    "show_progress",
]

EVAL_MAX_BAD_FRACTION = 0.01
"""Feature extraction stops (:class:`~semmim.data.badfiles.DataError`) when more of the images than this share
(at least 1) were unreadable and replaced by substitutes."""

PROGRESS_MIN_IMAGES = 2048
"""Feature extraction of fewer images than this never shows a progress bar."""


def show_progress(num_images: int) -> bool:
    """Whether extracting features of ``num_images`` images shows a progress bar: only when stderr is a
    terminal and the set is not tiny."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        tty = False
    return tty and num_images >= PROGRESS_MIN_IMAGES


def pool_tokens(tokens: Tensor, pools: Sequence[str]) -> dict[str, Tensor]:
    """Image features from encoder tokens: "cls" = token 0, "mean" = mean of the patch tokens.

    Args:
        tokens: (N, 1 + L, D) output of ``forward_features``.
        pools: the poolings wanted ("cls", "mean").

    Returns:
        {pool: (N, D) float32}.
    """
    if tokens.dim() != 3:
        raise ValueError(f"forward_features must return (N, T, D) tokens, got {tuple(tokens.shape)}")
    return {p: (tokens[:, 0] if p == "cls" else tokens[:, 1:].mean(1)).float() for p in pools}


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable[Any],
    mean: list[float],
    std: list[float],
    pool: str = "cls",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen features of every image of ``loader``.

    Args:
        encoder: any module with ``forward_features`` giving (N, 1 + L, D) tokens (timm ViTs, semmim encoders).
        loader: yields dicts with "image" (N, C, H, W) in [0, 1] and "label" (N,) (and "bad", the unreadable
            files the items replaced: more than :data:`EVAL_MAX_BAD_FRACTION` of them raise ``DataError``).
        mean, std: the input normalisation the encoder was trained with.
        pool: "cls" (token 0), "mean" (mean of the patch tokens) or "both" (one pass, both poolings).
        device: where the encoder runs.
        progress: show a tqdm progress bar over the batches (on stderr).

    Returns:
        {pool: features (num_images, D) float32} and labels (num_images,) int64.
    """
    if pool not in ("cls", "mean", "both"):
        raise ValueError(f"pool must be 'cls', 'mean' or 'both', got '{pool}'")
    pools = ("cls", "mean") if pool == "both" else (pool,)
    was_training = encoder.training
    encoder.eval().to(device)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    feats: dict[str, list[Tensor]] = {p: [] for p in pools}
    labels = []
    batches: Iterable[Any] = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="features", unit="batch", leave=False, file=sys.stderr)
    bad = EpochBadFiles(
        EVAL_MAX_BAD_FRACTION,
        0,
        key="max_bad_fraction",
        remedy="fix or remove them (an evaluation's limit is fixed: substitutes would bias its accuracy)",
        per="split",
    )
    for batch in batches:
        bad.record(batch.get("bad", ()))
        x = (batch["image"].to(device) - m) / s
        tokens = encoder.forward_features(x)  # type: ignore[operator]
        for p, f in pool_tokens(tokens, pools).items():
            feats[p].append(f.cpu())
        labels.append(batch["label"].long().cpu())
    encoder.train(was_training)
    bad.epoch_size = sum(len(y) for y in labels)
    bad.check()  # substitutes for more than 1% of the images would bias the evaluation
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


def file_fingerprint(path: Path) -> str:
    """``path`` (resolved), size and modification time: changes when the file does."""
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
        ident = ("random:" if text.startswith("random:") else "") + file_fingerprint(weights)
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
    loader = eval_loader(dataset, batch_size, num_workers)
    feats, labels = extract_features(model, loader, mean, std, pool, dev, progress=show_progress(len(dataset)))
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
    """The part of a feature-cache key that names the images: dataset, absolute root, split, limit, size."""
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
    from one pass and share one cache entry (see :func:`semmim.eval.features.cached_features`), so
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


def config_split_features(
    encoder: str | os.PathLike[str] | nn.Module, cfg: Any
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor, dict[str, Any]]:
    """:func:`frozen_split_features` with the data, split, loader and feature keys of a protocol config
    (:class:`semmim.eval.config.SplitsConfig` + :class:`semmim.eval.config.FrozenFeatures`); images go through
    the encoder :func:`semmim.eval.config.encoder_batch` at a time."""
    return frozen_split_features(
        encoder,
        cfg.data,
        cfg.root,
        cfg.train_limit,
        cfg.test_limit,
        encoder_batch(cfg),
        cfg.num_workers,
        cfg.mean,
        cfg.std,
        cfg.device,
        cfg.cache_dir,
    )
