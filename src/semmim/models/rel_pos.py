"""BEiT's learnable relative position bias (Bao et al. 2021, arXiv:2106.08254, Sec. 2.2).

Every attention logit between two tokens gets a learned per-head bias that depends only on where the
key lies relative to the query. On an (h, w) patch grid there are ``(2h - 1)(2w - 1)`` offsets between
patches; three more entries cover the CLS token: CLS query to any patch, any patch query to the CLS
key, and CLS to CLS. The table is indexed by a fixed (1 + L, 1 + L) matrix (:func:`relative_position_index`).

BEiT pretraining shares one table across all blocks; fine-tuning gives each block its own copy (which
is how semmim exports a shared table to timm's ``Beit``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def num_relative_distances(grid: tuple[int, int]) -> int:
    """Rows of the bias table for an (h, w) grid: ``(2h - 1)(2w - 1)`` patch offsets + 3 CLS entries."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """Row of the bias table used by each (query, key) pair; token 0 is the CLS token.

    For patches ``i`` at (y_i, x_i) and ``j`` at (y_j, x_j), row-major on the grid, the entry is
    ``(y_i - y_j + h - 1) * (2w - 1) + (x_i - x_j + w - 1)``. With ``R`` table rows, the CLS query row
    uses ``R - 3``, the CLS key column ``R - 2`` and the CLS-CLS pair ``R - 1`` (BEiT's layout, also timm's).

    Returns:
        (1 + h*w, 1 + h*w) int64.

    Examples:
        >>> relative_position_index((1, 2)).tolist()
        [[5, 3, 3], [4, 1, 0], [4, 2, 1]]
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (h - 1)  # (L, L) in [0, 2h - 2]
    dx = xs[:, None] - xs[None, :] + (w - 1)  # (L, L) in [0, 2w - 2]
    rows = num_relative_distances(grid)
    index = torch.empty(1 + h * w, 1 + h * w, dtype=torch.long)
    index[1:, 1:] = dy * (2 * w - 1) + dx
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def token_positions(ids_keep: Tensor) -> Tensor:
    """(N, L_keep) visible patch indices -> (N, 1 + L_keep) token positions (0 = CLS, 1 + l = patch l)."""
    cls = torch.zeros(ids_keep.shape[0], 1, dtype=ids_keep.dtype, device=ids_keep.device)
    return torch.cat([cls, ids_keep + 1], dim=1)


def select_index(index: Tensor, positions: Tensor | None) -> Tensor:
    """The rows of ``index`` (T, T) for the tokens present: (T, T) for all, or (N, T', T') for ``positions``.

    Args:
        index: (1 + L, 1 + L) from :func:`relative_position_index`.
        positions: (N, T') token positions of each sample (see :func:`token_positions`), or None.
    """
    if positions is None:
        return index
    return index[positions[:, :, None], positions[:, None, :]]


class RelativePositionBias(nn.Module):
    """One learnable bias table of shape (R, H), initialised to zero (BEiT).

    Args:
        grid: the patch grid (h, w).
        num_heads: attention heads H.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(grid), num_heads))

    def forward(self, index: Tensor) -> Tensor:
        """Per-head additive attention bias for an index from :func:`select_index`.

        Args:
            index: (T, T) or (N, T, T) table rows.

        Returns:
            (1, H, T, T) or (N, H, T, T), ready as ``attn_mask`` of ``F.scaled_dot_product_attention``.
        """
        bias = self.relative_position_bias_table[index]  # (..., T, T, H)
        if bias.dim() == 3:
            return bias.permute(2, 0, 1).unsqueeze(0)
        return bias.permute(0, 3, 1, 2)
