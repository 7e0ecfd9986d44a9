"""Teacher-feature targets: a frozen teacher's per-token features (MILAN, MaskDistill, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.registry import TARGETS
from semmim.teachers.base import Teacher, TeacherOutput


@TARGETS.register("teacher_features")
class TeacherFeatureTarget(nn.Module):
    """Per-token features of a frozen teacher, optionally LayerNorm-normalised without affine.

    The teacher runs on the raw [0, 1] images with its own preprocessing (resize, its own mean/std);
    its patch tokens are resampled to the student's patch grid. The same forward pass also yields the
    CLS attention used by semantic-aware masking, so the teacher runs once per image.

    Args:
        teacher: a :class:`semmim.teachers.Teacher` (frozen).
        ln_target: normalise each token to zero mean / unit variance (MaskDistill's target).
    """

    def __init__(self, teacher: Teacher, ln_target: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        self.ln_target = ln_target

    @property
    def out_dim(self) -> int:
        return int(self.teacher.embed_dim)

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int], need_attn: bool = False) -> TeacherOutput:
        """(N, C, H, W) images in [0, 1] -> tokens (N, 1 + L, D) (+ CLS attention (N, L))."""
        out = self.teacher(images, grid, need_attn=need_attn)
        tokens = out.tokens.float()
        if self.ln_target:
            tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        return TeacherOutput(tokens=tokens, cls_attn=out.cls_attn)
