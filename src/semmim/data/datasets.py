"""Image datasets with a two-step interface: ``load(i)`` decodes, ``transform`` augments.

Every dataset in semmim implements :class:`ImageDataset`:

* ``load(i) -> (PIL.Image, label)`` decodes sample ``i`` without any augmentation;
* ``transform`` (a callable on a PIL image, or ``None`` for a plain tensor conversion) augments it;
* ``ds[i]`` returns ``{"image": FloatTensor (C, H, W) in [0, 1], "label": int, "index": int}``.

Splitting decoding from augmentation lets :class:`SeededDataset` run the transform inside a
random scope seeded by ``(seed, epoch, index)``, so an augmentation depends only on those three
numbers and not on the worker, process or resume point that loads the sample. Images are *not*
normalised here; mean/std normalisation happens later, on the device.

Label ``-1`` marks an unlabelled sample.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semmim.registry import DATASETS

__all__ = [
    "IMG_EXTENSIONS",
    "ImageDataset",
    "ImageFolderDataset",
    "SeededDataset",
    "SubsetDataset",
    "SyntheticDataset",
    "pil_to_tensor01",
    "sample_seed",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
"""File extensions :class:`ImageFolderDataset` reads (compared case-insensitively)."""

Transform = Callable[[Image.Image], torch.Tensor]
Sample = dict[str, Any]

_MODES = {1: "L", 3: "RGB"}


def _mode_for(in_chans: int) -> str:
    if in_chans not in _MODES:
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    return _MODES[in_chans]


def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    """A PIL image -> float tensor in ``[0, 1]``.

    Args:
        img: an 8-bit PIL image ("L", "RGB", ...).

    Returns:
        Tensor of shape (C, H, W), dtype float32, values in ``[0, 1]``.
    """
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)


def _apply(transform: Transform | None, img: Image.Image) -> torch.Tensor:
    out = pil_to_tensor01(img) if transform is None else transform(img)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the transform must return a tensor (C, H, W), got {type(out).__name__}")
    return out


class ImageDataset(Dataset[Sample]):
    """Base class: subclasses implement ``__len__`` and ``load``; indexing applies ``transform``.

    Attributes:
        transform: callable on a PIL image returning a (C, H, W) tensor in ``[0, 1]``; ``None``
            means a plain conversion without augmentation.
        classes: class names (empty for unlabelled data).
        name: registry name, used by :func:`semmim.data.describe`.
        root: where the data lives (``None`` for generated data).
    """

    name: str = "dataset"

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform
        self.classes: list[str] = []
        self.root: str | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Decode sample ``index`` without augmentation.

        Returns:
            ``(image, label)``: a PIL image and an integer label (``-1`` when unlabelled).
        """
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        """Returns ``{"image": (C, H, W) float tensor in [0, 1], "label": int, "index": int}``."""
        index = _check_index(index, len(self))
        img, label = self.load(index)
        return {"image": _apply(self.transform, img), "label": int(label), "index": index}


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} samples")
    return index


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _walk_images(top: Path) -> list[Path]:
    """All image files under ``top`` (recursively, following symlinks), in sorted order."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: do not descend twice into the same directory
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def _list_images_flat(top: Path) -> list[Path]:
    return sorted(p for p in top.iterdir() if _is_image(p.name) and p.is_file())


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale high-bit-depth modes to 8 bits (PIL's ``convert`` would clip them instead)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            hi = 65535.0
        elif img.mode == "F":
            hi = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        else:  # 32-bit integer: PNG 16-bit data in older Pillow, or genuinely 8-bit values
            hi = 65535.0 if arr.size and float(arr.max()) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr)
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    return img


def decode_image(path: str | os.PathLike[str], mode: str = "RGB") -> Image.Image:
    """Decode an image file fully into memory as ``mode`` ("RGB" or "L").

    Handles CMYK, palette, grayscale, alpha and 16-bit images. Raises whatever PIL raises for a
    corrupt file (``OSError``, ``SyntaxError``, ``Image.DecompressionBombError``, ...).
    """
    with Image.open(path) as img:
        img.load()
        out = _to_8bit(img)
        return out.convert(mode) if out.mode != mode else out.copy()


class SkipsBadFiles:
    """Decoding of image files listed in ``samples`` that skips and counts broken files.

    A broken file is warned about once, remembered, and replaced by the next decodable sample; more
    than ``max_bad_files`` of them stop the run with a ``RuntimeError`` listing some. Used by the file
    datasets (image folders, manifests).
    """

    samples: list[tuple[str, int]]
    bad_files: list[str]
    _bad_index: set[int]
    max_bad_fraction: float
    mode: str
    last_skipped: int = 0

    def _bad_total(self) -> int:
        """The number of files the tolerated fraction refers to."""
        return len(self.samples)

    def _source(self) -> str:
        """Where the files come from, for messages."""
        return str(getattr(self, "root", ""))

    @property
    def max_bad_files(self) -> int:
        """How many undecodable files are tolerated before a ``RuntimeError``."""
        return max(1, int(self.max_bad_fraction * self._bad_total()))

    def _mark_bad(self, index: int, err: BaseException) -> None:
        path = self.samples[index][0]
        self._bad_index.add(index)
        self.bad_files.append(path)
        warnings.warn(f"skipping unreadable image {path}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=4)
        if len(self.bad_files) > self.max_bad_files:
            shown = ", ".join(self.bad_files[:5]) + (", ..." if len(self.bad_files) > 5 else "")
            raise RuntimeError(
                f"{len(self.bad_files)} of {self._bad_total()} images of {self._source()} are missing or failed to "
                f"decode, more than data.max_bad_fraction={self.max_bad_fraction} allows ({self.max_bad_files}): "
                f"{shown}"
            )

    def decode_first_good(self, index: int) -> tuple[Image.Image, int, int]:
        """Decode sample ``index`` or the next decodable one: ``(image, label, index served)``."""
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad_index:
                continue
            path, label = self.samples[j]
            try:
                image = decode_image(path, self.mode)
            except Exception as err:  # PIL raises many types for corrupt data; all mean "bad file"
                self._mark_bad(j, err)
                continue
            # broken files passed over to serve this index (known ones included): summed per epoch by the
            # trainer across workers and ranks, through the item's "skipped" field
            self.last_skipped = step
            return image, label, j
        raise RuntimeError(f"no image of {self._source()} could be decoded")


@DATASETS.register("imagefolder", help="Images in root/<class>/<img> (labelled) or a flat folder (unlabelled)")
class ImageFolderDataset(SkipsBadFiles, ImageDataset):
    """Images from a folder: ``root/<class>/<img>`` (labelled) or ``root/<img>`` (unlabelled).

    Class names are the sorted names of the subfolders of ``root`` that contain images; labels are
    their positions in that list. Subfolders are read recursively and symlinks are followed. The
    file order is sorted and therefore deterministic.

    A file that fails to decode (corrupt, truncated, empty, a decompression bomb) is skipped: a
    warning names it (once), it is recorded in ``bad_files``, and the next good sample (index + 1,
    + 2, ... wrapping around) is returned instead. Once more than ``max(1, max_bad_fraction *
    len(self))`` files have failed, a ``RuntimeError`` stops the run. Each DataLoader worker keeps
    its own count.

    Args:
        root: the folder.
        transform: callable on a PIL image returning a (C, H, W) tensor; ``None`` = plain conversion.
        labels: ``True`` requires class subfolders; ``False`` reads every image below ``root``
            with label ``-1``; ``None`` auto-detects (class subfolders if any contain images).
        max_bad_fraction: tolerated fraction of undecodable files.
        in_chans: 3 decodes to RGB, 1 to grayscale.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no images.
        NotADirectoryError: ``root`` is a file.
        ValueError: ``labels=True`` but ``root`` has no class subfolders.

    Examples:
        >>> ds = ImageFolderDataset("/data/imagenet/train")  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds[0]["label"]  # doctest: +SKIP
        (torch.Size([3, 500, 375]), 0)
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        labels: bool | None = None,
        max_bad_fraction: float = 0.01,
        in_chans: int = 3,
    ) -> None:
        super().__init__(transform)
        path = Path(root).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"image folder not found: {path}")
        if not path.is_dir():
            raise NotADirectoryError(f"image folder root is not a directory: {path}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.root = str(path)
        self.mode = _mode_for(in_chans)
        self.in_chans = in_chans
        self.max_bad_fraction = float(max_bad_fraction)

        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = [(d.name, _walk_images(d)) for d in subdirs]
        per_class = [(c, files) for c, files in per_class if files]
        if labels is None:
            labels = bool(per_class)
        samples: list[tuple[str, int]]
        if labels:
            if not per_class:
                raise ValueError(
                    f"labels=True but {path} has no class subfolders with images; expected the layout "
                    f"root/<class>/<image>. Pass labels=None or False to read a flat folder without labels."
                )
            self.classes = [c for c, _ in per_class]
            samples = [(str(f), k) for k, (_, files) in enumerate(per_class) for f in files]
            flat = _list_images_flat(path)
            if flat:
                warnings.warn(
                    f"{path}: ignoring {len(flat)} image(s) directly in root (e.g. {flat[0].name}); "
                    f"with class subfolders only root/<class>/<image> files are read",
                    stacklevel=2,
                )
        else:
            files = _walk_images(path)  # no class subfolders with images: the same as a flat listing
            samples = [(str(f), -1) for f in files]
        if not samples:
            raise FileNotFoundError(
                f"no images found in {path} (looked for files ending in {', '.join(IMG_EXTENSIONS)}, "
                f"any case, directly in the folder or in class subfolders)"
            )
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.bad_files: list[str] = []
        self._bad_index: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Decode sample ``index``, or the next decodable one if it is broken.

        Returns:
            ``(image, label)``: a PIL image in mode "RGB" (or "L") and the class index or ``-1``.
        """
        image, label, _ = self.decode_first_good(_check_index(index, len(self)))
        return image, label


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


@DATASETS.register("synthetic", help="Deterministic random images and labels (tests and benchmarks)")
class SyntheticDataset(ImageDataset):
    """Deterministic random images: sample ``i`` depends only on ``(seed, i)``.

    Each image is a class-dependent colour plus uniform noise, so a probe can learn something.

    Args:
        size: number of samples.
        img_size: image height and width.
        in_chans: 1 or 3.
        num_classes: labels are drawn from ``0 .. num_classes - 1``; 0 gives unlabelled data (-1).
        seed: base seed.
        transform: callable on a PIL image; ``None`` = plain conversion to a (C, H, W) tensor.
    """

    name = "synthetic"

    def __init__(
        self,
        size: int = 1024,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        if size < 0 or img_size < 1 or num_classes < 0:
            raise ValueError(f"bad synthetic dataset: size={size}, img_size={img_size}, num_classes={num_classes}")
        self.size = int(size)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.mode = _mode_for(in_chans)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.classes = [f"class_{k}" for k in range(self.num_classes)]
        palette = np.random.default_rng([self.seed, 2**31 - 1]).integers(0, 256, (max(1, num_classes), in_chans))
        self._palette = palette.astype(np.float64)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Returns ``(image, label)``: a PIL image of size ``img_size`` and an int label."""
        index = _check_index(index, self.size)
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes)) if self.num_classes else -1
        base = self._palette[max(label, 0)]
        noise = rng.uniform(-96.0, 96.0, (self.img_size, self.img_size, self.in_chans))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr[:, :, 0] if self.in_chans == 1 else arr)
        return img, label


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


