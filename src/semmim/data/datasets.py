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
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from semmim.data.badfiles import DataError, ImageTooLargeError, bad_entry
from semmim.data.seeding import sample_seed, seeded
from semmim.data.transforms import transform_geometry
from semmim.registry import DATASETS

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMG_EXTENSIONS",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageTooLargeError",
    "SeededDataset",
    "SubsetDataset",
    "SyntheticDataset",
    "pil_to_tensor01",
    "sample_seed",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
"""File extensions :class:`ImageFolderDataset` reads (compared case-insensitively)."""

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
"""Largest image (width x height) decoded by default: 64 megapixels, e.g. 8000 x 8000, about 192 MB as RGB.
The largest ImageNet images have about 12 megapixels; larger files are treated as broken files
(``data.max_image_pixels``). Pillow's own ``Image.MAX_IMAGE_PIXELS`` (89 megapixels) still applies."""

Transform = Callable[[Any], torch.Tensor]
"""A PIL image (or, with ``decode="torchvision"``, a uint8 tensor (C, H, W)) -> tensor (C, H, W)."""
Decoded = Image.Image | torch.Tensor
"""What ``load`` returns as the image: a PIL image, or a uint8 tensor (C, H, W) with ``decode="torchvision"``."""
Sample = dict[str, Any]

_MODES = {1: "L", 3: "RGB"}


def image_mode_for(in_chans: int) -> str:
    """The PIL mode images are converted to for ``in_chans`` input channels: "L" (1) or "RGB" (3)."""
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


def apply_transform(transform: Transform | None, img: Decoded) -> torch.Tensor:
    """``transform(img)`` (a plain [0, 1] conversion when ``None``), checked to be a tensor."""
    if transform is None:
        out = img.float().div_(255.0) if isinstance(img, torch.Tensor) else pil_to_tensor01(img)
    else:
        out = transform(img)
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

    def load(self, index: int) -> tuple[Decoded, int]:
        """Decode sample ``index`` without augmentation.

        Returns:
            ``(image, label)``: a PIL image (a uint8 tensor (C, H, W) for file datasets with
            ``decode="torchvision"``) and an integer label (``-1`` when unlabelled).
        """
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        """Returns ``{"image": (C, H, W) float tensor in [0, 1], "label": int, "index": int}``."""
        index = check_index(index, len(self))
        img, label = self.load(index)
        return {"image": apply_transform(self.transform, img), "label": int(label), "index": index}


def check_index(index: int, n: int) -> int:
    """``index`` as a non-negative int (negative counts from the end); IndexError outside ``[-n, n)``."""
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
    """All regular image files under ``top`` (recursively, following symlinks), in sorted order.

    FIFOs, sockets and device files named like images are left out (``DirEntry.is_file`` follows
    symlinks and is true only for regular files), as are broken symlinks.
    """
    found: list[Path] = []
    seen: set[str] = set()
    stack = [str(top)]
    while stack:
        dirpath = stack.pop()
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: do not descend twice into the same directory
            continue
        seen.add(real)
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[str] = []
        for entry in entries:
            try:
                if entry.is_dir():
                    if not entry.name.startswith("."):
                        subdirs.append(entry.path)
                elif entry.is_file() and _is_image(entry.name):
                    found.append(Path(entry.path))
            except OSError:
                continue
        stack.extend(reversed(subdirs))  # depth first, in sorted order
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


def pixel_count(n: int) -> str:
    """``"4096 pixels"``, or ``"144 Mpx"`` from a million pixels on."""
    return f"{n} pixels" if n < 1_000_000 else f"{n / 1e6:.0f} Mpx"


