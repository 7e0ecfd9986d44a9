"""Image transforms: MAE pretraining augmentation and evaluation resizing.

Both return float tensors (C, H, W) in ``[0, 1]``; there is no ``Normalize`` here, mean/std
normalisation happens on the device. All randomness comes from torch's global CPU generator, so
:class:`semmim.data.SeededDataset` makes it reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["Clamp01", "eval_transform", "pretrain_transform"]

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
) -> T.Compose:
    """MAE augmentation: random resized crop (bicubic), optional horizontal flip, to tensor.

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
    ops: list[Any] = [T.RandomResizedCrop(img_size, scale=(low, high), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if rand_augment:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)}
        ops.append(SafeRandAugment(rand_augment_transform(rand_augment, hparams)))
    ops += _to_tensor(uint8)
    return T.Compose(ops)


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
