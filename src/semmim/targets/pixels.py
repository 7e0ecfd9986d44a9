"""Pixel targets (MAE): patchified images, optionally normalised per patch (``norm_pix_loss``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semmim.registry import TARGETS
from semmim.targets.base import TargetOutput


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
    """MAE target: the image's patches (of the student-normalised image), normalised per patch when ``norm_pix``.

    Args:
        patch_size: side of a patch (from ``model.patch_size``).
        in_chans: image channels (from ``model.in_chans``).
        mean, std: the student's input normalisation (from ``data.mean`` / ``data.std``).
        norm_pix: standardise each target patch by its own mean and variance (MAE's ``norm_pix_loss``).
    """

    kind = "pixels"

    def __init__(
        self,
        patch_size: int,
        in_chans: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        norm_pix: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix = norm_pix
        mean_t = torch.tensor(mean if mean is not None else [0.0] * in_chans).view(1, in_chans, 1, 1)
        std_t = torch.tensor(std if std is not None else [1.0] * in_chans).view(1, in_chans, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int] | None = None, need_attn: bool = False) -> TargetOutput:
        """(N, C, H, W) images in [0, 1] -> tokens (N, L, p*p*C) of the normalised image."""
        mean: Tensor = self.mean  # type: ignore[assignment]
        std: Tensor = self.std  # type: ignore[assignment]
        t = patchify(((images - mean) / std).float(), self.patch_size)
        return TargetOutput(tokens=normalize_patches(t) if self.norm_pix else t)
