"""Cross-entropy over discrete token ids: the loss of token targets (a tokenizer's codes).

BEiT (Bao et al. 2021, arXiv:2106.08254) and BEiT v2 (Peng et al. 2022, arXiv:2208.06366) predict, at every
masked patch, the id a frozen tokenizer gives that patch; the loss is the cross-entropy of the predicted
distribution over the vocabulary, averaged over the masked patches.

Shapes: ``pred`` (N, L, V) logits over a vocabulary of V codes, ``target`` (N, L) int64 code ids in
[0, V), ``mask`` (N, L) bool with True = masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.losses.reconstruction import masked_mean
from semmim.registry import LOSSES


def masked_cross_entropy(pred: Tensor, target: Tensor, mask: Tensor | None, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy per token, averaged over the masked tokens (every token when ``mask`` is None).

    Args:
        pred: (N, L, V) logits.
        target: (N, L) int64 ids in [0, V).
        mask: (N, L) bool, True = masked; None = every token counts.
        label_smoothing: weight of the uniform distribution mixed into the one-hot target (0 = none).

    Examples:
        >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
        >>> ids = torch.tensor([[0, 0]])
        >>> round(float(masked_cross_entropy(logits, ids, torch.tensor([[True, False]]))), 4)  # -log 0.5
        0.6931
    """
    if pred.dim() != 3 or target.shape != pred.shape[:2]:
        raise ValueError(
            f"ce: logits must be (N, L, V) and token ids (N, L); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"ce: targets must be integer token ids, got {target.dtype} (a feature target needs mse/...)")
    per_token = F.cross_entropy(
        pred.float().flatten(0, 1), target.long().flatten(), reduction="none", label_smoothing=label_smoothing
    ).view(target.shape)
    return masked_mean(per_token, mask)


@LOSSES.register("ce")
class MaskedCrossEntropy(nn.Module):
    """Cross-entropy of predicted logits against token ids (BEiT), averaged over the masked tokens.

    Args:
        label_smoothing: uniform label smoothing in [0, 1) (0 = plain cross-entropy, as BEiT).
    """

    kind = "tokens"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.check_args(label_smoothing)
        self.label_smoothing = float(label_smoothing)

    @staticmethod
    def check_args(label_smoothing: float = 0.0) -> None:
        """Refuse a smoothing outside [0, 1) before anything is built."""
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        return masked_cross_entropy(pred, target, mask, self.label_smoothing)
