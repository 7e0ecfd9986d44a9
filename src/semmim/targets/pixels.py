"""Pixel targets (MAE): patchified images, optionally normalised per patch (``norm_pix_loss``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semmim.registry import TARGETS


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches row-major, each patch flattened as (p, p, C)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not divisible by patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); inverse of :func:`patchify`."""
    n = x.shape[0]
    p = patch_size
    h, w = grid
    x = x.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)


def normalize_patches(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch standardisation of MAE's ``norm_pix_loss``: (x - mean) / sqrt(var + eps)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


@TARGETS.register("pixels")
class PixelTarget(nn.Module):
    """MAE target: the image's patches, normalised per patch when ``norm_pix`` (MAE's default)."""

    def __init__(self, patch_size: int, norm_pix: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> (N, L, p*p*C)."""
        t = patchify(images.float(), self.patch_size)
        return normalize_patches(t) if self.norm_pix else t
