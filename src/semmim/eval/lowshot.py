"""Low-shot evaluation: a linear probe or a fine-tuning on 1 % / 10 % of the labels, over several seeds.

The protocol of the semi-supervised ImageNet benchmarks (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", arXiv:2002.05709, section 7; Assran et al. 2022,
"Masked Siamese Networks for Label-Efficient Learning", arXiv:2204.07141): a class-balanced
fraction of the training labels, several random draws, mean and spread of the test accuracy. The
linear mode reuses the frozen features of :func:`semmim.eval.features.frozen_split_features` (extracted
once, cached) and trains :func:`semmim.eval.linear.linear_probe` on each subset; the fine-tuning
mode calls :func:`semmim.eval.finetune.finetune_eval` with the subset's indices.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from semmim.eval.config import FinetuneConfig, FinetuneRecipe, LowshotConfig, SplitsConfig, check_eval_config
from semmim.eval.features import config_split_features
from semmim.eval.linear import linear_probe

__all__ = ["dataset_labels", "finetune_config", "fraction_tag", "lowshot_eval", "stratified_subset"]

MODES = ("linear", "finetune")


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a label fraction must lie in (0, 1], got {fraction}")


def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """A class-balanced random subset: ``max(1, round(fraction * n_c))`` samples of every class c.

    Classes are visited in increasing label order, each drawing a random permutation of its samples
    from one ``torch.Generator`` seeded with ``seed``, so the subset depends only on the labels,
    ``fraction`` and ``seed``.

    Args:
        labels: (N,) integer labels >= 0.
        fraction: share of each class to keep, in (0, 1].
        seed: seed of the draw.

    Returns:
        LongTensor of sorted positions in ``labels``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], labels not (N,) integers >= 0.
    """
    _check_fraction(fraction)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be >= 0 (-1 marks unlabelled data, which a low-shot subset cannot use)")
    labels = labels.cpu().long()
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        take = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=gen)[:take]])
    if not picked:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(picked).sort().values


def _stored_labels(ds: Any) -> Tensor | None:
    """Labels kept in memory by ``ds`` or the datasets it wraps, without decoding any image."""
    try:
        n = len(ds)
    except TypeError:  # an iterable stream
        return None
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == n:
        return torch.as_tensor(np.asarray(targets), dtype=torch.long)
    inner = getattr(ds, "dataset", None)
    if inner is None:
        return None
    indices = getattr(ds, "indices", None)
    if indices is not None:  # a SubsetDataset view
        base = _stored_labels(inner)
        return None if base is None else base[torch.as_tensor(list(indices), dtype=torch.long)]
    try:
        same = len(inner) == n
    except TypeError:
        return None
    return _stored_labels(inner) if same else None  # SeededDataset, ClassCaptions: same samples


def dataset_labels(ds: Any, batch_size: int = 256, num_workers: int = 0) -> Tensor:
    """The labels of every sample of ``ds``, in order: (N,) int64.

    Read from a ``targets`` attribute (Fashion-MNIST, image folders) through ``SeededDataset`` and
    ``SubsetDataset`` wrappers when there is one; otherwise every item is loaded once.
    """
    labels = _stored_labels(ds)
    if labels is not None:
        return labels
    from semmim.eval.common import eval_loader

    return torch.cat([batch["label"].long().cpu() for batch in eval_loader(ds, batch_size, num_workers)])


def fraction_tag(fraction: float) -> str:
    """``0.01 -> "1"``, ``0.1 -> "10"``, ``0.005 -> "0p5"``: the percentage as used in result keys."""
    return f"{fraction * 100:g}".replace(".", "p")


def _summary(top1: list[float], top5: list[float], n_train: list[int]) -> dict[str, Any]:
    return {
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        "top5_mean": statistics.fmean(top5),
        "top1_per_seed": top1,
        "top5_per_seed": top5,
        "n_train_per_seed": n_train,
    }


def finetune_config(cfg: LowshotConfig, seed: int) -> FinetuneConfig:
    """The fine-tuning settings of one low-shot run (``mode="finetune"``) with ``seed``.

    The data keys (``data``, ``root``, the limits, ``batch_size``, ``num_workers``, ``device``), the
    schedule (``epochs``, ``base_lr``, ``weight_decay``, ``warmup_epochs``) and every recipe key
    (``layer_decay``, ``mixup``, ...) of ``cfg``.
    """
    shared = {f.name for f in fields(SplitsConfig)} | {f.name for f in fields(FinetuneRecipe)}
    shared |= {"epochs", "base_lr", "weight_decay", "warmup_epochs"}
    ft = FinetuneConfig(seed=seed, **{k: getattr(cfg, k) for k in sorted(shared)})
    check_eval_config(ft)
    return ft


def lowshot_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: LowshotConfig | None = None) -> dict[str, Any]:
    """Top-1 of an encoder trained on class-balanced fractions of the training labels, over seeds.

    For every fraction and seed, :func:`stratified_subset` (with that seed) picks the training
    samples of the (``train_limit``-limited) train split; the score is on the whole test split.

    * ``mode="linear"``: frozen ``pool`` features ("cls" or "mean") are extracted once (and cached),
      then :func:`linear_probe` is trained on each subset with ``seed`` for its initialisation and
      batch order. The optimiser defaults to "sgd": LARS barely moves the head on a few hundred
      samples (see :func:`linear_probe`).
    * ``mode="finetune"``: ``semmim.eval.finetune.finetune_eval(encoder, finetune_config(cfg, seed),
      train_indices=...)`` for each subset (:func:`finetune_config`: the data keys, ``epochs``,
      ``base_lr``, ``weight_decay``, ``warmup_epochs`` and the fine-tuning recipe keys); ``pool``,
      ``optimizer``, ``mean``, ``std`` and ``cache_dir`` do not apply.

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:RUN``, or (``mode="linear"`` only) an
            encoder module (then set ``cfg.mean`` / ``cfg.std``).
        cfg: the protocol's settings (:class:`semmim.eval.config.LowshotConfig`; default: its defaults).

    Returns:
        {"protocol": "lowshot", "mode", "fractions", "seeds", "results": {"1%": {"top1_mean",
        "top1_std" (sample std, 0 with one seed), "top5_mean", "top1_per_seed", "top5_per_seed",
        "n_train_per_seed"}, ...}, "n_test", and flat keys "top1_1pct", "top1_1pct_std", "top5_1pct",
        ... (see :func:`fraction_tag`)}.
    """
    cfg = check_eval_config(cfg or LowshotConfig())
    mode, pool = cfg.mode, cfg.pool
    data, root, train_limit = cfg.data, cfg.root, cfg.train_limit
    batch_size, num_workers, device = cfg.batch_size, cfg.num_workers, cfg.device
    fractions = [float(f) for f in cfg.fractions]
    seeds = [int(s) for s in cfg.seeds]
    for f in fractions:
        _check_fraction(f)

    results: dict[str, Any] = {}
    out: dict[str, Any] = {"protocol": "lowshot", "mode": mode, "fractions": fractions, "seeds": seeds}
    if mode == "linear":
        f_train, y_train, f_test, y_test, _ = config_split_features(encoder, cfg)
        x_train, x_test = f_train[pool], f_test[pool]
        out.update({"pool": pool, "optimizer": cfg.optimizer, "epochs": cfg.epochs, "n_test": int(y_test.shape[0])})
    else:
        from semmim.eval.common import encoder_geometry, labelled_split, load_encoder
        from semmim.eval.finetune import finetune_eval

        if isinstance(encoder, nn.Module):
            raise ValueError("low-shot fine-tuning needs an exported encoder (a run directory or .safetensors file)")
        spec: str | os.PathLike[str] = encoder
        model, m, s = load_encoder(spec)
        img_size, in_chans = encoder_geometry(model)
        train_ds = labelled_split(
            data, root, "train", img_size=img_size, in_chans=in_chans, mean=m, std=s, limit=train_limit
        )
        y_train = dataset_labels(train_ds, batch_size, num_workers)
        del model, train_ds

    for f in fractions:
        top1: list[float] = []
        top5: list[float] = []
        n_train: list[int] = []
        for seed in seeds:
            idx = stratified_subset(y_train, f, seed)
            if mode == "linear":
                res = linear_probe(
                    x_train[idx],
                    y_train[idx],
                    x_test,
                    y_test,
                    epochs=cfg.epochs,
                    batch_size=batch_size,
                    optimizer=cfg.optimizer,
                    base_lr=cfg.base_lr,
                    weight_decay=cfg.weight_decay,
                    warmup_epochs=cfg.warmup_epochs,
                    seed=seed,
                    device=device,
                )
            else:
                res = finetune_eval(spec, finetune_config(cfg, seed), train_indices=idx.tolist())
                if "n_test" in res:
                    out["n_test"] = res["n_test"]
            top1.append(float(res["top1"]))
            top5.append(float(res["top5"]))
            n_train.append(len(idx))
        summary = _summary(top1, top5, n_train)
        results[f"{f * 100:g}%"] = summary
        tag = fraction_tag(f)
        out[f"top1_{tag}pct"] = summary["top1_mean"]
        out[f"top1_{tag}pct_std"] = summary["top1_std"]
        out[f"top5_{tag}pct"] = summary["top5_mean"]
    out["results"] = results
    return out
