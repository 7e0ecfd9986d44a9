"""Losses: prediction vs target over (masked) tokens."""

from semmim.losses.reconstruction import (
    CosineLoss,
    MaskedMSE,
    MaskedSmoothL1,
    cosine_loss,
    masked_mse,
    masked_smooth_l1,
)

__all__ = ["CosineLoss", "MaskedMSE", "MaskedSmoothL1", "cosine_loss", "masked_mse", "masked_smooth_l1"]
