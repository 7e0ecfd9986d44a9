"""Image transforms: MAE pretraining augmentation and evaluation resizing.

Both return float tensors (C, H, W) in ``[0, 1]``; there is no ``Normalize`` here, mean/std
normalisation happens on the device. All randomness comes from torch's global CPU generator, so
:class:`semmim.data.SeededDataset` makes it reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = ["Clamp01", "CropGeometry", "PretrainCompose", "eval_transform", "pretrain_transform", "transform_geometry"]


class CropGeometry(NamedTuple):
    """Where a training view comes from: the crop box in the original image and whether it was mirrored.

    Attributes:
        box: ``(x0, y0, x1, y1)`` of the random resized crop, in the original image's normalised coordinates
            (0 = left/top edge, 1 = right/bottom edge).
        flip: the crop was flipped left-right after resizing.
    """

    box: tuple[float, float, float, float]
    flip: bool


def crop_box(top: int, left: int, h: int, w: int, height: int, width: int) -> tuple[float, float, float, float]:
    """A pixel crop ``(top, left, h, w)`` of a ``height`` x ``width`` image -> normalised ``(x0, y0, x1, y1)``."""
    return (left / width, top / height, (left + w) / width, (top + h) / height)


PixelBox = tuple[int, int, int, int]
"""A crop in pixels: ``(top, left, height, width)``, as ``RandomResizedCrop.get_params`` draws it."""


def transform_geometry(
    transform: Any, img: Any, box: PixelBox | None = None, flip: bool | None = None
) -> tuple[torch.Tensor, CropGeometry | None]:
    """``transform(img)`` and the view's :class:`CropGeometry` (``None`` for a transform that does not report one).

    A transform reports it with a ``with_geometry(img, box=None, flip=None) -> (tensor, CropGeometry)`` method (the
    pretraining transforms); the random draws and the image are those of ``transform(img)``. ``box``: cut this crop
    instead of drawing one; ``flip``: mirror the view or not instead of drawing it (``None``: drawn).
    """
    with_geometry = getattr(transform, "with_geometry", None)
    if callable(with_geometry):
        out, geometry = with_geometry(img, box=box, flip=flip)
        return out, geometry
    if box is not None or flip is not None:
        raise TypeError(f"the transform {transform!r} cannot cut a given crop box or flip")
    return transform(img), None


class _ResizedCropWithBox(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (the same draw and resize) that also returns its normalised box."""

    def crop_with_box(self, img: Any, box: PixelBox | None = None) -> tuple[Any, tuple[float, float, float, float]]:
        top, left, h, w = self.get_params(img, self.scale, self.ratio) if box is None else box
        height, width = TF.get_image_size(img)[::-1]
        out = TF.resized_crop(img, top, left, h, w, self.size, self.interpolation, antialias=self.antialias)
        return out, crop_box(top, left, h, w, height, width)


class _FlipWithFlag(T.RandomHorizontalFlip):
    """torchvision's RandomHorizontalFlip (the same draw) that also says whether it flipped."""

    def flip_with_flag(self, img: Any, flip: bool | None = None) -> tuple[Any, bool]:
        if flip is not None:  # given (a cached teacher's stored view), not drawn
            return (TF.hflip(img), True) if flip else (img, False)
        if torch.rand(1) < self.p:
            return TF.hflip(img), True
        return img, False


class PretrainCompose(T.Compose):
    """The pretraining transform: a ``Compose`` whose :meth:`with_geometry` also reports the crop box and flip.

    Calling it gives exactly the image ``with_geometry`` gives (same ops, same random draws, same order).
    """

    def with_geometry(
        self, img: Any, box: PixelBox | None = None, flip: bool | None = None
    ) -> tuple[torch.Tensor, CropGeometry]:
        """PIL image -> ((C, H, W) tensor, :class:`CropGeometry`); ``box``, ``flip``: take them rather than draw
        them (a given flip needs the transform's flip step, ``data.hflip``)."""
        cut: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
        flipped = False
        for t in self.transforms:
            if isinstance(t, _ResizedCropWithBox):
                img, cut = t.crop_with_box(img, box)
            elif isinstance(t, _FlipWithFlag):
                img, flipped = t.flip_with_flag(img, flip)
            else:
                img = t(img)
        return img, CropGeometry(cut, flipped)

    def __call__(self, img: Any) -> Any:
        return self.with_geometry(img)[0]


