"""Fashion-MNIST read straight from its idx files (``.gz`` or raw) with NumPy.

The files are looked up, in order, in:

1. ``root`` (both ``root/*-ubyte.gz`` and torchvision's ``root/FashionMNIST/raw/`` layout);
2. the directory in the environment variable ``SEMMIM_FASHION_MNIST``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).

With ``download=True`` and no files found, torchvision downloads them into ``root``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from semmim.data.datasets import ImageDataset, Transform, check_index, image_mode_for
from semmim.registry import DATASETS

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNIST", "find_fashion_mnist", "read_idx"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "SEMMIM_FASHION_MNIST"
SYSTEM_DIRS: list[str] = ["/usr/share/datasets/fashion-mnist"]
"""System-wide locations searched after ``root`` and ``$SEMMIM_FASHION_MNIST``."""
DEFAULT_DOWNLOAD_ROOT = "~/.cache/semmim/fashion_mnist"

_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "t10k": "test"}

# idx type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


class IdxFormatError(ValueError):
    """An idx file is truncated or not in the idx format."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a read-only NumPy array.

    The idx header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions
    ``ndim``, then ``ndim`` big-endian uint32 sizes, followed by the data in C order.

    Args:
        path: a ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        Array of shape ``dims`` (e.g. (60000, 28, 28) for images, (60000,) for labels), in native
        byte order.

    Raises:
        IdxFormatError: bad magic number, unknown type, or fewer/more bytes than the header says.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        raw = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise IdxFormatError(f"{p}: cannot decompress ({err}); the file is truncated or corrupt, delete it") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{p}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(f"{p}: unknown idx data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{p}: truncated idx header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{p}: the header says {dims} values of type {dtype.str} ({expected} bytes) but the file has "
            f"{len(raw) - header} data bytes; the file is truncated or corrupt, delete it and fetch it again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    arr.flags.writeable = False
    _CACHE[key] = arr
    return arr


def _files_in(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = f"{prefix}-{kind}-ubyte"
        hit = next((folder / n for n in (stem + ".gz", stem) if (folder / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:  # a root the user names is the only place looked in: never silently another copy
        r = Path(root).expanduser()
        return [r, r / "FashionMNIST" / "raw", r / "fashion-mnist", r / "fashion_mnist"]
    env = os.environ.get(ENV_VAR)
    if env:
        e = Path(env).expanduser()
        dirs += [e, e / "FashionMNIST" / "raw"]
    dirs += [Path(d) for d in SYSTEM_DIRS]
    return dirs


def find_fashion_mnist(root: str | os.PathLike[str] | None, split: str) -> tuple[Path, Path] | None:
    """The ``(images, labels)`` files of ``split`` ("train" | "test"), or ``None`` if not found."""
    for folder in _candidates(root):
        hit = _files_in(folder, split)
        if hit is not None:
            return hit
    return None


def _not_found(root: str | os.PathLike[str] | None, split: str) -> FileNotFoundError:
    looked = "\n".join(f"  - {d}" for d in _candidates(root))
    prefix = _PREFIX[split]
    return FileNotFoundError(
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
        f"not found. Looked in:\n{looked}\n"
        f"Fix it with one of:\n"
        f"  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)\n"
        f"  - data.download=true   (downloads with torchvision into data.root)\n"
        f"  - data.root=DIR or {ENV_VAR}=DIR pointing at a folder holding the idx files"
    )


@DATASETS.register("fashion_mnist", help="Fashion-MNIST 28x28 grayscale from idx files (Debian package or download)")
class FashionMNIST(ImageDataset):
    """Fashion-MNIST: 60,000 train / 10,000 test grayscale 28x28 images in 10 classes.

    The uint8 images stay in memory (47 MB for the train split).

    Args:
        root: folder with the idx files (see the module docstring for the search order).
        split: "train" or "test" ("val" is an alias of "test").
        transform: callable on a PIL image ("L", or "RGB" when ``in_chans=3``) returning a
            (C, H, W) tensor; ``None`` = plain conversion to (in_chans, 28, 28).
        in_chans: 1 (grayscale) or 3 (gray replicated to RGB).
        download: fetch the files with torchvision into ``root`` when they are not found.

    Attributes:
        classes: the 10 class names.
        targets: labels, np.ndarray (N,) int64.
        data: images, np.ndarray (N, 28, 28) uint8.

    Raises:
        FileNotFoundError: no files found and ``download`` is false (the message says how to fix it).
        IdxFormatError: a file is truncated or corrupt.
    """

    name = "fashion_mnist"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        transform: Transform | None = None,
        in_chans: int = 1,
        download: bool = False,
    ) -> None:
        super().__init__(transform)
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got '{split}'")
        self.split = _SPLIT_ALIASES[split]
        self.mode = image_mode_for(in_chans)
        self.in_chans = in_chans
        files = find_fashion_mnist(root, self.split)
        if files is None and download:
            target = Path(root if root is not None else DEFAULT_DOWNLOAD_ROOT).expanduser()
            self._download(target)
            files = _files_in(target / "FashionMNIST" / "raw", self.split)
        if files is None:
            raise _not_found(root, self.split)
        images_file, labels_file = files
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxFormatError(f"{images_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise IdxFormatError(
                f"{labels_file}: expected {len(images)} labels to match {images_file}, got shape {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise IdxFormatError(f"{labels_file}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        self.data = images
        self.targets = labels.astype(np.int64)
        self.classes = list(FASHION_MNIST_CLASSES)
        self.root = str(images_file.parent)
        self.files = (str(images_file), str(labels_file))

    @staticmethod
    def _download(target: Path) -> None:
        from torchvision.datasets import FashionMNIST as TVFashionMNIST

        target.mkdir(parents=True, exist_ok=True)
        try:
            TVFashionMNIST(str(target), train=True, download=True)
            TVFashionMNIST(str(target), train=False, download=True)
        except Exception as err:
            raise RuntimeError(
                f"downloading Fashion-MNIST into {target} failed ({type(err).__name__}: {err}). Without "
                f"internet, install the Debian package: sudo apt-get install dataset-fashion-mnist"
            ) from err

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Returns ``(image, label)``: a 28x28 PIL image ("L" or "RGB") and the class index."""
        index = check_index(index, len(self))
        img = Image.fromarray(np.ascontiguousarray(self.data[index]))
        if self.mode != "L":
            img = img.convert(self.mode)
        return img, int(self.targets[index])
