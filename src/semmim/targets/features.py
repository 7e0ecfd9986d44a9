"""Teacher-feature targets: a frozen teacher's per-token features (MILAN, MaskDistill, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semmim.registry import TARGETS
from semmim.targets.base import TargetOutput
from semmim.targets.conditioning import TARGET_NORMS, TargetConditioner
from semmim.teachers.base import Teacher, resample_attention
from semmim.teachers.cache import CropBatch, TeacherCache, crop_maps, relative_boxes, stored_maps, view_cells


@TARGETS.register("teacher_features")
class TeacherFeatureTarget(nn.Module):
    """Per-token features of a frozen teacher, conditioned (:mod:`semmim.targets.conditioning`).

    The teacher runs on the raw [0, 1] images with its own preprocessing (resize, its own mean/std, or
    ``data.mean/std`` under ``teacher.input_norm=data``);
    its patch tokens are resampled to the student's patch grid (``grid="student"``) or kept on the
    teacher's own grid (``grid="native"``: the method then pools its predictions to that grid). The same
    forward pass also yields the CLS attention used by semantic-aware masking, always on the student's
    grid, so the teacher runs once per image.

    Args:
        teacher: a :class:`semmim.teachers.Teacher` (frozen; built from the ``teacher`` section).
        norm: how teacher tokens are conditioned before the loss: none | ln | center | center_ln | whiten |
            pca (:mod:`semmim.targets.conditioning`); MILAN's default is center, MaskDistill's ln.
        pca_dim: output width of ``norm=pca`` (required by it, refused otherwise).
        grid: where the loss compares tokens: "student" (the teacher's map resampled to the student's grid)
            or "native" (the student's predictions pooled to the teacher's own grid; MILAN).
        teacher_cache: a directory of cached teacher maps (``teacher.cache``, :mod:`semmim.teachers.cache`):
            ``teacher`` is then ``None`` and :meth:`forward` takes each view's ``geometry`` instead of running it.
    """

    kind = "features"

    def __init__(
        self,
        teacher: Teacher | None,
        norm: str = "none",
        pca_dim: int | None = None,
        grid: str = "student",
        teacher_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.check_args(norm=norm, pca_dim=pca_dim, grid=grid)
        self.teacher = teacher
        self.cache = None if teacher_cache is None else TeacherCache(teacher_cache)
        if teacher is None and self.cache is None:
            raise ValueError("the teacher_features target needs a teacher (or teacher.cache)")
        self.norm = norm
        self.grid = grid
        dim = self.cache.dim if self.cache is not None else int(teacher.embed_dim)  # type: ignore[union-attr]
        self.conditioner = TargetConditioner(self.norm, dim, pca_dim=pca_dim)

    @staticmethod
    def check_args(norm: str = "none", pca_dim: int | None = None, grid: str = "student") -> None:
        """Check the config keys before the teacher is built (config validation calls this).

        Raises:
            ValueError: names the key and what is allowed.
        """
        if grid not in ("student", "native"):
            raise ValueError(f"grid must be 'student' or 'native', got {grid!r}")
        if norm not in TARGET_NORMS:
            raise ValueError(f"norm={norm!r} is not one of {', '.join(TARGET_NORMS)}")
        if norm == "pca" and pca_dim is None:
            raise ValueError("norm=pca needs pca_dim (the number of principal directions kept)")
        if pca_dim is not None and norm != "pca":
            raise ValueError(f"pca_dim={pca_dim} is used only by norm=pca; remove it or set norm=pca")

    @property
    def out_dim(self) -> int:
        return self.conditioner.out_dim

    @property
    def native_grid(self) -> tuple[int, int] | None:
        """The teacher's own grid (h, w) at its input size (known after a forward, or from the cache)."""
        if self.cache is not None:
            return self.cache.teacher_grid
        return None if self.teacher is None else self.teacher.native_grid

    @torch.no_grad()
    def forward(
        self, images: Tensor, grid: tuple[int, int], need_attn: bool = False, geometry: CropBatch | None = None
    ) -> TargetOutput:
        """(N, C, H, W) images in [0, 1] -> tokens (N, 1 + L, D') (+ CLS attention (N, L) on ``grid``).

        ``L`` is the student's ``grid`` (or the teacher's own grid when ``self.grid == "native"``) and
        ``D'`` is :attr:`out_dim`. With a cache the tokens are cut from the stored maps of ``geometry.index`` to
        ``geometry.crop`` (then mirrored where ``geometry.flip``); ``images`` only give the device.
        """
        if self.cache is not None:
            return self.from_cache(images.device, grid, need_attn, geometry)
        assert self.teacher is not None
        if self.grid == "native":
            out = self.teacher(images, None, need_attn=need_attn)
            own = self.teacher.native_grid
            assert own is not None
            attn = None if out.cls_attn is None else resample_attention(out.cls_attn, own, grid)
        else:
            out = self.teacher(images, grid, need_attn=need_attn)
            attn = out.cls_attn
        tokens = self.conditioner(out.tokens.float())
        return TargetOutput(tokens=tokens, global_token=True, cls_attn=attn)

    def from_cache(
        self, device: torch.device, grid: tuple[int, int], need_attn: bool, geometry: CropBatch | None
    ) -> TargetOutput:
        """The targets of a batch's views from the cached maps (see :meth:`forward`)."""
        assert self.cache is not None
        if geometry is None:
            raise ValueError(
                "teacher.cache needs each item's crop geometry ('index', 'crop', 'flip'): the training dataset "
                "must report it (SeededDataset.geometry = True; the engine sets it)"
            )
        if need_attn and not self.cache.has_attn:
            raise ValueError(f"the masker needs the CLS attention, which teacher.cache={self.cache.root} does not hold")
        stored = geometry.stored  # read by the loader's workers
        if stored is None:
            stored = self.cache.stored(geometry.index, geometry.crop)
        stored = {k: v.to(device) for k, v in stored.items()}
        maps, glob, attn_map = stored_maps(stored, need_attn, pca=self.cache.pca)
        out_hw = self.cache.teacher_grid if self.grid == "native" else tuple(grid)
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        attn_hw = (int(grid[0]), int(grid[1]))
        boxes, flips = geometry.crop.to(device), geometry.flip.to(device)
        patches = crop_maps(maps, boxes, flips, out_hw)
        cut = None if attn_map is None else crop_maps(attn_map, boxes, flips, attn_hw)
        if "teacher_view_box" in stored:  # crops stored: the nearest view's global token, and its map inside it
            views = stored["teacher_view_box"].float()
            vmaps, glob, vattn = stored_maps(stored, need_attn, prefix="teacher_view_", pca=self.cache.pca)
            rel = relative_boxes(boxes, views)
            patches = torch.where(
                view_cells(boxes, views, flips, out_hw), crop_maps(vmaps, rel, flips, out_hw), patches
            )
            if cut is not None and vattn is not None:  # attention per unit of image area: a view's cells are smaller
                area = ((views[:, 2] - views[:, 0]) * (views[:, 3] - views[:, 1])).view(-1, 1, 1, 1)
                vcut = crop_maps(vattn, rel, flips, attn_hw) / area
                cut = torch.where(view_cells(boxes, views, flips, attn_hw), vcut, cut)
        tokens = torch.cat([glob.unsqueeze(1), patches.flatten(2).transpose(1, 2)], dim=1)
        attn = None
        if cut is not None:
            cut = cut.flatten(1).clamp_min(0)
            attn = cut / cut.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return TargetOutput(tokens=self.conditioner(tokens), global_token=True, cls_attn=attn)
