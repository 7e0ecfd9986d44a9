"""Linear probing of a frozen encoder (the MAE protocol) and the LARS optimiser it uses.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377, appendix A.2:
a linear classifier on frozen features, preceded by a BatchNorm without affine parameters (it only
standardises the features), trained with LARS (You et al. 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888), base lr 0.1 scaled by batch / 256, weight decay 0,
90 epochs with 10 warmup epochs and a cosine schedule, the head initialised with std 0.01.

Two ways to feed it: :func:`linear_probe` trains on features extracted once from centre crops and
cached (fast: the encoder runs once per image); :func:`augmented_linear_probe` trains on a random-resized
crop + flip of every training image in every epoch, re-running the frozen encoder (as MAE and MILAN
probe; about ``epochs`` times the encoder cost). Both score centre crops of the test split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from semmim.engine.optim import LARS, cosine_lr, scaled_lr, set_lr
from semmim.eval.common import encoder_geometry, labelled_split, load_encoder, pools_of
from semmim.eval.config import LinearConfig, check_eval_config, encoder_batch
from semmim.eval.features import cached_features, config_split_features, dataset_key, pool_tokens

__all__ = ["LARS", "augmented_linear_probe", "linear_eval", "linear_probe", "probe_head"]

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


def _probe_optimizer(
    head: nn.Sequential, optimizer: str, lr: float, weight_decay: float, momentum: float, trust_coefficient: float
) -> torch.optim.Optimizer:
    """LARS over the whole head (MAE), or momentum SGD with weight decay on the weight matrix only."""
    if optimizer == "lars":
        return LARS(head.parameters(), lr, weight_decay, momentum, trust_coefficient)
    linear: Any = head[1]
    groups = [
        {"params": [linear.weight], "weight_decay": weight_decay},
        {"params": [linear.bias], "weight_decay": 0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


@torch.no_grad()
def _score(head: nn.Module, features: Tensor, labels: Tensor, k: int, dev: torch.device) -> tuple[float, float]:
    """Top-1 and top-5 (top-K when K < 5) of ``head`` on (M, D) features, in %."""
    head.eval()
    top1 = top5 = 0
    m = features.shape[0]
    for i in range(0, m, 4096):
        logits = head(features[i : i + 4096].float().to(dev))
        truth = labels[i : i + 4096].long().to(dev)[:, None]
        pred = logits.topk(min(5, k), dim=1).indices
        top1 += int((pred[:, :1] == truth).any(1).sum())
        top5 += int((pred == truth).any(1).sum())
    return 100.0 * top1 / m, 100.0 * top5 / m


def _check_settings(
    optimizer: str, epochs: int, batch_size: int, base_lr: float, weight_decay: float, warmup_epochs: int
) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    if epochs < 1 or batch_size < 1 or base_lr <= 0 or weight_decay < 0 or warmup_epochs < 0:
        raise ValueError(
            f"bad probe settings: epochs={epochs}, batch_size={batch_size}, base_lr={base_lr}, "
            f"weight_decay={weight_decay}, warmup_epochs={warmup_epochs}"
        )


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
    _check_settings(optimizer, epochs, batch_size, base_lr, weight_decay, warmup_epochs)
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
    opt = _probe_optimizer(head, optimizer, lr, weight_decay, momentum, trust_coefficient)
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
    top1, top5 = _score(head, test_features, test_labels, k, dev)
    return {
        "top1": top1,
        "top5": top5,
        "n_test": test_features.shape[0],
        "n_train": n,
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch,
    }


def augmented_linear_probe(
    encoder: nn.Module,
    train_dataset: Any,
    test_features: dict[str, Tensor],
    test_labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_classes: int | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    encoder_batch_size: int | None = None,
    optimizer: str = "lars",
    base_lr: float = 0.1,
    weight_decay: float = 0.0,
    warmup_epochs: int = 10,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """A linear probe trained on freshly augmented images every epoch (MAE / MILAN ``main_linprobe.py``).

    Each epoch draws a new order of the training images (a seeded ``torch.Generator``, dropping the
    incomplete last batch) and ``train_dataset.set_epoch(epoch)`` gives every image a new augmentation
    (a random-resized crop + flip for :func:`linear_eval`); the frozen encoder (eval mode, no gradient,
    its parameters untouched) runs on ``encoder_batch_size`` images at a time and the features of
    ``batch_size`` images make one step of every head. One :func:`probe_head` per pooling in
    ``test_features`` trains on the same images (initialised as :func:`linear_probe` initialises it, same
    schedule, loss and optimiser); each is scored on ``test_features``.

    The encoder runs ``epochs x batch x steps per epoch`` times on training images: about ``epochs`` times
    the cost of the cached probe's one extraction.

    Args:
        encoder: a module with ``forward_features`` giving (N, 1 + L, D) tokens.
        train_dataset: map-style dataset of ``{"image": (C, H, W) in [0, 1], "label"}`` with ``set_epoch``.
        test_features: {pool ("cls" | "mean"): (M, D)} of the test split; test_labels: (M,).
        mean, std: the encoder's input normalisation.
        num_classes: K; defaults to the dataset's class count, or the largest test label + 1.
        epochs, batch_size, optimizer, base_lr, weight_decay, warmup_epochs, momentum, trust_coefficient,
            seed: as in :func:`linear_probe`.
        encoder_batch_size: images per encoder pass (speed and memory only); None = min(batch, 256).
        num_workers: data-loading workers.
        device: defaults to CUDA when available.

    Returns:
        {pool: {"top1", "top5", "n_test", "n_train", "epochs", "optimizer", "lr", "batch_size",
        "images_encoded" (training images the encoder ran on), "train_time_s"}}.

    Raises:
        ValueError: bad settings, fewer than two training images, labels outside [0, K).
    """
    from semmim.data import build_loader

    pools = tuple(test_features)
    if not pools:
        raise ValueError("test_features is empty: give at least one pooling")
    for p in pools:
        _check_split(test_features[p], test_labels, "test")
    _check_settings(optimizer, epochs, batch_size, base_lr, weight_decay, warmup_epochs)
    n = len(train_dataset)
    if n < 2:
        raise ValueError("a linear probe needs at least 2 training samples (its BatchNorm normalises a batch)")
    classes = list(getattr(train_dataset, "classes", []) or [])
    k = num_classes if num_classes is not None else max(len(classes), int(test_labels.max()) + 1)
    if int(test_labels.max()) >= k:
        raise ValueError(f"labels go up to {int(test_labels.max())} but num_classes={k}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = min(batch_size, n)
    chunk = min(encoder_batch_size or 256, batch)
    steps_per_epoch = n // batch
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs, epochs // 2) * steps_per_epoch
    lr = scaled_lr(base_lr, batch)

    heads: dict[str, nn.Sequential] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for p in pools:  # each head starts as linear_probe's head of the same seed
        heads[p] = probe_head(test_features[p].shape[1], k, generator=torch.Generator().manual_seed(seed)).to(dev)
        heads[p].train()
        opts[p] = _probe_optimizer(heads[p], optimizer, lr, weight_decay, momentum, trust_coefficient)
    order_gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    m = torch.tensor(list(mean), device=dev).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=dev).view(1, -1, 1, 1)
    was_training = encoder.training
    encoder.eval().to(dev)
    step = encoded = 0
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            if hasattr(train_dataset, "set_epoch"):
                train_dataset.set_epoch(epoch)
            order = torch.randperm(n, generator=order_gen)[: steps_per_epoch * batch].tolist()
            loader = build_loader(
                train_dataset,
                batch_size=chunk,
                num_workers=num_workers,
                pin_memory=dev.type == "cuda",
                sampler=cast(Any, order),
                drop_last=False,
            )
            held: dict[str, list[Tensor]] = {p: [] for p in pools}
            held_y: list[Tensor] = []
            for data in loader:
                with torch.no_grad():
                    tokens = encoder.forward_features((data["image"].to(dev, non_blocking=True) - m) / s)  # type: ignore[operator]
                    for p, f in pool_tokens(tokens, pools).items():
                        held[p].append(f)
                y = data["label"].long().to(dev)
                if int(y.min()) < 0 or int(y.max()) >= k:
                    raise ValueError(f"training labels outside 0..{k - 1}")
                held_y.append(y)
                encoded += y.shape[0]
                while sum(t.shape[0] for t in held_y) >= batch:
                    ys = torch.cat(held_y)
                    held_y = [ys[batch:]]
                    step_lr = cosine_lr(step, total, warmup, lr)
                    for p in pools:
                        xs = torch.cat(held[p])
                        held[p] = [xs[batch:]]
                        set_lr(opts[p], step_lr)
                        loss = loss_fn(heads[p](xs[:batch]), ys[:batch])
                        opts[p].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[p].step()
                    step += 1
    finally:
        encoder.train(was_training)
    train_time = time.perf_counter() - t0
    out: dict[str, dict[str, Any]] = {}
    for p in pools:
        top1, top5 = _score(heads[p], test_features[p], test_labels, k, dev)
        out[p] = {
            "top1": top1,
            "top5": top5,
            "n_test": test_features[p].shape[0],
            "n_train": n,
            "epochs": epochs,
            "optimizer": optimizer,
            "lr": lr,
            "batch_size": batch,
            "images_encoded": encoded,
            "train_time_s": train_time,
        }
    return out


def _augmented_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: LinearConfig) -> dict[str, dict[str, Any]]:
    """:func:`augmented_linear_probe` on ``cfg``'s data: random-resized crops + flips of the training split
    (a new draw each epoch, seeded by ``cfg.seed``), cached centre-crop features of the test split."""
    spec: str | os.PathLike[str] | None
    if isinstance(encoder, nn.Module):
        if cfg.mean is None or cfg.std is None:
            raise ValueError("pass mean and std with an nn.Module encoder")
        model, spec, mean, std = encoder, None, cfg.mean, cfg.std
    else:
        model, mean, std = load_encoder(encoder)
        mean, std, spec = cfg.mean or mean, cfg.std or std, encoder
    img_size, in_chans = encoder_geometry(model)
    geometry: dict[str, Any] = {"img_size": img_size, "in_chans": in_chans, "mean": mean, "std": std}
    train = labelled_split(
        cfg.data, cfg.root, "train", limit=cfg.train_limit, train_transform=True, seed=cfg.seed, **geometry
    )
    if isinstance(train, torch.utils.data.IterableDataset):
        raise ValueError(f"augment=rrc_flip needs a map-style dataset, '{cfg.data}' gives {type(train).__name__}")
    test = labelled_split(cfg.data, cfg.root, "test", limit=cfg.test_limit, **geometry)
    key = dataset_key(cfg.data, cfg.root, "test", cfg.test_limit, img_size)
    f_test, y_test = cached_features(
        model, spec, test, key, mean, std, "both", encoder_batch(cfg), cfg.num_workers, cfg.device, cfg.cache_dir
    )
    pools = pools_of(cfg.pool)
    return augmented_linear_probe(
        model,
        train,
        {p: f_test[p] for p in pools},
        y_test,
        mean,
        std,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        encoder_batch_size=encoder_batch(cfg),
        optimizer=cfg.optimizer,
        base_lr=cfg.base_lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=cfg.device,
    )


def linear_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: LinearConfig | None = None) -> dict[str, Any]:
    """Linear-probe top-1 / top-5 of a frozen encoder on a labelled dataset (MAE protocol).

    With ``augment="none"`` features come from :func:`config_split_features` (centre crops, cached) and the
    probe is :func:`linear_probe`; with ``augment="rrc_flip"`` the probe is :func:`augmented_linear_probe`
    (a random-resized crop, scale 0.08-1, bicubic, + flip of every training image each epoch, as MAE's
    and MILAN's ``main_linprobe.py``; test features are still the cached centre crops). ``pool="both"``
    trains one probe per pooling and reports ``top1_cls``, ``top5_cls``, ``top1_mean``, ``top5_mean``,
    with the CLS numbers as the headline ``top1`` / ``top5``.

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:RUN``, or an encoder module (then set
            ``cfg.mean`` / ``cfg.std``).
        cfg: the protocol's settings (:class:`semmim.eval.config.LinearConfig`; default: its defaults).

    Returns:
        The :func:`linear_probe` dict (with ``rrc_flip`` also "images_encoded", "train_time_s") plus
        {"protocol": "linear", "pool", "augment", "recipe"}.

    Raises:
        ConfigError: an impossible setting (checked before any work).
    """
    cfg = check_eval_config(cfg or LinearConfig())
    pools = pools_of(cfg.pool)
    results: dict[str, dict[str, Any]]
    if cfg.augment == "rrc_flip":
        results = _augmented_eval(encoder, cfg)
    else:
        f_train, y_train, f_test, y_test, _ = config_split_features(encoder, cfg)
        results = {
            p: linear_probe(
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
            for p in pools
        }
    out: dict[str, Any] = dict(results[pools[0]])  # the first pooling gives the headline numbers
    if len(pools) > 1:
        for p in pools:
            out.update({f"top1_{p}": results[p]["top1"], f"top5_{p}": results[p]["top5"]})
    out.update({"protocol": "linear", "pool": cfg.pool, "augment": cfg.augment, "recipe": cfg.recipe})
    return out
