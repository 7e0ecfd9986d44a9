"""Optimiser pieces: AdamW parameter groups and the per-step warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two AdamW groups: decayed weights, and undecayed norms / biases / position and special tokens.

    Frozen parameters (teachers, fixed sin-cos tables) are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES or ".norm" in name or "norm." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half-cosine to ``min_lr``.

    Examples:
        >>> cosine_lr(0, 100, 10, 1.0), cosine_lr(10, 100, 10, 1.0), round(cosine_lr(100, 100, 10, 1.0), 6)
        (0.0, 1.0, 0.0)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.AdamW:
    kwargs: dict[str, object] = {"lr": lr, "betas": betas, "eps": eps}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, weight_decay), **kwargs)  # type: ignore[arg-type]
