"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294:
cosine similarity, the k=20 nearest training features vote for their class with weight
exp(sim / T), T = 0.07.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.eval.common import pools_of
from semmim.eval.config import KnnConfig, check_eval_config
from semmim.eval.features import config_split_features


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 accuracy (in %).

    Args:
        train_features: (N_train, D); train_labels: (N_train,) in [0, C).
        test_features: (N_test, D); test_labels: (N_test,).
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {test_features.shape[1]}")
    if (train_labels < 0).any():
        raise ValueError("kNN needs labelled training features (found label -1)")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    top1 = top5 = 0
    for i in range(0, test.shape[0], chunk):
        sims, idx = (test[i : i + chunk] @ train.T).topk(k, dim=1)
        neighbours = train_labels[idx]
        weights = (sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, neighbours, weights)
        pred = votes.topk(min(5, num_classes), dim=1).indices
        truth = test_labels[i : i + chunk].unsqueeze(1)
        top1 += int((pred[:, :1] == truth).any(1).sum())
        top5 += int((pred == truth).any(1).sum())
    n = test.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "k": float(k), "n_test": float(n)}


def knn_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: KnnConfig | None = None) -> dict[str, Any]:
    """kNN top-1/top-5 of an encoder on a labelled dataset's train (memory bank) and test splits.

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:RUN``, or an encoder module (then set
            ``cfg.mean`` / ``cfg.std``).
        cfg: the protocol's settings (:class:`semmim.eval.config.KnnConfig`; default: its defaults). For
            ``data="imagefolder"`` the root must hold ``train/`` and ``val/`` class folders. Features of an
            exported encoder are cached (see :func:`semmim.eval.features.cached_features`).

    Raises:
        ConfigError: an impossible setting (checked before any work).
    """
    cfg = check_eval_config(cfg or KnnConfig())
    pools = pools_of(cfg.pool)
    f_train, y_train, f_test, y_test, info = config_split_features(encoder, cfg)
    out: dict[str, Any] = {}
    for p in pools:
        res = knn_classify(f_train[p], y_train, f_test[p], y_test, k=cfg.k, temperature=cfg.temperature)
        if not out:  # the first pooling gives the headline numbers
            out.update(res)
        if len(pools) > 1:
            out.update({f"top1_{p}": res["top1"], f"top5_{p}": res["top5"]})
    out.update({"protocol": "knn", "pool": cfg.pool, "temperature": cfg.temperature, "n_train": info["n_train"]})
    return out
