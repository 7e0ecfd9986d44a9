"""Teacher-feature targets: a frozen teacher's per-token features (MILAN, MaskDistill, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semmim.registry import TARGETS
from semmim.targets.conditioning import TargetConditioner
from semmim.teachers.base import Teacher, TeacherOutput, resample_attention


@TARGETS.register("teacher_features")
class TeacherFeatureTarget(nn.Module):
    """Per-token features of a frozen teacher, conditioned (:mod:`semmim.targets.conditioning`).

    The teacher runs on the raw [0, 1] images with its own preprocessing (resize, its own mean/std);
    its patch tokens are resampled to the student's patch grid (``grid="student"``) or kept on the
    teacher's own grid (``grid="native"``: the method then pools its predictions to that grid). The same
    forward pass also yields the CLS attention used by semantic-aware masking, always on the student's
    grid, so the teacher runs once per image.

    Args:
        teacher: a :class:`semmim.teachers.Teacher` (frozen).
        ln_target: shorthand for ``norm="ln"`` (MaskDistill's target); ignored when ``norm`` is given.
        norm: target conditioning, one of :data:`semmim.targets.conditioning.TARGET_NORMS`.
        pca_dim: output width of ``norm="pca"``.
        grid: "student" or "native".
    """

    def __init__(
        self,
        teacher: Teacher,
        ln_target: bool = False,
        norm: str | None = None,
        pca_dim: int | None = None,
        grid: str = "student",
    ) -> None:
        super().__init__()
        if grid not in ("student", "native"):
            raise ValueError(f"teacher.grid must be 'student' or 'native', got {grid!r}")
        self.teacher = teacher
        self.norm = norm if norm is not None else ("ln" if ln_target else "none")
        self.ln_target = self.norm == "ln"
        self.grid = grid
        self.conditioner = TargetConditioner(self.norm, int(teacher.embed_dim), pca_dim=pca_dim)

    @property
    def out_dim(self) -> int:
        return self.conditioner.out_dim

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int], need_attn: bool = False) -> TeacherOutput:
        """(N, C, H, W) images in [0, 1] -> tokens (N, 1 + L, D') (+ CLS attention (N, L) on ``grid``).

        ``L`` is the student's ``grid`` (or the teacher's own grid when ``self.grid == "native"``) and
        ``D'`` is :attr:`out_dim`.
        """
        if self.grid == "native":
            out = self.teacher(images, None, need_attn=need_attn)
            own = self.teacher.native_grid
            assert own is not None
            attn = None if out.cls_attn is None else resample_attention(out.cls_attn, own, grid)
            out = TeacherOutput(tokens=out.tokens, cls_attn=attn)
        else:
            out = self.teacher(images, grid, need_attn=need_attn)
        tokens = self.conditioner(out.tokens.float())
        return TeacherOutput(tokens=tokens, cls_attn=out.cls_attn)
