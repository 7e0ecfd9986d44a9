"""Joint image + mask augmentation of the fine-tuned segmentation recipe, on torchvision v2.

mmseg's ADE20K pipeline (``configs/_base_/datasets/ade20k.py``, used by BEiT and MAE), reimplemented:

* train: :class:`RandomRescale` (keep the aspect ratio inside ``scale x r``, ``r ~ U(ratio_range)``) ->
  :class:`RandomCatCrop` (``crop_size``, re-drawn up to 10 times while one class fills ``cat_max_ratio``)
  -> ``v2.RandomHorizontalFlip`` -> :class:`PhotoMetricDistortion` -> :class:`PadTo` (``crop_size``; the
  image with the mean colour, i.e. 0 after normalisation as mmseg pads normalised images, the mask with 255);
* test: :func:`rescale_size` into ``scale``; the mask stays at the original size (mIoU is measured there).

Images are ``tv_tensors.Image`` (C, H, W) floats in [0, 1], masks ``tv_tensors.Mask`` (H, W) int64: v2
moves both with the same geometry and resizes masks with nearest neighbours, so labels are never
interpolated; photometric transforms leave masks untouched. Randomness comes from torch's generator,
which :class:`SegPipeline` seeds per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from semmim.data.datasets import check_index
from semmim.data.seeding import seeded
from semmim.data.segmentation import IGNORE_INDEX

__all__ = [
    "PadTo",
    "PhotoMetricDistortion",
    "RandomCatCrop",
    "RandomRescale",
    "SegPipeline",
    "rescale_size",
    "train_transform",
]

CROP_TRIES = 10
"""Extra crops drawn while one class dominates (mmseg's ``RandomCrop``)."""


def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """The size of an ``h x w`` image rescaled, keeping its aspect ratio, to fit ``scale`` = (long, short) edges.

    The factor is ``min(long / max(h, w), short / min(h, w))`` (mmcv's ``imrescale``).

    Examples:
        >>> rescale_size(375, 500, (2048, 512)), rescale_size(28, 28, (64, 16))
        ((512, 683), (16, 16))
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _image(flat_inputs: list[Any]) -> tv_tensors.Image:
    for x in flat_inputs:
        if isinstance(x, tv_tensors.Image):
            return x
    raise TypeError("a segmentation transform needs a tv_tensors.Image among its inputs")


def _mask(flat_inputs: list[Any]) -> tv_tensors.Mask | None:
    return next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class RandomRescale(v2.Transform):
    """Resize image and mask to :func:`rescale_size` of ``scale x r``, ``r ~ U(ratio_range)`` (bilinear / nearest).

    Args:
        scale: (long, short) edges at r = 1, e.g. (2048, 512).
        ratio_range: (low, high) of r.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image(flat_inputs).shape[-2:]
        r = _uniform(*self.ratio_range)
        return {"size": list(rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r))))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


