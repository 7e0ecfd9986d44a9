"""MAE's random masking: an independent uniform shuffle per sample.

He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377.
"""

from __future__ import annotations

import torch

from semmim.masking.base import MaskOutput, mask_from_order, num_visible
from semmim.registry import MASKERS


def random_masking(
    n: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> MaskOutput:
    """Mask ``mask_ratio`` of the patches of each sample uniformly at random.

    Exactly ``round(L * (1 - mask_ratio))`` patches stay visible in every sample.

    Examples:
        >>> m = random_masking(2, 16, 0.75)
        >>> m.ids_keep.shape, int(m.mask.sum())
        (torch.Size([2, 4]), 24)
    """
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    return mask_from_order(ids_shuffle, num_visible(num_patches, mask_ratio))


@MASKERS.register("random")
class RandomMasker:
    """MAE: uniform random masking with an exact visible count per sample.

    Args:
        mask_ratio: fraction of patches hidden, in (0, 1).
    """

    needs_scores = False
    uniform_count = True

    def __init__(self, mask_ratio: float = 0.75) -> None:
        num_visible(2, mask_ratio)  # validates the ratio
        self.mask_ratio = mask_ratio

    def __call__(
        self,
        n: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        scores: torch.Tensor | None = None,
    ) -> MaskOutput:
        return random_masking(n, grid[0] * grid[1], self.mask_ratio, device, generator)

    def __repr__(self) -> str:
        return f"RandomMasker(mask_ratio={self.mask_ratio})"
