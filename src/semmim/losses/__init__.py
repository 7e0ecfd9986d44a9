"""Losses: prediction vs target over (masked) tokens."""

from semmim.losses.reconstruction import CosineLoss, MaskedMSE, cosine_loss, masked_mse

__all__ = ["CosineLoss", "MaskedMSE", "cosine_loss", "masked_mse"]