class RandomCatCrop(v2.Transform):
    """A random ``crop_size`` crop (smaller where the image is), re-drawn while one class dominates it.

    A crop is accepted when its labelled pixels hold at least two classes and the largest holds less than
    ``cat_max_ratio`` of them; after :data:`CROP_TRIES` refusals the last draw is kept (mmseg's
    ``RandomCrop``). ``cat_max_ratio = 1`` keeps the first draw.

    Args:
        crop_size: crop height and width.
        cat_max_ratio: the largest share one class may fill.
        ignore_index: mask value left out of the count.
    """

    def __init__(self, crop_size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.crop_size = int(crop_size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)

    def _accept(self, window: Tensor) -> bool:
        labels = window[window != self.ignore_index]
        counts = torch.unique(labels, return_counts=True)[1]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image(flat_inputs).shape[-2:]
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)

        def draw() -> tuple[int, int]:
            return int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))

        top, left = draw()
        mask = _mask(flat_inputs)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(CROP_TRIES):
                if self._accept(mask[..., top : top + ch, left : left + cw]):
                    break
                top, left = draw()
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.crop(inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's photometric distortion of the image (each step with probability 1/2; masks untouched).

    In order: brightness ``+ U(-32, 32) / 255``; contrast ``x U(0.5, 1.5)`` either here or last (a coin);
    saturation ``x U(0.5, 1.5)`` in HSV; hue ``+ U{-18..18}`` of mmseg's 180-step hue circle (a shift of
    up to 36 degrees). Every step clips to [0, 1]. Saturation and hue leave 1-channel images as they are.

    Args:
        brightness_delta: the brightness shift bound, in [0, 1] units.
        contrast_range: the contrast factor's range.
        saturation_range: the saturation factor's range.
        hue_delta: the hue shift bound in steps of 2 degrees (mmseg's OpenCV uint8 hue).
    """

    def __init__(
        self,
        brightness_delta: float = 32 / 255,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def coin() -> bool:
            return bool(torch.randint(0, 2, ()))

        d = self.brightness_delta
        return {
            "brightness": _uniform(-d, d) if coin() else None,
            "contrast_first": coin(),
            "contrast": _uniform(*self.contrast_range) if coin() else None,
            "saturation": _uniform(*self.saturation_range) if coin() else None,
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta + 1, ())) if coin() else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        img = inpt.as_subclass(Tensor)
        if params["brightness"] is not None:
            img = (img + params["brightness"]).clamp(0.0, 1.0)
        if params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp(0.0, 1.0)
        if img.shape[-3] == 3:
            if params["saturation"] is not None:
                img = _scale_saturation(img, params["saturation"])
            if params["hue"] is not None:
                img = TF.adjust_hue(img, params["hue"] / 180.0)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp(0.0, 1.0)
        return tv_tensors.wrap(img, like=inpt)


def _scale_saturation(img: Tensor, factor: float) -> Tensor:
    """Multiply the HSV saturation of (3, H, W) RGB in [0, 1] by ``factor`` (clipped to 1), keeping hue and value.

    Every channel is ``V - S V k(H)``, so scaling S moves each channel towards V: ``c' = V - (V - c) s'/s``.
    """
    v = img.amax(-3, keepdim=True)
    spread = v - img.amin(-3, keepdim=True)
    ratio = torch.where(spread > 0, torch.minimum(torch.full_like(v, factor), v / spread.clamp_min(1e-12)), 1.0)
    return (v - (v - img) * ratio).clamp(0.0, 1.0)


class PadTo(v2.Transform):
    """Pad bottom / right to ``size`` x ``size``: the image with ``fill`` (per channel), the mask with 255.

    Args:
        size: the minimum height and width.
        fill: the image's padding value, one per channel (the mean colour: 0 after normalisation).
        mask_fill: the mask's padding value.
    """

    def __init__(self, size: int, fill: Sequence[float], mask_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size = int(size)
        self.fill = [float(f) for f in fill]
        self.mask_fill = int(mask_fill)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image(flat_inputs).shape[-2:]
        return {"padding": [0, 0, max(0, self.size - w), max(0, self.size - h)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            return TF.pad(inpt, params["padding"], fill=self.mask_fill)
        return TF.pad(inpt, params["padding"], fill=self.fill)


def train_transform(
    crop_size: int,
    scale: Sequence[int],
    ratio_range: Sequence[float],
    cat_max_ratio: float,
    flip_prob: float,
    photometric: bool,
    fill: Sequence[float],
) -> v2.Compose:
    """The training pipeline: rescale, crop, flip, photometric distortion (when ``photometric``), pad."""
    steps: list[Callable[..., Any]] = [
        RandomRescale(scale, ratio_range),
        RandomCatCrop(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(PadTo(crop_size, fill))
    return v2.Compose(steps)


class PairSource(Protocol):
    """A segmentation dataset that decodes a sample without any transform."""

    num_classes: int
    classes: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Tensor, Tensor]: ...


class SegPipeline(Dataset[dict[str, Any]]):
    """A segmentation dataset under the recipe's training or test pipeline.

    Training: ``transform`` on ``(Image, Mask)``, its randomness a function of ``(seed, epoch, index)``
    only (torch's CPU generator and Python's ``random`` are seeded per sample and restored). Test: the image
    rescaled into ``scale`` (keep ratio), the mask as loaded (the original resolution).

    Args:
        source: the dataset (``load(i) -> (image (C, H, W) in [0, 1], mask (H, W) int64)``).
        transform: the training transform, or None for the test pipeline.
        scale: (long, short) edges of the test rescale (needed without ``transform``).
        seed: base seed of the training augmentation.
    """

    def __init__(
        self,
        source: PairSource,
        transform: Callable[..., Any] | None = None,
        scale: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        if transform is None and scale is None:
            raise ValueError("SegPipeline needs a training transform or a test scale")
        self.source = source
        self.transform = transform
        self.scale = tuple(scale) if scale is not None else None
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = source.num_classes
        self.classes = list(source.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the training augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns ``{"image": (C, h, w), "mask": (h', w') int64, "index"}`` (train: h = h' = w = w' = crop)."""
        index = check_index(index, len(self))
        image, mask = self.source.load(index)
        if self.transform is None:
            assert self.scale is not None
            size = list(rescale_size(image.shape[-2], image.shape[-1], self.scale))
            return {"image": TF.resize(image, size, antialias=True).clamp(0.0, 1.0), "mask": mask, "index": index}
        with seeded(self.seed, self.epoch, index):
            img, msk = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return {
            "image": img.as_subclass(Tensor).clamp(0.0, 1.0).contiguous(),
            "mask": msk.as_subclass(Tensor).contiguous(),
            "index": index,
        }
