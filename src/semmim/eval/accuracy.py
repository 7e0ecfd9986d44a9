"""Top-1 / top-5 accuracy of any image -> logits function over a labelled loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def topk_accuracy(
    logits_of: Callable[[Tensor], Tensor], loader: Iterable[Any], device: torch.device | str
) -> dict[str, float]:
    """Accuracy (in %) of ``logits_of(images) -> (N, K)`` on batches of ``{"image", "label"}``.

    Returns:
        {"top1", "top5", "n_test"}; top-5 is top-K when there are fewer than 5 classes.
    """
    top1 = top5 = n = 0
    for batch in loader:
        logits = logits_of(batch["image"].to(device))
        y = batch["label"].to(device)
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(1).sum())
        n += len(y)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "n_test": n}
