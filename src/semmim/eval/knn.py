"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294:
cosine similarity, the k=20 nearest training features vote for their class with weight
exp(sim / T), T = 0.07.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable[Any],
    mean: list[float],
    std: list[float],
    pool: str = "cls",
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen features of every image of ``loader``.

    Args:
        encoder: any module with ``forward_features`` giving (N, 1 + L, D) tokens (timm ViTs, semmim encoders).
        loader: yields dicts with "image" (N, C, H, W) in [0, 1] and "label" (N,).
        mean, std: the input normalisation the encoder was trained with.
        pool: "cls" (token 0), "mean" (mean of the patch tokens) or "both" (one pass, both poolings).

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
    for batch in loader:
        x = (batch["image"].to(device) - m) / s
        tokens = encoder.forward_features(x)  # type: ignore[operator]
        if tokens.dim() != 3:
            raise ValueError(f"forward_features must return (N, T, D) tokens, got {tuple(tokens.shape)}")
        for p in pools:
            feats[p].append((tokens[:, 0] if p == "cls" else tokens[:, 1:].mean(1)).float().cpu())
        labels.append(batch["label"].long().cpu())
    encoder.train(was_training)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


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
