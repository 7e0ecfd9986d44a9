"""Linear probing of a frozen encoder (the MAE protocol) and the LARS optimiser it uses.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377, appendix A.2:
a linear classifier on frozen features, preceded by a BatchNorm without affine parameters (it only
standardises the features), trained with LARS (You et al. 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888), base lr 0.1 scaled by batch / 256, weight decay 0,
90 epochs with 10 warmup epochs and a cosine schedule, the head initialised with std 0.01.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from semmim.engine.optim import LARS, cosine_lr, scaled_lr, set_lr
from semmim.eval.common import pools_of
from semmim.eval.config import LinearConfig, check_eval_config
from semmim.eval.features import config_split_features

__all__ = ["LARS", "linear_eval", "linear_probe", "probe_head"]

OPTIMIZERS = ("lars", "sgd")


def probe_head(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """The MAE linear-probe head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, K)``.

    The linear weight is drawn from a truncated normal with std 0.01, the bias is 0. The BatchNorm
    uses a cumulative average of the batch statistics (``momentum=None``): its input, the frozen
    features, does not drift, so this estimates the train-set statistics better than an
    exponential average, especially on short (low-shot) schedules.
    """
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None), nn.Linear(dim, num_classes))
    linear: Any = head[1]
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return head


def _check_split(features: Tensor, labels: Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{name} labels must be (N,) = ({features.shape[0]},), got shape {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"no {name} features")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} labels must be integers, got {labels.dtype}")
    if (labels < 0).any():
        raise ValueError(f"{name} labels must be >= 0 (found {int(labels.min())}; -1 marks unlabelled data)")


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    optimizer: str = "lars",
    base_lr: float = 0.1,
    weight_decay: float = 0.0,
    warmup_epochs: int = 10,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and score it (MAE protocol, arXiv:2111.06377).

    The head is :func:`probe_head`; it is trained with cross-entropy on shuffled minibatches (a
    seeded ``torch.Generator``, dropping the incomplete last batch of an epoch), lr = ``base_lr *
    batch_size / 256`` with a per-step linear warmup and cosine decay (:func:`cosine_lr`).

    LARS scales each step of the weight by ``trust_coefficient * ||W||``, so the weight can only move
    far from its small initialisation over many steps: roughly, ``base_lr * N * epochs / 256 *
    trust_coefficient / (1 - momentum)`` must be well above 1. That holds for the MAE setting
    (ImageNet) and the full Fashion-MNIST train split, but not for a few hundred samples, where LARS
    stays near chance; use ``optimizer="sgd"`` there (the low-shot protocol does).

    Args:
        train_features: (N, D) frozen features; train_labels: (N,) in [0, K).
        test_features: (M, D); test_labels: (M,) in [0, K).
        num_classes: K; defaults to the largest label + 1.
        epochs: passes over the training features.
        batch_size: minibatch size, clamped to N.
        optimizer: "lars" (MAE) or "sgd" (momentum SGD; weight decay on the weight matrix only).
        base_lr: learning rate per 256 samples.
        weight_decay: weight decay (0 in the MAE recipe).
        warmup_epochs: linear warmup, clamped to half the epochs.
        momentum: momentum of either optimiser.
        trust_coefficient: eta of LARS.
        seed: seeds the head initialisation and the batch order.
        device: defaults to CUDA when available.

    Returns:
        {"top1", "top5" (in %; top-K when K < 5), "n_test", "n_train", "epochs", "optimizer", "lr"
        (the peak learning rate), "batch_size"}.

    Raises:
        ValueError: mismatched shapes, empty inputs, negative or out-of-range labels, fewer than two
            training samples (the BatchNorm needs two), an unknown optimizer.
    """
    _check_split(train_features, train_labels, "train")
    _check_split(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]} vs test {test_features.shape[1]}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    if epochs < 1 or batch_size < 1 or base_lr <= 0 or weight_decay < 0 or warmup_epochs < 0:
        raise ValueError(
            f"bad probe settings: epochs={epochs}, batch_size={batch_size}, base_lr={base_lr}, "
            f"weight_decay={weight_decay}, warmup_epochs={warmup_epochs}"
        )
    n, dim = train_features.shape
    if n < 2:
        raise ValueError("a linear probe needs at least 2 training samples (its BatchNorm normalises a batch)")
    largest = int(max(train_labels.max(), test_labels.max()))
    k = num_classes if num_classes is not None else largest + 1
    if largest >= k:
        raise ValueError(f"labels go up to {largest} but num_classes={k}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs, epochs // 2) * steps_per_epoch
    lr = scaled_lr(base_lr, batch)

    gen = torch.Generator().manual_seed(seed)
    head = probe_head(dim, k, generator=gen).to(dev)
    linear: Any = head[1]
    opt: torch.optim.Optimizer
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr, weight_decay, momentum, trust_coefficient)
    else:
        groups = [
            {"params": [linear.weight], "weight_decay": weight_decay},
            {"params": [linear.bias], "weight_decay": 0},
        ]
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    x_train = train_features.float().to(dev)
    y_train = train_labels.long().to(dev)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            set_lr(opt, cosine_lr(step, total, warmup, lr))
            loss = loss_fn(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    top1 = top5 = 0
    m = test_features.shape[0]
    with torch.no_grad():
        for i in range(0, m, 4096):
            logits = head(test_features[i : i + 4096].float().to(dev))
            truth = test_labels[i : i + 4096].long().to(dev)[:, None]
            pred = logits.topk(min(5, k), dim=1).indices
            top1 += int((pred[:, :1] == truth).any(1).sum())
            top5 += int((pred == truth).any(1).sum())
    return {
        "top1": 100.0 * top1 / m,
        "top5": 100.0 * top5 / m,
        "n_test": m,
        "n_train": n,
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch,
    }


def linear_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: LinearConfig | None = None) -> dict[str, Any]:
    """Linear-probe top-1 / top-5 of a frozen encoder on a labelled dataset (MAE protocol).

    Features come from :func:`config_split_features` (cached); the probe is :func:`linear_probe`.
    ``pool="both"`` trains one probe per pooling and reports ``top1_cls``, ``top5_cls``,
    ``top1_mean``, ``top5_mean``, with the CLS numbers as the headline ``top1`` / ``top5``.

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:RUN``, or an encoder module (then set
            ``cfg.mean`` / ``cfg.std``).
        cfg: the protocol's settings (:class:`semmim.eval.config.LinearConfig`; default: its defaults).

    Returns:
        The :func:`linear_probe` dict plus {"protocol": "linear", "pool"}.

    Raises:
        ConfigError: an impossible setting (checked before any work).
    """
    cfg = check_eval_config(cfg or LinearConfig())
    pools = pools_of(cfg.pool)
    f_train, y_train, f_test, y_test, _ = config_split_features(encoder, cfg)
    out: dict[str, Any] = {}
    for p in pools:
        res = linear_probe(
            f_train[p],
            y_train,
            f_test[p],
            y_test,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            optimizer=cfg.optimizer,
            base_lr=cfg.base_lr,
            weight_decay=cfg.weight_decay,
            warmup_epochs=cfg.warmup_epochs,
            seed=cfg.seed,
            device=cfg.device,
        )
        if not out:  # the first pooling gives the headline numbers
            out.update(res)
        if len(pools) > 1:
            out.update({f"top1_{p}": res["top1"], f"top5_{p}": res["top5"]})
    out.update({"protocol": "linear", "pool": cfg.pool})
    return out
