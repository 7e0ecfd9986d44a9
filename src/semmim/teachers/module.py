"""Wrap any ``nn.Module`` as a frozen teacher (for models that no loader here knows).

The wrapped module receives the teacher-normalised images (N, C, H, W) and may return:

* a tensor (N, 1 + L, D) with a global/CLS token first (``has_cls=True``),
* a tensor (N, L, D) of patch tokens only (``has_cls=False``: their mean is prepended),
* a feature map (N, D, h, w) (the mean over positions is prepended), or
* a dict with ``"tokens"`` (any of the above) and optionally ``"cls_attn"`` (N, L) and ``"grid"`` (h, w).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from semmim.registry import TEACHERS
from semmim.teachers.base import Teacher, infer_grid

__all__ = ["ModuleTeacher"]


@TEACHERS.register("module", help="any nn.Module passed from Python, frozen")
class ModuleTeacher(Teacher):
    """A frozen teacher around a user module (the module itself is frozen in place).

    Args:
        module: the model; called as ``module(x)`` on normalised images.
        embed_dim: width D of its tokens.
        image_size: input size it runs at.
        mean: its per-channel input mean.
        std: its per-channel input std.
        in_chans: channels it takes.
        has_cls: whether a 3-D token output starts with a CLS/global token.
        grid: its patch grid (h, w) for 3-D outputs; default inferred from L and the image aspect ratio.
        name: description for logs.
    """

    def __init__(
        self,
        module: nn.Module,
        embed_dim: int,
        image_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        has_cls: bool = True,
        grid: Sequence[int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(embed_dim, image_size, mean, std, in_chans, name or f"module {type(module).__name__}")
        self.module = module
        self.has_cls = bool(has_cls)
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.native_grid = self.grid
        self.freeze()

    def extract(self, x: Tensor, need_attn: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Normalise the module's output to (N, 1 + h*w, D), the CLS attention (N, h*w) and (h, w)."""
        out = self.module(x)
        attn: Tensor | None = None
        grid = self.grid
        if isinstance(out, Mapping):
            if "tokens" not in out:
                raise ValueError(f"{self.name}: a dict output needs a 'tokens' entry, got {sorted(out)}")
            attn = out.get("cls_attn")
            if out.get("grid") is not None:
                grid = (int(out["grid"][0]), int(out["grid"][1]))
            tokens = out["tokens"]
        else:
            tokens = out
        if not isinstance(tokens, Tensor):
            raise TypeError(f"{self.name}: expected a tensor or a dict of tensors, got {type(tokens).__name__}")
        if tokens.dim() == 4:  # (N, D, h, w) feature map
            grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
            patches = tokens.flatten(2).transpose(1, 2)
            glob = patches.mean(dim=1, keepdim=True)
        elif tokens.dim() == 3:
            if self.has_cls:
                glob, patches = tokens[:, :1], tokens[:, 1:]
            else:
                patches = tokens
                glob = patches.mean(dim=1, keepdim=True)
            if grid is None:
                grid = infer_grid(patches.shape[1], (int(x.shape[-2]), int(x.shape[-1])))
        else:
            raise ValueError(f"{self.name}: tokens must be (N, T, D) or (N, D, h, w), got {tuple(tokens.shape)}")
        if patches.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.name}: tokens have width {patches.shape[-1]}, expected {self.embed_dim}")
        if patches.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{self.name}: {patches.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        if not need_attn:
            attn = None
        elif attn is not None and tuple(attn.shape) != tuple(patches.shape[:2]):
            expected = tuple(patches.shape[:2])
            raise ValueError(f"{self.name}: cls_attn has shape {tuple(attn.shape)}, expected {expected}")
        return torch.cat([glob, patches], dim=1), attn, grid
