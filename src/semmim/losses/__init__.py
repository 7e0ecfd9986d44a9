"""Losses: prediction vs target over (masked) tokens (regression, cross-entropy over token ids); image-text
contrastive losses."""

from semmim.losses.contrastive import InfoNCE, gather_with_grad, info_nce, patch_text_kl
from semmim.losses.reconstruction import (
    CosineLoss,
    MaskedMSE,
    MaskedSmoothL1,
    cosine_loss,
    masked_mse,
    masked_smooth_l1,
)
from semmim.losses.tokens import MaskedCrossEntropy, masked_cross_entropy

__all__ = [
    "CosineLoss",
    "InfoNCE",
    "MaskedCrossEntropy",
    "MaskedMSE",
    "MaskedSmoothL1",
    "cosine_loss",
    "gather_with_grad",
    "info_nce",
    "masked_cross_entropy",
    "masked_mse",
    "masked_smooth_l1",
    "patch_text_kl",
]
