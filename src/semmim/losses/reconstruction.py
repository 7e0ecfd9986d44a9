"""Reconstruction losses: (pred, target, mask) -> scalar.

Shapes: ``pred`` and ``target`` are (N, L, D) (or (N, 1 + L, D) for losses over all tokens);
``mask`` is (N, L) bool with True = masked.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semmim.registry import LOSSES


def _check(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


def masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """(N, L) per-token losses averaged over the masked tokens (True in ``mask``), or over all when ``mask`` is None."""
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match per-token loss {tuple(per_token.shape)}")
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """MAE's loss: mean squared error per token, averaged over the masked tokens only.

    Examples:
        >>> p, t = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
        >>> float(masked_mse(p, t, torch.tensor([[True, False]])))
        1.0
    """
    _check(pred, target, "mse")
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return masked_mean(per_token, mask)


def cosine_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """MILAN's loss: ``2 - 2 * cos(pred, target)`` per token, averaged over the given tokens.

    MILAN (arXiv:2208.06049, Eq. 2 and its code) averages over *all* tokens, CLS included: pass
    ``mask=None``. A (N, L) mask restricts the average to masked tokens.
    """
    _check(pred, target, "cosine")
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)
    return masked_mean(2.0 - 2.0 * cos, mask)


@LOSSES.register("mse")
class MaskedMSE(nn.Module):
    """MSE over masked tokens (MAE), or over every token when the method passes no mask."""

    kind = "reconstruction"

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        return masked_mse(pred, target, mask)


@LOSSES.register("cosine")
class CosineLoss(nn.Module):
    """2 - 2*cos averaged over the tokens the method compares: all tokens for MILAN (it passes no mask), the
    masked ones for methods that pass a mask (MaskDistill, MAE)."""

    kind = "reconstruction"

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        return cosine_loss(pred, target, mask)


def masked_smooth_l1(pred: Tensor, target: Tensor, mask: Tensor | None, beta: float = 2.0) -> Tensor:
    """Smooth-L1 (Huber with threshold ``beta``) per element, averaged over the masked tokens.

    Per element: ``0.5 * e**2 / beta`` if ``|e| < beta`` else ``|e| - 0.5 * beta``; per token the
    mean over the feature width; then the mean over masked tokens (MaskDistill, arXiv:2210.10615).
    """
    _check(pred, target, "smooth_l1")
    per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(dim=-1)
    return masked_mean(per_token, mask)


@LOSSES.register("smooth_l1")
class MaskedSmoothL1(nn.Module):
    """Smooth-L1 over masked tokens (MaskDistill), or every token when the method passes no mask.

    Args:
        beta: threshold between the quadratic and linear zones (2.0 suits unit-variance targets).
    """

    kind = "reconstruction"

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        return masked_smooth_l1(pred, target, mask, self.beta)
