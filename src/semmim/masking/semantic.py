"""MILAN's semantic-aware masking: patches the teacher attends to are more likely to stay visible.

Hou et al. 2022, "MILAN: Masked Image Pretraining on Language Assisted Representation",
arXiv:2208.06049, Sec. 3.3. The importance of a patch is the attention of the teacher's CLS token to
it in the teacher's last block (mean over heads). The patch order is drawn by multinomial sampling
*without replacement* with probabilities proportional to the importance; the first ``1 - ratio`` of
that order stay visible. Unlike a top-k choice this still shows some background patches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from semmim.masking.base import MaskOutput, mask_from_order, num_visible
from semmim.registry import MASKERS


def semantic_masking(importance: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> MaskOutput:
    """Draw the visible patches with probability proportional to ``importance``.

    Args:
        importance: (N, L) non-negative scores (e.g. teacher CLS attention); rows need not sum to 1.
        mask_ratio: fraction of patches to mask.
        generator: optional RNG for reproducible draws.
    """
    if importance.dim() != 2:
        raise ValueError(f"importance must be (N, L), got shape {tuple(importance.shape)}")
    scores = importance.detach().float()
    if scores.device.type == "cpu":
        if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
            raise ValueError("importance scores must be finite and non-negative")
    else:  # no host-device sync in the training step: broken scores count as zero attention
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    length = scores.shape[1]
    # a tiny floor keeps multinomial valid when the attention puts exactly zero on some patches
    probs = scores + scores.sum(1, keepdim=True).clamp_min(1e-12) * 1e-8 + 1e-12
    ids_shuffle = torch.multinomial(probs, length, replacement=False, generator=generator)
    return mask_from_order(ids_shuffle, num_visible(length, mask_ratio))


@MASKERS.register("semantic")
class SemanticMasker:
    """MILAN: keep patches drawn by the teacher's CLS attention (needs a teacher with attention).

    Args:
        mask_ratio: fraction of patches hidden, in (0, 1).
    """

    needs_scores = True
    uniform_count = True

    def __init__(self, mask_ratio: float = 0.75) -> None:
        num_visible(2, mask_ratio)
        self.mask_ratio = mask_ratio

    def __call__(
        self,
        n: int,
        grid: tuple[int, int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        scores: Tensor | None = None,
    ) -> MaskOutput:
        if scores is None:
            raise ValueError(
                "semantic masking needs the teacher's CLS attention, but the teacher gave none (models without a "
                "CLS token, such as CNNs, have none; a module teacher must return a dict with 'cls_attn'): use "
                "method.masker=random"
            )
        if scores.shape != (n, grid[0] * grid[1]):
            raise ValueError(f"attention scores have shape {tuple(scores.shape)}, expected {(n, grid[0] * grid[1])}")
        return semantic_masking(scores, self.mask_ratio, generator)

    def __repr__(self) -> str:
        return f"SemanticMasker(mask_ratio={self.mask_ratio})"