class SubsetDataset(ImageDataset):
    """The samples ``indices`` of another dataset, keeping ``load``, ``classes`` and ``root``.

    Args:
        dataset: the dataset to view.
        indices: positions in ``dataset``.
        transform: defaults to ``dataset.transform``.
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], transform: Transform | None = None) -> None:
        super().__init__(transform if transform is not None else dataset.transform)
        self.dataset = dataset
        self.indices = list(indices)
        self.classes = list(getattr(dataset, "classes", []))
        self.root = getattr(dataset, "root", None)
        self.name = getattr(dataset, "name", "dataset")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.dataset.load(self.indices[_check_index(index, len(self))])


def _skipped_by(dataset: Any) -> int:
    """Broken files the innermost file dataset passed over for its last ``load`` (0 for other datasets)."""
    for _ in range(8):  # wrappers (subsets, captions) keep the file dataset in ``.dataset``
        if hasattr(dataset, "last_skipped"):
            return int(dataset.last_skipped)
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            break
    return 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, epoch, index)`` (stable across runs)."""
    digest = hashlib.blake2b(b"%d,%d,%d" % (int(seed), int(epoch), int(index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededDataset(Dataset[Sample]):
    """Makes the augmentation of sample ``i`` in epoch ``e`` a function of ``(seed, e, i)`` only.

    ``__getitem__`` decodes with ``dataset.load(i)`` and applies the transform after seeding torch's
    CPU generator and Python's ``random`` (and, with ``seed_numpy=True``, NumPy's global generator)
    from :func:`sample_seed`; the states are restored afterwards, so the caller's RNG is untouched. A
    sample therefore looks the same whichever worker or process loads it, and a resumed run sees the
    same augmentations. The cost is about 0.1 ms per sample (0.2 ms more with ``seed_numpy``).

    Call :meth:`set_epoch` before each epoch (in the main process; with ``persistent_workers=False``
    the workers get a fresh copy every epoch).

    Args:
        dataset: an :class:`ImageDataset` (anything with ``load(i) -> (PIL.Image, int)`` and ``len``).
        seed: base seed.
        transform: callable on a PIL image returning a (C, H, W) tensor; defaults to the dataset's
            own ``transform`` (and to a plain conversion when that is ``None``). Its randomness must
            come from torch or ``random`` (or NumPy's global generator with ``seed_numpy=True``).
        seed_numpy: also seed (and restore) NumPy's legacy global generator.

    Examples:
        >>> ds = SeededDataset(SyntheticDataset(8, img_size=16), seed=0)
        >>> ds[3]["image"].shape
        torch.Size([3, 16, 16])
    """

    def __init__(
        self,
        dataset: ImageDataset,
        seed: int = 0,
        transform: Transform | None = None,
        *,
        seed_numpy: bool = False,
    ) -> None:
        if not hasattr(dataset, "load"):
            raise TypeError(f"SeededDataset needs a dataset with a load(i) method, got {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = int(seed)
        self.transform = transform if transform is not None else getattr(dataset, "transform", None)
        self.seed_numpy = bool(seed_numpy)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (also forwarded to the wrapped dataset when it has ``set_epoch``)."""
        self.epoch = int(epoch)
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(self.epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.dataset, "classes", []))

    def __getitem__(self, index: int) -> Sample:
        """Returns ``{"image": (C, H, W) float tensor in [0, 1], "label": int, "index": int}``.

        When the wrapped dataset has ``caption(i) -> str``, the item also has ``"caption": str``.
        """
        index = _check_index(index, len(self))
        img, label = self.dataset.load(index)
        s = sample_seed(self.seed, self.epoch, index)
        py_state = random.getstate()
        np_state = np.random.get_state(legacy=False) if self.seed_numpy else None
        with torch.random.fork_rng(devices=[]):
            # Seed only the CPU generator: torch.manual_seed would also reseed CUDA generators,
            # which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(s)
            random.seed(s)
            if np_state is not None:
                np.random.seed(s & 0xFFFFFFFF)
            try:
                image = _apply(self.transform, img)
            finally:
                random.setstate(py_state)
                if np_state is not None:
                    np.random.set_state(np_state)
        item: Sample = {"image": image, "label": int(label), "index": index, "skipped": _skipped_by(self.dataset)}
        caption = getattr(self.dataset, "caption", None)
        if callable(caption):
            item["caption"] = str(caption(index))
        return item
