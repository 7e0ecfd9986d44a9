"""Mask containers and the shared index bookkeeping of all maskers.

Convention: ``mask[n, l] == True`` means patch ``l`` of sample ``n`` is hidden from the encoder
(and is what the model must reconstruct). Patches are numbered row-major on the (H/p, W/p) grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MaskOutput:
    """The result of a masker.

    Attributes:
        mask: (N, L) bool, True = masked.
        ids_keep: (N, L_keep) indices of the visible patches, or None when samples keep different
            numbers of patches (e.g. block-wise masking), which only the mask-token encoder accepts.
        ids_mask: (N, L - L_keep) indices of the masked patches, or None as above.
        ids_restore: (N, L) position of each patch in ``cat([ids_keep, ids_mask], 1)``, or None.
    """

    mask: Tensor
    ids_keep: Tensor | None = None
    ids_mask: Tensor | None = None
    ids_restore: Tensor | None = None

    @property
    def num_keep(self) -> int:
        if self.ids_keep is None:
            raise ValueError("this mask keeps a different number of patches per sample (no ids_keep)")
        return int(self.ids_keep.shape[1])

    def require_ids(self, who: str) -> tuple[Tensor, Tensor, Tensor]:
        """Return (ids_keep, ids_mask, ids_restore) or explain why ``who`` cannot use this mask."""
        if self.ids_keep is None or self.ids_mask is None or self.ids_restore is None:
            raise ValueError(
                f"{who} needs the same number of visible patches in every sample, but this mask varies "
                "per sample (block-wise masking). Use the mask-token encoder for block-wise masks."
            )
        return self.ids_keep, self.ids_mask, self.ids_restore


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches for a ratio: ``round(L * (1 - ratio))``, clamped to [1, L - 1]."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    return max(1, min(num_patches - 1, round(num_patches * (1.0 - mask_ratio))))


def mask_from_order(ids_shuffle: Tensor, len_keep: int) -> MaskOutput:
    """Keep the first ``len_keep`` patches of each row of an ordering.

    Args:
        ids_shuffle: (N, L) a permutation of ``range(L)`` per row.
        len_keep: number of visible patches.
    """
    n, length = ids_shuffle.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    ids_mask = ids_shuffle[:, len_keep:]
    mask = torch.ones(n, length, dtype=torch.bool, device=ids_shuffle.device)
    mask.scatter_(1, ids_keep, False)
    return MaskOutput(mask=mask, ids_keep=ids_keep, ids_mask=ids_mask, ids_restore=ids_restore)


def mask_from_bool(mask: Tensor) -> MaskOutput:
    """Wrap a boolean mask; index tensors are filled in when every row masks the same count.

    Args:
        mask: (N, L) bool, True = masked.
    """
    counts = mask.sum(1)
    if bool((counts == counts[0]).all()):
        # stable sort puts visible (False) patches first, each group in increasing patch order
        ids_shuffle = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        len_keep = int(mask.shape[1] - counts[0])
        out = mask_from_order(ids_shuffle, len_keep)
        out.mask = mask
        return out
    return MaskOutput(mask=mask)
