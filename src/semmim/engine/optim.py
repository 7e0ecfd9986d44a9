"""Optimiser pieces shared by pretraining and evaluation, in one place.

* :func:`param_groups` / :func:`build_adamw`: AdamW with no weight decay on norms, biases and tokens
  (pretraining);
* :func:`layer_decay_groups`: AdamW groups with layer-wise learning-rate decay (fine-tuning);
* :class:`LARS`: the linear probe's optimiser;
* :func:`cosine_lr`, :func:`set_lr`, :func:`clamp_warmup`, :func:`scaled_lr`: the per-step linear warmup +
  half-cosine schedule and how it is applied; :func:`poly_lr`: the segmentation recipe's poly schedule.

timm has neighbours of these, which are not used because they do not reproduce these numbers:
``timm.optim.Lars`` divides by ``||g|| + wd * ||w|| + eps``, adapts either every parameter or none (no
trust ratio at all with weight decay 0, the MAE probe's setting) and has no ndim rule;
``timm.scheduler.CosineLRScheduler`` counts its cosine from step 0 rather than from the end of the
warmup and warms up from ``warmup_lr_init`` by another formula; ``timm.optim.param_groups_layer_decay``
assigns layers with timm's ``group_matcher`` (not defined by semmim's encoder) and names groups
differently. Runs are compared bit for bit across resume, so the formulas here stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token", "logit_scale")

EMBED_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")
"""Parameters that sit at layer 0 with the patch embedding and are never weight-decayed (layer decay)."""


# ------------------------------------------------------------------ parameter groups
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


def _layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, ``i + 1`` for ``blocks.i.*``, ``num_layers + 1`` for the rest (norms, head)."""
    if name in EMBED_NAMES or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: set[str] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay (the semantics of MAE's ``lr_decay.py``).

    With ``L = len(model.blocks)``, parameter ``p`` gets a layer id: 0 for ``cls_token``, ``pos_embed``,
    ``reg_token``, ``dist_token``, ``mask_token`` and ``patch_embed.*``; ``i + 1`` for ``blocks.i.*``; ``L + 1`` for
    everything else (``norm``, ``fc_norm``, ``head``). Its learning-rate scale is
    ``layer_decay ** (L + 1 - layer_id)``, so the head trains at ``lr`` and the patch embedding at
    ``lr * layer_decay ** (L + 1)``. Parameters with ``ndim <= 1`` (biases, norms) and those named in
    ``no_weight_decay`` (full name or last component) get no weight decay.

    Args:
        model: a timm-style ViT (has ``blocks``).
        lr: the peak learning rate (of the top layer).
        weight_decay: weight decay of the decayed parameters.
        layer_decay: per-layer lr factor in (0, 1]; 1 disables the decay.
        no_weight_decay: names exempt from weight decay; ``None`` = the tokens and position embedding
            (plus ``model.no_weight_decay()`` when the model defines it).

    Returns:
        One group per (layer id, decay / no decay) that has parameters, in layer order:
        ``{"params", "lr", "lr_scale", "weight_decay", "layer_id", "name"}``. Frozen parameters are left out.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"layer_decay_groups needs a ViT with .blocks, got {type(model).__name__}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    num_layers = len(blocks)  # type: ignore[arg-type]
    if no_weight_decay is None:
        skip = set(EMBED_NAMES)
        extra = getattr(model, "no_weight_decay", None)
        if callable(extra):
            skip |= set(extra())
    else:
        skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer_id = _layer_id(name, num_layers)
        decay = not (p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip)
        key = (layer_id, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": layer_id,
                "name": f"layer_{layer_id}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


# ------------------------------------------------------------------ optimisers
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


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, arXiv:1708.03888).

    For every parameter with ``ndim > 1`` (weight matrices, conv kernels) the step is

    .. code-block:: text

        d  = g + weight_decay * p
        q  = trust_coefficient * ||p|| / ||d||     (1 when either norm is 0)
        mu = momentum * mu + q * d
        p  = p - lr * mu

    Parameters with ``ndim <= 1`` (biases, norm scales and shifts) take a plain SGD-momentum step on
    their gradient, without weight decay or trust ratio, as in the MAE linear-probe recipe.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the schedule sets it per step).
        weight_decay: L2 penalty of the ``ndim > 1`` parameters.
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        trust_coefficient: eta of the trust ratio.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"bad LARS settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


# ------------------------------------------------------------------ schedule
def scaled_lr(base_lr: float, batch: int) -> float:
    """The linear scaling rule: ``base_lr * batch / 256`` (``batch``: the effective batch of one step)."""
    return base_lr * batch / 256


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


def poly_lr(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = 1e-6,
) -> float:
    """Poly decay ``(peak_lr - min_lr) * (1 - step / total_steps) ** power + min_lr`` with a linear warmup.

    During the warmup the poly value is scaled by ``warmup_ratio + (1 - warmup_ratio) * step / warmup_steps``
    (mmcv's ``PolyLrUpdaterHook`` with ``warmup="linear"``, by iteration, as BEiT / MAE's ADE20K runs).

    Examples:
        >>> poly_lr(0, 100, 10, 1.0), poly_lr(10, 100, 10, 1.0), poly_lr(100, 100, 10, 1.0)
        (1e-06, 0.9, 0.0)
    """
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    lr = (peak_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if warmup_steps > 0 and step < warmup_steps:
        lr *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clamp_warmup(warmup_steps: int, total_steps: int, where: str = "optim.warmup_steps") -> tuple[int, str | None]:
    """``min(warmup_steps, total_steps)`` and, when the warmup covers the whole run, a one-line warning.

    Examples:
        >>> clamp_warmup(5, 100)
        (5, None)
        >>> clamp_warmup(100, 100)[0]
        100
    """
    warning = None
    if total_steps > 0 and warmup_steps >= total_steps:
        warning = (
            f"the warmup ({where}: {warmup_steps} step{'s' * (warmup_steps != 1)}) covers the whole run of "
            f"{total_steps} step{'s' * (total_steps != 1)}: the learning "
            "rate never reaches its peak and never decays; shorten the warmup or train longer"
        )
    return min(warmup_steps, total_steps), warning
