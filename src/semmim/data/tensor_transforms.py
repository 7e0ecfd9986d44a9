"""Pretraining and evaluation transforms on uint8 image tensors (``data.decode=torchvision``).

The counterparts of :func:`semmim.data.transforms.pretrain_transform` and
:func:`semmim.data.transforms.eval_transform` for images decoded by
:mod:`semmim.data.tensor_decode`: they take a uint8 tensor (C, H, W) and never make a PIL image.

* The random resized crop draws its box with torchvision's ``RandomResizedCrop.get_params`` and the flip
  with ``torch.rand(1)``, the same draws in the same order as the PIL transform, so inside
  :func:`semmim.data.seeding.seeded` a sample gets the same box and flip on both paths.
* Only the box is resized (crop before resize), in channels-last uint8 with ``antialias=True``: PyTorch's
  vectorised uint8 kernels, whose bicubic filter (a = -0.5) is Pillow's. Bicubic is the default, as on
  the PIL path and in MAE; bilinear costs about the same here (see ``benchmarks/input_pipeline.py``).
* The result is uint8 (``uint8=True``, converted on the device) or float in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import transforms as T

from semmim.data.transforms import EVAL_CROP_MIN_SIZE, CropGeometry, crop_box

__all__ = ["INTERPOLATIONS", "TensorEvalTransform", "TensorPretrainTransform", "resize_uint8"]

INTERPOLATIONS = ("bicubic", "bilinear")
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def resize_uint8(
    img: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic", hflip: bool = False
) -> torch.Tensor:
    """Resize a uint8 image with antialiasing (Pillow's filters), optionally flipped horizontally.

    The resize runs in channels-last layout (PyTorch's vectorised uint8 kernels; ``decode_jpeg`` returns
    that layout already, so a crop box is copied row by row). The one transposition back to (C, H, W)
    is done by NumPy, about 3x faster than ``Tensor.contiguous`` for 3-channel uint8, and the flip is
    folded into it.

    Args:
        img: uint8 (C, H, W), any strides (a crop view is fine).
        size: output ``(height, width)``.
        interpolation: "bicubic" or "bilinear".
        hflip: mirror the result left-right.

    Returns:
        uint8 (C, height, width), contiguous.
    """
    if tuple(img.shape[-2:]) == tuple(size):
        out = img
    else:
        x = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = nnf.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)[0]
    arr = out.numpy()
    if hflip:
        arr = arr[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_uint8(img: object) -> None:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3:
        got = f"{img.dtype} tensor of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise TypeError(
            f"expected a uint8 image tensor (C, H, W) from data.decode=torchvision, got a {got} "
            "(a PIL image goes with the PIL transforms of semmim.data.transforms)"
        )


def _finish(img: torch.Tensor, uint8: bool) -> torch.Tensor:
    return img if uint8 else img.to(torch.float32).div_(255.0)


class TensorPretrainTransform:
    """MAE augmentation on a uint8 tensor: random resized crop, optional horizontal flip.

    Args:
        img_size: output height and width.
        crop_scale: ``(low, high)`` range of the crop area as a fraction of the image.
        hflip: flip horizontally with probability 0.5.
        uint8: return uint8 in ``[0, 255]`` instead of float in ``[0, 1]``.
        interpolation: "bicubic" (default, as the PIL path) or "bilinear".

    Call: uint8 (C, H, W) -> (C, img_size, img_size), uint8 or float32.

    Examples:
        >>> t = TensorPretrainTransform(32, uint8=True)
        >>> t(torch.zeros(3, 60, 80, dtype=torch.uint8)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(
        self,
        img_size: int,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip: bool = True,
        uint8: bool = False,
        interpolation: str = "bicubic",
    ) -> None:
        low, high = (float(s) for s in crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.img_size = int(img_size)
        self.scale = (low, high)
        self.hflip = bool(hflip)
        self.uint8 = bool(uint8)
        self.interpolation = interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.with_geometry(img)[0]

    def with_geometry(
        self, img: torch.Tensor, box: tuple[int, int, int, int] | None = None, flip: bool | None = None
    ) -> tuple[torch.Tensor, CropGeometry]:
        """uint8 (C, H, W) -> (the view, its :class:`semmim.data.transforms.CropGeometry`: normalised box, flip);
        ``box`` (top, left, height, width) and ``flip``: take them rather than draw them."""
        _check_uint8(img)
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(_RATIO)) if box is None else box
        if flip is None:
            flip = self.hflip and bool(torch.rand(1) < 0.5)  # the draw RandomHorizontalFlip makes
        cut = img[:, top : top + h, left : left + w]
        out = _finish(resize_uint8(cut, (self.img_size, self.img_size), self.interpolation, hflip=flip), self.uint8)
        return out, CropGeometry(crop_box(top, left, h, w, int(img.shape[-2]), int(img.shape[-1])), flip)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, crop_scale={self.scale}, hflip={self.hflip}, "
            f"uint8={self.uint8}, interpolation={self.interpolation})"
        )


class TensorEvalTransform:
    """Deterministic evaluation transform on a uint8 tensor, as :func:`semmim.data.transforms.eval_transform`.

    For ``img_size >= 64`` the short side is resized to ``int(img_size * 256 / 224)`` and the centre
    ``img_size`` crop kept; smaller sizes resize the short side to ``img_size``.

    Call: uint8 (C, H, W) -> (C, img_size, img_size), uint8 or float32.
    """

    def __init__(self, img_size: int, uint8: bool = False, interpolation: str = "bicubic") -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.img_size = int(img_size)
        self.resize = int(img_size * 256 / 224) if img_size >= EVAL_CROP_MIN_SIZE else self.img_size
        self.uint8 = bool(uint8)
        self.interpolation = interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_uint8(img)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        # torchvision's Resize(int): the short side becomes `resize`, the long side int(resize * long / short)
        if h <= w:
            new_h, new_w = self.resize, int(self.resize * w / h)
        else:
            new_h, new_w = int(self.resize * h / w), self.resize
        out = resize_uint8(img, (new_h, new_w), self.interpolation)
        top = round((new_h - self.img_size) / 2.0)
        left = round((new_w - self.img_size) / 2.0)
        if top < 0 or left < 0:  # the long side is shorter than the crop (tiny images): pad like CenterCrop
            out = T.functional.center_crop(out, [self.img_size, self.img_size])
        else:
            out = out[:, top : top + self.img_size, left : left + self.img_size].contiguous()
        return _finish(out, self.uint8)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(img_size={self.img_size}, uint8={self.uint8}, interpolation={self.interpolation})"