_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""What ``PIL.ImageOps.exif_transpose`` does for each EXIF orientation."""


def _open_regular(path: str | os.PathLike[str]) -> Any:
    """Open ``path`` for reading only if it is a regular file; a FIFO or device is refused without blocking."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or directory"
            raise OSError(f"{os.fspath(path)} is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def decode_image(
    path: str | os.PathLike[str],
    mode: str = "RGB",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode an image file fully into memory as ``mode`` ("RGB" or "L"), upright.

    Handles CMYK, palette, grayscale, alpha and 16-bit images, and applies the EXIF orientation (as
    ``PIL.ImageOps.exif_transpose``). Only regular files are opened (a FIFO, socket or device named like
    an image raises ``OSError`` at once instead of blocking), and the size in the header is checked
    against ``max_pixels`` before anything is decoded.

    Args:
        path: the file.
        mode: "RGB" or "L".
        max_pixels: most width x height decoded; ``None`` = only Pillow's own ``Image.MAX_IMAGE_PIXELS``.
        exif_transpose: apply the EXIF orientation; ``False`` keeps the stored pixel layout (segmentation,
            whose annotation PNGs are drawn on the stored layout).

    Raises:
        ImageTooLargeError: the header announces more than ``max_pixels`` pixels.
        Exception: whatever PIL raises for a corrupt file (``OSError``, ``SyntaxError``,
            ``Image.DecompressionBombError``, ...).
    """
    with _open_regular(path) as f:
        return decode_image_file(f, mode, max_pixels, exif_transpose)


def decode_image_file(
    f: IO[bytes],
    mode: str = "RGB",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """:func:`decode_image` of an open binary file (e.g. a shard member's bytes in ``io.BytesIO``)."""
    with warnings.catch_warnings():
        if max_pixels is not None:  # our own budget, checked below, names the file and the key instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(f)
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} = {pixel_count(width * height)}, more than data.max_image_pixels={max_pixels} "
                "(a decompression bomb?)"
            )
        img.load()
        orientation = 1
        if exif_transpose:
            try:
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # unreadable EXIF: the pixels are still fine, keep them as stored
                orientation = 1
        out = _to_8bit(img)
        out = out.convert(mode) if out.mode != mode else out.copy()
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return out.transpose(transpose) if transpose is not None else out


FILE_DECODERS: dict[str, Callable[..., Decoded]] = {"pil": decode_image}
"""File decoders by ``data.decode`` value: ``f(path, mode, max_pixels=...) -> image``. ``torchvision`` is added
by :mod:`semmim.data.tensor_decode` (imported with :mod:`semmim.data`)."""


