"""Contrastive and distribution-matching losses of the language-aligned methods (CLIP, RILS).

Shapes: image embeddings (N, E), text embeddings (M, E); across ranks, the global batch is gathered
*with gradient* so every rank's loss sees all negatives (as open_clip's ``gather_with_grad``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.registry import LOSSES


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the gradient of every rank's slice."""
    _, world = world_info()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def info_nce(image: Tensor, text: Tensor, logit_scale: Tensor | float, gather: bool = True) -> Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, arXiv:2103.00020).

    Args:
        image: (N, E) image embeddings of this rank (normalised inside).
        text: (N, E) text embeddings, row i paired with image i.
        logit_scale: the inverse temperature (e.g. ``exp(log_scale)``).
        gather: gather both sides from all ranks (with gradient).

    Returns:
        mean of the image->text and text->image cross-entropies over this rank's rows.

    Examples:
        >>> e = torch.eye(4)
        >>> float(info_nce(e, e, 100.0)) < 1e-3
        True
    """
    if image.shape != text.shape:
        raise ValueError(f"image embeddings {tuple(image.shape)} and text embeddings {tuple(text.shape)} differ")
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    rank, _ = world_info()
    all_image = gather_with_grad(image) if gather else image
    all_text = gather_with_grad(text) if gather else text
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0] * int(gather)
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


@LOSSES.register("info_nce")
class InfoNCE(nn.Module):
    """Symmetric image-text InfoNCE with a learnable temperature (CLIP): ``(image, text) -> scalar``.

    Args:
        init_temperature: initial softmax temperature (learned as a log scale).
        max_scale: largest inverse temperature (CLIP clamps it at 100).
    """

    kind = "contrastive"

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0 / init_temperature).log())
        self.max_scale = max_scale

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return info_nce(image, text, self.scale)


def patch_text_kl(
    student_patches: Tensor,
    teacher_patches: Tensor,
    text: Tensor,
    mask: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    sample_weight: Tensor | None = None,
    normalizer: Tensor | None = None,
) -> Tensor:
    """RILS's masked reconstruction in language space (arXiv:2301.06958, Sec. 3).

    Every patch becomes a distribution over the captions of the (global) batch: the unmasked
    pass gives the target ``softmax(t·c / teacher_temperature)`` (no gradient) and the masked pass the
    prediction ``log_softmax(s·c / student_temperature)``; the loss is KL(target || prediction) per
    patch, averaged over the masked patches of the selected samples.

    Args:
        student_patches: (N, L, E) predictions from the masked pass.
        teacher_patches: (N, L, E) patch embeddings from the unmasked pass.
        text: (M, E) caption embeddings (the prototypes).
        mask: (N, L) bool, True = masked.
        sample_weight: (N,) 0/1 gate (e.g. image->text retrieval correct), None = all samples.
        normalizer: divide the summed KL by this instead of the selected masked patches of these N samples
            (GradCache: the count over the whole effective batch, so the micro-batches' terms add up).
    """
    text_n = F.normalize(text.float(), dim=-1).detach()
    with torch.no_grad():
        target = F.softmax(F.normalize(teacher_patches.float(), dim=-1) @ text_n.T / teacher_temperature, dim=-1)
    log_pred = F.log_softmax(F.normalize(student_patches.float(), dim=-1) @ text_n.T / student_temperature, dim=-1)
    kl = (target * (target.clamp_min(1e-12).log() - log_pred)).sum(-1)  # (N, L)
    w = mask.to(kl.dtype)
    if sample_weight is not None:
        w = w * sample_weight.to(kl.dtype)[:, None]
    return (kl * w).sum() / (w.sum().clamp_min(1.0) if normalizer is None else normalizer)
