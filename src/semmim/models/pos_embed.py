"""Fixed 2D sine-cosine position embeddings (MAE, He et al. 2021, arXiv:2111.06377)."""

from __future__ import annotations

import torch
from torch import Tensor


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> Tensor:
    """Position table for a (h, w) patch grid, row-major.

    Half the channels encode the column, half the row, each with sin/cos at geometric frequencies.
    With ``cls_token`` a zero row is prepended.

    Returns:
        (1 + h*w, dim) or (h*w, dim) float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, xs), _sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