def file_decoder(decode: str) -> Callable[..., Decoded]:
    """The file decoder of ``decode`` ("pil" or "torchvision"); ``ValueError`` for another value."""
    if decode not in FILE_DECODERS:
        raise ValueError(f"decode must be one of {', '.join(FILE_DECODERS)}, got {decode!r}")
    return FILE_DECODERS[decode]


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path`` if it is a regular file (a FIFO, socket or device raises ``OSError`` at once)."""
    with _open_regular(path) as f:
        return f.read()


def _mix(index: int, attempt: int) -> int:
    """A well-mixed 63-bit number that depends only on ``(index, attempt)`` (stable across runs)."""
    digest = hashlib.blake2b(b"sub,%d,%d" % (int(index), int(attempt)), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_HASH_ATTEMPTS = 16
"""Pseudo-random substitutes tried for a broken file before a scan over the whole dataset."""


class SkipsBadFiles:
    """Decoding of image files listed in ``samples`` that skips broken files and names them.

    A broken file (corrupt, truncated, empty, not a regular file, larger than ``max_image_pixels``, a
    decompression bomb) is warned about once, remembered with its reason, and replaced by a substitute:
    the first decodable sample among pseudo-random candidates that depend only on the broken index (then a
    scan from a pseudo-random start), so different broken indices are served as different images, and the
    same index always gets the same substitute, in every run and worker (exact resume). Used by the file
    datasets (image folders, manifests).

    After each load, ``last_skipped`` is 1 and ``last_bad`` is ``"<path>: <reason>"`` when the *requested*
    index is a broken file (found now or known from before), else 0 and ``""``; broken files met while
    looking for a substitute are warned about and remembered but not reported there.
    :class:`SeededDataset` puts both in its items (``"skipped"``, ``"bad"``), and the trainer counts the
    distinct bad files of each epoch in the main process (:class:`semmim.data.badfiles.EpochBadFiles`) and
    stops the run when they are more than ``data.max_bad_fraction`` allows. A dataset never raises that error
    itself; it raises :class:`~semmim.data.badfiles.DataError` only when no file at all can be decoded.
    """

    samples: list[tuple[str, int]]
    bad_files: list[str]
    _bad_index: dict[int, str]
    max_bad_fraction: float
    mode: str
    last_skipped: int = 0
    last_bad: str = ""
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    epoch: int = 0
    decode: str = "pil"
    """``pil``: ``load`` returns PIL images; ``torchvision``: uint8 tensors (:mod:`semmim.data.tensor_decode`)."""
    decodes: tuple[str, ...] = ("pil", "torchvision")
    """The values of ``decode`` (``data.decode``) these datasets accept."""

    def _bad_total(self) -> int:
        """The number of files the tolerated fraction refers to."""
        return len(self.samples)

    def _source(self) -> str:
        """Where the files come from, for messages."""
        return str(getattr(self, "root", ""))

    @property
    def max_bad_files(self) -> int:
        """How many undecodable files ``max_bad_fraction`` tolerates among all the files."""
        return max(1, int(self.max_bad_fraction * self._bad_total()))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: DataLoader workers (fresh copies every epoch, without what the last ones learnt) name
        a broken file in a warning only in the first epoch; later epochs are summed up by the trainer's line."""
        self.epoch = int(epoch)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        path = self.samples[index][0]
        entry = bad_entry(path, err)
        self._bad_index[index] = entry
        self.bad_files.append(path)
        if self.epoch == 0 or get_worker_info() is None:  # the main process remembers, so it warns once anyway
            warnings.warn(f"skipping unreadable image {entry}", RuntimeWarning, stacklevel=4)

    def bad_entry_of(self, index: int) -> str:
        """``"<path>: <reason>"`` of sample ``index`` if it is known to be broken, else ``""``."""
        return self._bad_index.get(index, "")

    def _candidates(self, index: int) -> Iterator[int]:
        """The substitutes tried, in order, for a broken ``index`` (never ``index`` itself)."""
        n = len(self.samples)
        for attempt in range(_HASH_ATTEMPTS):
            j = _mix(index, attempt) % n
            if j != index:
                yield j
        start = _mix(index, _HASH_ATTEMPTS) % n
        for step in range(n):
            j = (start + step) % n
            if j != index:
                yield j

    def _try_decode(self, index: int) -> tuple[Decoded, int] | None:
        """Decode sample ``index``; ``None`` (after :meth:`_mark_bad`) if it is broken."""
        path, label = self.samples[index]
        try:
            return file_decoder(self.decode)(path, self.mode, max_pixels=self.max_image_pixels), label
        except Exception as err:  # PIL raises many types for corrupt data; all mean "bad file"
            self._mark_bad(index, err)
            return None

    def _none_decodable(self) -> DataError:
        shown = ", ".join(list(self._bad_index.values())[:3])
        return DataError(
            f"no image of {self._source()} could be decoded ({len(self._bad_index)} of {len(self.samples)} "
            f"tried, e.g. {shown})"
        )

    def served_index(self, index: int) -> int:
        """The sample served for ``index`` as far as is known: itself, or its first substitute not known broken."""
        if index not in self._bad_index:
            return index
        for j in self._candidates(index):
            if j not in self._bad_index:
                return j
        raise self._none_decodable()

    def decode_first_good(self, index: int) -> tuple[Decoded, int, int]:
        """Decode sample ``index`` or its substitute: ``(image, label, index served)``.

        Sets ``last_skipped`` and ``last_bad`` (see the class docstring).

        Raises:
            DataError: no sample can be decoded.
        """
        self.last_skipped, self.last_bad = 0, ""
        if index not in self._bad_index:
            got = self._try_decode(index)
            if got is not None:
                return got[0], got[1], index
        self.last_skipped, self.last_bad = 1, self._bad_index[index]  # reported by the item that asked for it
        for j in self._candidates(index):
            if j in self._bad_index:
                continue
            got = self._try_decode(j)  # a broken candidate is reported when its own index is requested
            if got is not None:
                return got[0], got[1], j
        raise self._none_decodable()


