"""Semantic segmentation datasets for the ``seg`` evaluation protocol.

Items are ``{"image": FloatTensor (C, H, W) in [0, 1], "mask": LongTensor (H, W), "index": int}``;
mask values are class ids in ``0 .. num_classes - 1`` or :data:`IGNORE_INDEX` (255) for pixels that
must not count (unlabelled / "other"). Images are not normalised here.

* :class:`FashionMNISTSeg`: a segmentation task derived from real Fashion-MNIST images: a pixel is
  background (class 0) when its intensity is at most ``threshold``, else ``1 + item class`` (11 classes).
* :class:`ADE20KSeg`: ADE20K (SceneParsing, ``ADEChallengeData2016``), 150 classes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from semmim.data.datasets import check_index, decode_image, image_mode_for, pil_to_tensor01, sample_seed
from semmim.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "SEG_DATASETS",
    "ADE20KSeg",
    "FashionMNISTSeg",
    "build_seg_dataset",
    "seg_source",
]

IGNORE_INDEX = 255
"""Mask value of pixels left out of the loss and the metrics."""

SEG_DATASETS = ("fashion_mnist", "ade20k")
"""Names :func:`build_seg_dataset` accepts."""

FASHION_MNIST_SIZE = 28
"""Height and width of a Fashion-MNIST image."""

SegSample = dict[str, Any]

# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
"""The 150 ADE20K SceneParsing classes (annotation values 1..150)."""
# fmt: on


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an image bilinearly and its mask with nearest neighbours to the same ``size``.

    Args:
        image: (C, H, W) float.
        mask: (H, W) int64.
        size: (out_h, out_w).

    Returns:
        (C, out_h, out_w) float image, (out_h, out_w) int64 mask.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    img = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    msk = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return img.clamp_(0.0, 1.0), msk


class FashionMNISTSeg(Dataset[SegSample]):
    """Foreground segmentation of Fashion-MNIST: which pixels show which item.

    The mask is computed on the original 28x28 image: class 0 (background) where the intensity
    (in [0, 1]) is ``<= threshold``, else ``1 + label`` (the item's class). The image is then resized
    bilinearly and the mask with nearest neighbours to ``img_size``. A mask therefore holds 0 and one
    foreground class; the task is to find the object *and* recognise it per pixel.

    Args:
        root: folder with the idx files (see :mod:`semmim.data.fashion_mnist` for the search order).
        split: "train" or "test".
        img_size: output height and width.
        in_chans: 1 (grayscale) or 3 (gray replicated).
        threshold: intensity in [0, 1] at or below which a pixel is background.
        limit: keep the first ``limit`` images.

    Attributes:
        classes: ``["background", *FASHION_MNIST_CLASSES]`` (11 names).
        num_classes: 11.
    """

    name = "fashion_mnist"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        img_size: int = 28,
        in_chans: int = 1,
        threshold: float = 0.1,
        limit: int | None = None,
    ) -> None:
        image_mode_for(in_chans)
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        self.base = FashionMNIST(root=root, split=split, in_chans=1)
        self.split = self.base.split
        self.root = self.base.root
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.threshold = float(threshold)
        n = len(self.base)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            n = min(n, int(limit))
        self._len = n
        self.classes = ["background", *FASHION_MNIST_CLASSES]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self._len

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index`` at ``img_size``: image (in_chans, S, S) in [0, 1], mask (S, S) int64 in {0, 1 + label}."""
        index = check_index(index, len(self))
        gray = torch.from_numpy(np.array(self.base.data[index], dtype=np.float32)) / 255.0  # (28, 28)
        label = int(self.base.targets[index])
        mask = torch.where(gray > self.threshold, 1 + label, 0).long()
        image, mask = _resize_pair(gray[None], mask, (self.img_size, self.img_size))
        if self.in_chans == 3:
            image = image.expand(3, -1, -1).contiguous()
        return image, mask

    def __getitem__(self, index: int) -> SegSample:
        """Returns ``{"image": (in_chans, S, S) in [0, 1], "mask": (S, S) int64 in {0, 1 + label}, "index"}``."""
        image, mask = self.load(index)
        return {"image": image, "mask": mask, "index": check_index(index, len(self))}


def _read_label_png(path: Path) -> np.ndarray:
    """A label map (H, W) uint8 from a single-channel PNG ("L" or palette "P" indices)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"expected a single-channel label image, got mode {img.mode}")
            arr = np.array(img)
    except Exception as err:
        raise ValueError(f"cannot read the annotation {path}: {type(err).__name__}: {err}") from err
    if arr.ndim != 2:
        raise ValueError(f"cannot read the annotation {path}: expected (H, W) labels, got shape {arr.shape}")
    if arr.size and int(arr.max()) > 255:
        raise ValueError(f"annotation {path} has label values above 255")
    return arr.astype(np.uint8)


class ADE20KSeg(Dataset[SegSample]):
    """ADE20K SceneParsing in the ``ADEChallengeData2016`` layout.

    ``root/images/{training,validation}/*.jpg`` with ``root/annotations/{training,validation}/<same stem>.png``
    (values 0 = other / unlabelled, 1..150 = classes). With ``reduce_zero_label`` (the standard setting)
    0 becomes 255 (ignored) and every other label is shifted down by one, giving 150 classes.

    Transforms (the same geometry for image and mask; bilinear for the image, nearest for the mask):

    * ``train=True``: resize so the short side is ``img_size * s`` with ``s ~ U(0.5, 2.0)``, random
      ``img_size`` crop (padded with 0 / 255 where the image is smaller), horizontal flip with p = 0.5. The
      randomness of sample ``i`` depends only on ``(seed, epoch, i)`` (see :meth:`set_epoch`).
    * ``train=False``: resize the short side to ``img_size``, centre crop ``img_size`` x ``img_size``.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: "training" or "validation" ("train" / "test" / "val" are accepted as aliases).
        img_size: output height and width.
        in_chans: 3 (RGB) or 1 (grayscale).
        reduce_zero_label: map 0 -> 255 and k -> k - 1 (150 classes); else keep 0..150 (151 classes).
        train: random scale / crop / flip instead of the deterministic resize + centre crop.
        seed: base seed of the training augmentation.
        limit: keep the first ``limit`` images (sorted by file name).

    Raises:
        FileNotFoundError: a missing image / annotation folder, no images, or an image without annotation.
        ValueError (at indexing): an image or annotation that cannot be decoded (the message names the file).
    """

    name = "ade20k"

    _ALIASES: ClassVar[dict[str, str]] = {
        "training": "training",
        "train": "training",
        "validation": "validation",
        "val": "validation",
        "test": "validation",
    }

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "training",
        img_size: int = 512,
        in_chans: int = 3,
        reduce_zero_label: bool = True,
        train: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        if split not in self._ALIASES:
            raise ValueError(f"ADE20K split must be 'training' or 'validation', got '{split}'")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.mode = image_mode_for(in_chans)
        self.split = self._ALIASES[split]
        base = Path(root).expanduser()
        self.root = str(base)
        image_dir = base / "images" / self.split
        ann_dir = base / "annotations" / self.split
        for folder in (image_dir, ann_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"ADE20K folder not found: {folder} (expected the ADEChallengeData2016 layout "
                    f"root/images/{{training,validation}}/*.jpg and root/annotations/{{training,validation}}/*.png)"
                )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
        if not images:
            raise FileNotFoundError(f"no images (*.jpg) found in {image_dir}")
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            images = images[: int(limit)]
        samples: list[tuple[str, str]] = []
        for img in images:
            ann = ann_dir / f"{img.stem}.png"
            if not ann.is_file():
                raise FileNotFoundError(f"ADE20K annotation missing for {img}: expected {ann}")
            samples.append((str(img), str(ann)))
        self.samples = samples
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = list(ADE20K_CLASSES) if self.reduce_zero_label else ["other", *ADE20K_CLASSES]
        self.num_classes = len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the training augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode sample ``index`` without any transform.

        Returns:
            image (C, H, W) float in [0, 1], mask (H, W) int64 (after ``reduce_zero_label``).
        """
        index = check_index(index, len(self))
        img_path, ann_path = self.samples[index]
        try:
            img = decode_image(img_path, self.mode, exif_transpose=False)  # annotations use the stored layout
        except Exception as err:  # PIL raises many types for corrupt data
            raise ValueError(f"cannot decode the image {img_path}: {type(err).__name__}: {err}") from err
        labels = _read_label_png(Path(ann_path))
        if (labels.shape[0], labels.shape[1]) != (img.height, img.width):
            raise ValueError(
                f"annotation {ann_path} is {labels.shape[1]}x{labels.shape[0]} but the image {img_path} is "
                f"{img.width}x{img.height}"
            )
        mask = torch.from_numpy(labels.astype(np.int64))
        if self.reduce_zero_label:
            mask = torch.where(mask == 0, IGNORE_INDEX, mask - 1)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX  # an original 255 stays ignored
        return pil_to_tensor01(img), mask

    def __getitem__(self, index: int) -> SegSample:
        """Returns ``{"image": (C, S, S) in [0, 1], "mask": (S, S) int64, "index": int}``, S = ``img_size``."""
        index = check_index(index, len(self))
        image, mask = self.load(index)
        if self.train:
            image, mask = self._train_transform(image, mask, random.Random(sample_seed(self.seed, self.epoch, index)))
        else:
            image, mask = self._eval_transform(image, mask)
        return {"image": image, "mask": mask, "index": index}

    def _scaled(self, image: torch.Tensor, mask: torch.Tensor, short: float) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        scale = short / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return _resize_pair(image, mask, size)

    def _eval_transform(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.img_size
        image, mask = self._scaled(image, mask, s)
        h, w = image.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        return image[:, top : top + s, left : left + s].contiguous(), mask[top : top + s, left : left + s].contiguous()

    def _train_transform(
        self, image: torch.Tensor, mask: torch.Tensor, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.img_size
        image, mask = self._scaled(image, mask, s * rng.uniform(0.5, 2.0))
        h, w = image.shape[-2:]
        if h < s or w < s:  # pad bottom / right: zeros for the image, ignore for the mask
            ph, pw = max(0, s - h), max(0, s - w)
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = image.shape[-2:]
        top, left = rng.randint(0, h - s), rng.randint(0, w - s)
        image, mask = image[:, top : top + s, left : left + s], mask[top : top + s, left : left + s]
        if rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def seg_source(
    name: str, root: str | os.PathLike[str] | None, split: str, in_chans: int, limit: int | None = None
) -> FashionMNISTSeg | ADE20KSeg:
    """A segmentation dataset whose ``load(i)`` gives a sample untransformed, at its own size.

    Fashion-MNIST at its native :data:`FASHION_MNIST_SIZE`; ADE20K as stored (``reduce_zero_label``).
    The fine-tuned recipe (:class:`semmim.data.seg_transforms.SegPipeline`) transforms these.
    """
    if name == "fashion_mnist":
        return FashionMNISTSeg(root=root, split=split, img_size=FASHION_MNIST_SIZE, in_chans=in_chans, limit=limit)
    if name == "ade20k":
        if root is None:
            raise ValueError("ADE20K needs root: the ADEChallengeData2016 folder (images/ and annotations/)")
        return ADE20KSeg(root, split=split, in_chans=in_chans, limit=limit)
    raise ValueError(f"unknown segmentation dataset '{name}'; choose one of {', '.join(SEG_DATASETS)}")


def build_seg_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    img_size: int = 224,
    in_chans: int = 3,
    limit: int | None = None,
    train: bool = False,
    seed: int = 0,
) -> FashionMNISTSeg | ADE20KSeg:
    """A segmentation dataset by name.

    Args:
        name: "fashion_mnist" or "ade20k".
        root: data folder (optional for Fashion-MNIST, the ``ADEChallengeData2016`` folder for ADE20K).
        split: "train" or "test" ("training" / "validation" for ADE20K; "train" / "test" map to them).
        img_size: output height and width.
        in_chans: 1 or 3.
        limit: keep the first ``limit`` images.
        train: training augmentation (ADE20K only; Fashion-MNIST is deterministic).
        seed: seed of the training augmentation.

    Returns:
        A dataset with ``num_classes`` and ``classes``; items ``{"image", "mask", "index"}``.
    """
    if name == "fashion_mnist":
        return FashionMNISTSeg(root=root, split=split, img_size=img_size, in_chans=in_chans, limit=limit)
    if name == "ade20k":
        if root is None:
            raise ValueError("ADE20K needs root: the ADEChallengeData2016 folder (images/ and annotations/)")
        return ADE20KSeg(root, split=split, img_size=img_size, in_chans=in_chans, train=train, seed=seed, limit=limit)
    raise ValueError(f"unknown segmentation dataset '{name}'; choose one of {', '.join(SEG_DATASETS)}")