EVAL_CROP_MIN_SIZE = 64
"""Below this size :func:`eval_transform` resizes without the 256/224 centre crop."""


class Clamp01(torch.nn.Module):
    """Clamp a tensor to ``[0, 1]`` (bicubic resampling of a tensor overshoots)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (C, H, W), same dtype, values clamped to ``[0, 1]``."""
        return x.clamp_(0.0, 1.0) if x.is_floating_point() else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, also for ``bits_to_keep == 0`` (a black image), which Pillow >= 13 rejects."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class SafeRandAugment:
    """A timm RandAugment that also runs on grey ("L") images (through RGB: timm's fill colour is an RGB
    triple, which PIL rejects for "L" images) and with Pillow >= 13 (posterize to 0 bits)."""

    def __init__(self, op: Any) -> None:
        for aug in getattr(op, "ops", []):
            if str(getattr(aug, "name", "")).startswith("Posterize"):
                aug.aug_fn = _posterize
        self.op = op

    def __call__(self, img: Any) -> Any:
        if getattr(img, "mode", None) == "L":
            return self.op(img.convert("RGB")).convert("L")
        return self.op(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op!r})"


def _to_tensor(uint8: bool) -> list[Any]:
    """The last step: float (C, H, W) in [0, 1], or uint8 (C, H, W) to be converted on the device."""
    return [T.PILToTensor()] if uint8 else [T.ToTensor(), Clamp01()]


def pretrain_transform(
    img_size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
    rand_augment: str | None = None,
    uint8: bool = False,
) -> PretrainCompose:
    """MAE augmentation: random resized crop (bicubic), optional horizontal flip, to tensor.

    ``transform.with_geometry(img)`` also returns the view's :class:`CropGeometry` (crop box, flip), which the
    cached-teacher target follows (:mod:`semmim.teachers.cache`).

    Args:
        img_size: output height and width.
        crop_scale: ``(low, high)`` range of the crop area as a fraction of the image.
        hflip: flip horizontally with probability 0.5.
        rand_augment: a timm RandAugment spec (e.g. ``rand-m9-mstd0.5-inc1``) for supervised recipes.
        uint8: end with a uint8 tensor instead of a float one.

    Returns:
        A transform mapping a PIL image to a float tensor (C, img_size, img_size) in ``[0, 1]`` (uint8 in
        ``[0, 255]`` with ``uint8=True``).
    """
    low, high = (float(s) for s in crop_scale)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}")
    ops: list[Any] = [_ResizedCropWithBox(img_size, scale=(low, high), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(_FlipWithFlag())
    if rand_augment:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)}
        ops.append(SafeRandAugment(rand_augment_transform(rand_augment, hparams)))
    ops += _to_tensor(uint8)
    return PretrainCompose(ops)


def eval_transform(img_size: int, uint8: bool = False) -> T.Compose:
    """Deterministic evaluation transform.

    For ``img_size >= 64``: resize the short side to ``int(img_size * 256 / 224)`` (bicubic) and take
    the centre ``img_size`` crop. For tiny images (e.g. Fashion-MNIST) the short side is resized to
    ``img_size`` directly; the centre crop then only trims the long side of non-square images.

    Args:
        img_size: output height and width.
        uint8: end with a uint8 tensor instead of a float one.

    Returns:
        A transform mapping a PIL image to a float tensor (C, img_size, img_size) in ``[0, 1]`` (uint8 in
        ``[0, 255]`` with ``uint8=True``).
    """
    resize = int(img_size * 256 / 224) if img_size >= EVAL_CROP_MIN_SIZE else img_size
    return T.Compose(
        [T.Resize(resize, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(img_size), *_to_tensor(uint8)]
    )