@DATASETS.register("imagefolder", help="Images in root/<class>/<img> (labelled) or a flat folder (unlabelled)")
class ImageFolderDataset(SkipsBadFiles, ImageDataset):
    """Images from a folder: ``root/<class>/<img>`` (labelled) or ``root/<img>`` (unlabelled).

    Class names are the sorted names of the subfolders of ``root`` that contain images; labels are
    their positions in that list. Subfolders are read recursively and symlinks are followed. The
    file order is sorted and therefore deterministic.

    Only regular files are listed (FIFOs, sockets and devices named like images are not). A file that
    fails to decode (corrupt, truncated, empty, no longer a regular file, more than ``max_image_pixels``
    pixels, a decompression bomb) is skipped: a warning names it (once), it is recorded in
    ``bad_files``, and a deterministic substitute that depends on the index is returned instead (see
    :class:`SkipsBadFiles`, also for how broken files are reported to the trainer, which applies
    ``max_bad_fraction`` per epoch). Images are turned upright by their EXIF orientation.

    Args:
        root: the folder.
        transform: callable on a PIL image returning a (C, H, W) tensor; ``None`` = plain conversion.
        labels: ``True`` requires class subfolders; ``False`` reads every image below ``root``
            with label ``-1``; ``None`` auto-detects (class subfolders if any contain images).
        max_bad_fraction: tolerated fraction of undecodable files per epoch (checked by the trainer).
        in_chans: 3 decodes to RGB, 1 to grayscale.
        max_image_pixels: larger images (width x height, read from the header before decoding) are broken
            files; ``None`` = only Pillow's limit.
        decode: "pil" (``load`` returns PIL images) or "torchvision" (uint8 tensors (C, H, W); pair it with
            :mod:`semmim.data.tensor_transforms`).

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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
    ) -> None:
        super().__init__(transform)
        file_decoder(decode)  # an unknown value fails here, not at the first load
        self.decode = decode
        path = Path(root).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"image folder not found: {path}")
        if not path.is_dir():
            raise NotADirectoryError(f"image folder root is not a directory: {path}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.root = str(path)
        self.mode = image_mode_for(in_chans)
        self.in_chans = in_chans
        self.max_bad_fraction = float(max_bad_fraction)
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1 or None, got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels

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
        self._bad_index: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Decoded, int]:
        """Decode sample ``index``, or its substitute if it is broken.

        Returns:
            ``(image, label)``: a PIL image in mode "RGB" (or "L"), or with ``decode="torchvision"`` a uint8
            tensor (C, H, W), and the class index or ``-1``.
        """
        image, label, _ = self.decode_first_good(check_index(index, len(self)))
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
    reads_files = False

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
        self.mode = image_mode_for(in_chans)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.classes = [f"class_{k}" for k in range(self.num_classes)]
        palette = np.random.default_rng([self.seed, 2**31 - 1]).integers(0, 256, (max(1, num_classes), in_chans))
        self._palette = palette.astype(np.float64)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Returns ``(image, label)``: a PIL image of size ``img_size`` and an int label."""
        index = check_index(index, self.size)
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

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset, if it has epochs."""
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(int(epoch))

    def load(self, index: int) -> tuple[Decoded, int]:
        return self.dataset.load(self.indices[check_index(index, len(self))])


def bad_of_last_load(dataset: Any) -> tuple[int, str]:
    """``(skipped, bad)`` of the innermost file dataset's last ``load`` (``(0, "")`` for other datasets)."""
    for _ in range(8):  # wrappers (subsets, captions) keep the file dataset in ``.dataset``
        if hasattr(dataset, "last_skipped"):
            return int(dataset.last_skipped), str(getattr(dataset, "last_bad", ""))
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            break
    return 0, ""


