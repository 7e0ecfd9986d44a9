"""BEiT's block-wise masking: rectangles of patches are masked until the target count is reached.

Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers", arXiv:2106.08254, Alg. 1; used at
40% by MaskDistill (Peng et al. 2022, arXiv:2210.10615). Each block covers at least
``min_patches`` patches (16 where the grid allows) with an aspect ratio in
``[min_aspect, 1 / min_aspect]``. A block is accepted only if it adds new patches without
overshooting the target. When no block fits the remaining budget, random single patches are masked
up to the target, as BEiT v2's generator does (Peng et al. 2022, arXiv:2208.06366), so every mask
hides exactly ``round(L * ratio)`` patches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from semmim.masking.base import MaskOutput, mask_from_bool
from semmim.registry import MASKERS


def _one_block_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    target: int,
    min_patches: int,
    log_aspect: tuple[float, float],
    max_patches: int | None,
    attempts: int = 50,
) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < target:
        room = target - count
        if max_patches is not None:
            room = min(room, max_patches)
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min_patches, max(min_patches, room))
            aspect = math.exp(rng.uniform(*log_aspect))
            # clamp to the grid (BEiT rejects instead, which can leave narrow grids unmasked)
            h = min(height, max(1, round(math.sqrt(area * aspect))))
            w = min(width, max(1, round(math.sqrt(area / aspect))))
            if h * w < min_patches:
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            patch = mask[top : top + h, left : left + w]
            new = h * w - int(patch.sum())
            if 0 < new <= room:
                patch[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < target:  # no block fits what is left: random single patches make up the count (BEiT v2)
        free = np.flatnonzero(~mask)
        mask.flat[rng.choice(free, target - count, replace=False)] = True
    return mask


def block_masking(
    n: int,
    grid: tuple[int, int],
    mask_ratio: float,
    min_patches: int = 16,
    min_aspect: float = 0.3,
    max_patches: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> MaskOutput:
    """Block-wise masks for ``n`` samples on a ``grid`` of patches, each hiding exactly ``round(L * ratio)``.

    Blocks are clamped to the grid. When the whole budget is smaller than ``min_patches`` (tiny
    grids or ratios), blocks of at least half the budget are used instead. What the blocks leave of
    the budget (usually less than one block) is made up with random single patches.

    Returns:
        A :class:`MaskOutput`; every sample masks the same count, so its index tensors are filled in.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    height, width = grid
    total = height * width
    target = round(total * mask_ratio)
    if target < min_patches:  # the budget holds no full-size block: use blocks of half the budget
        min_patches = max(1, target // 2)
    max_aspect = 1.0 / min_aspect
    log_aspect = (math.log(min(min_aspect, max_aspect)), math.log(max(min_aspect, max_aspect)))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)
    masks = np.stack(
        [
            _one_block_mask(rng, height, width, target, min_patches, log_aspect, max_patches).reshape(-1)
            for _ in range(n)
        ]
    )
    return mask_from_bool(torch.from_numpy(masks).to(device))


@MASKERS.register("block")
class BlockMasker:
    """BEiT/MaskDistill: block-wise masking (blocks of >= 16 patches, aspect 0.3..1/0.3), exact count.

    Args:
        mask_ratio: fraction of patches hidden, in (0, 1).
        min_patches: smallest block, in patches.
        min_aspect: smallest block aspect ratio (the largest is its inverse).
    """

    needs_scores = False
    uniform_count = False  # every mask hides the same count, but block masking stays a mask-token (BEiT) masker

    def __init__(self, mask_ratio: float = 0.4, min_patches: int = 16, min_aspect: float = 0.3) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.min_patches = min_patches
        self.min_aspect = min_aspect

    def __call__(
        self,
        n: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        scores: torch.Tensor | None = None,
    ) -> MaskOutput:
        return block_masking(
            n, grid, self.mask_ratio, self.min_patches, self.min_aspect, generator=generator, device=device
        )

    def __repr__(self) -> str:
        return f"BlockMasker(mask_ratio={self.mask_ratio}, min_patches={self.min_patches})"