class SeededDataset(Dataset[Sample]):
    """Makes the augmentation of sample ``i`` in epoch ``e`` a function of ``(seed, e, i)`` only.

    ``__getitem__`` decodes with ``dataset.load(i)`` and applies the transform inside
    :func:`semmim.data.seeding.seeded` (torch's CPU generator, Python's ``random`` and NumPy's global
    generator seeded from ``(seed, epoch, i)``, restored afterwards), the primitive the WebDataset path
    shares. A sample therefore looks the same whichever worker or process loads it, and a resumed run
    sees the same augmentations. The cost is about 0.3 ms per sample.

    Call :meth:`set_epoch` before each epoch (in the main process; with ``persistent_workers=False``
    the workers get a fresh copy every epoch).

    Args:
        dataset: an :class:`ImageDataset` (anything with ``load(i) -> (PIL.Image, int)`` and ``len``).
        seed: base seed.
        transform: callable on a PIL image returning a (C, H, W) tensor; defaults to the dataset's
            own ``transform`` (and to a plain conversion when that is ``None``). Its randomness must
            come from torch, ``random`` or NumPy's global generator.

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
    ) -> None:
        if not hasattr(dataset, "load"):
            raise TypeError(f"SeededDataset needs a dataset with a load(i) method, got {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = int(seed)
        self.transform = transform if transform is not None else getattr(dataset, "transform", None)
        self.epoch = 0
        self.geometry = False
        """Items also carry their view's crop geometry (``"crop"``, ``"flip"``): set for a cached teacher."""
        self.extras: Callable[[int, torch.Tensor | None], dict[str, Any]] | None = None
        """More item fields by index and crop box (``None`` without :attr:`geometry`): a cached teacher's stored maps
        (``TeacherCache.item``), read in the workers."""
        self.crop_source: Callable[[int, Any], tuple[tuple[int, int, int, int], bool | None]] | None = None
        """With :attr:`geometry`: the crop of item ``index`` of image ``img`` in pixels (top, left, height, width)
        and its flip (``None``: drawn), drawn inside the item's seeded context, instead of the transform's own draws
        (``teacher.cache_crops=stored``: ``TeacherCache.stored_crop``)."""

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
        """Returns ``{"image": (C, H, W) float tensor in [0, 1], "label": int, "index": int, "skipped": int,
        "bad": str}``.

        ``"skipped"`` is 1 and ``"bad"`` is ``"<path>: <reason>"`` when the file of ``index`` is broken and the
        image is its substitute (see :class:`SkipsBadFiles`), else 0 and ``""``. When the wrapped dataset has
        ``caption(i) -> str``, the item also has ``"caption": str``. With :attr:`geometry` set, items also have
        ``"crop"`` (a FloatTensor ``(x0, y0, x1, y1)``: the crop box in the original image's normalised
        coordinates) and ``"flip"`` (bool), from a transform that reports them (the pretraining transforms); the
        image is the same as without.
        """
        index = check_index(index, len(self))
        img, label = self.dataset.load(index)
        geometry = None
        with seeded(self.seed, self.epoch, index):
            if self.geometry and self.transform is not None:
                box, flip = (None, None) if self.crop_source is None else self.crop_source(index, img)
                image, geometry = transform_geometry(self.transform, img, box, flip)
            else:
                image = apply_transform(self.transform, img)
        skipped, bad = bad_of_last_load(self.dataset)
        item: Sample = {"image": image, "label": int(label), "index": index, "skipped": skipped, "bad": bad}
        if self.geometry:
            if geometry is None:
                raise TypeError(
                    f"the transform {self.transform!r} does not report its crop geometry, which a cached teacher "
                    "(teacher.cache) needs: use the pretraining transform (random resized crop + flip)"
                )
            item["crop"] = torch.tensor(geometry.box, dtype=torch.float32)
            item["flip"] = bool(geometry.flip)
        if self.extras is not None:
            item.update(self.extras(index, item.get("crop")))
        caption = getattr(self.dataset, "caption", None)
        if callable(caption):
            item["caption"] = str(caption(index))
        return item
