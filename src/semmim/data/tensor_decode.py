"""Decoding image files straight into uint8 tensors with ``torchvision.io`` (``data.decode=torchvision``).

The PIL path (:func:`semmim.data.datasets.decode_image`) decodes into a PIL image that the transform then
crops, resizes and converts. This path decodes JPEG with libjpeg-turbo through
:func:`torchvision.io.decode_jpeg` (PNG, WebP and GIF through :func:`torchvision.io.decode_image`) into a
``(C, H, W)`` uint8 tensor, and the transforms of :mod:`semmim.data.tensor_transforms` work on that tensor,
so no PIL image and no float image is made on the CPU.

It keeps the guarantees of the PIL path:

* the size in the file's header is read (PIL's lazy ``Image.open``, about 50 µs) and checked against
  ``max_pixels`` *before* anything is decoded: a larger image raises the same
  :class:`~semmim.data.datasets.ImageTooLargeError`;
* a corrupt, truncated or empty file raises, so the datasets' bad-file path skips and counts it as it does
  for PIL;
* the EXIF orientation is applied (``apply_exif_orientation``) and grayscale, palette, alpha and CMYK
  images come out with the run's channels (``ImageReadMode.RGB`` / ``GRAY``; one channel of a colour image is
  PIL's luma of its RGB pixels, as ``convert("L")`` computes it); 16-bit PNGs are scaled to
  8 bits as the PIL path scales them;
* formats torchvision does not decode (BMP, TIFF) go through PIL and are converted to the same tensor.

Note: torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; the warning is silenced
here, and this module is the one place to change when they move.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO

import numpy as np
import torch
from PIL import Image

from semmim.data.datasets import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FILE_DECODERS,
    ImageTooLargeError,
    decode_image_file,
    pixel_count,
    read_regular_file,
)

__all__ = ["DECODES", "decode_conflict", "decode_image_bytes", "decode_image_tensor", "pil_to_uint8"]

DECODES: tuple[str, ...] = ("pil", "torchvision")
"""Values of ``data.decode``: ``pil`` (the default) or ``torchvision`` (uint8 tensors)."""

_TORCHVISION_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF")
"""PIL format names whose files torchvision decodes (MPO: multi-picture JPEGs from cameras, first frame)."""


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image ("L" or "RGB") -> uint8 tensor (C, H, W)."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A decoded tensor -> uint8: 16-bit data scaled by 255 / 65535 and rounded, as the PIL path does."""
    if x.dtype == torch.uint8:
        return x
    scaled = x.to(torch.float32).mul_(255.0 / 65535.0).round_()
    return scaled.clamp_(0, 255).to(torch.uint8)


_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "YCbCr", "P", "PA")
"""PIL modes of colour images: their grey version is PIL's luma of the RGB pixels (see :func:`_luma`)."""


def _check_header(data: bytes, max_pixels: int | None) -> tuple[str, str]:
    """The file's format and PIL mode from its header; raises before any decoding if it announces more than
    ``max_pixels``."""
    with warnings.catch_warnings():
        if max_pixels is not None:  # our own budget, checked below, names the key instead (as the PIL path does)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    with img:
        width, height = img.size
        fmt, pil_mode = str(img.format), str(img.mode)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{width}x{height} = {pixel_count(width * height)}, more than data.max_image_pixels={max_pixels} "
            "(a decompression bomb?)"
        )
    return fmt, pil_mode


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> (1, H, W) with PIL's ``convert("L")`` arithmetic (ITU-R 601-2 luma, fixed point).

    libjpeg's and libpng's own grey outputs differ from it (the JPEG's stored Y before the RGB clamp; other
    weights), by up to about 20/255 on saturated colours.
    """
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def decode_image_bytes(
    data: bytes,
    mode: str = "RGB",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
) -> torch.Tensor:
    """Decode an encoded image into a uint8 tensor (C, H, W), upright, with ``mode``'s channels.

    Args:
        data: the file's bytes.
        mode: "RGB" (C = 3) or "L" (C = 1).
        max_pixels: most width x height decoded (checked on the header first); ``None`` = Pillow's limit only.
        exif_transpose: apply the EXIF orientation.

    Returns:
        uint8 tensor (C, H, W).

    Raises:
        ImageTooLargeError: the header announces more than ``max_pixels`` pixels.
        Exception: what PIL or torchvision raise for a corrupt file (``RuntimeError``, ``OSError``, ...).
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    fmt, pil_mode = _check_header(data, max_pixels)
    if fmt not in _TORCHVISION_FORMATS:
        return pil_to_uint8(decode_image_file(io.BytesIO(data), mode, max_pixels, exif_transpose))
    grey_of_colour = mode == "L" and pil_mode in _COLOUR_MODES  # decode RGB, then PIL's luma
    read_mode = ImageReadMode.RGB if mode == "RGB" or grey_of_colour else ImageReadMode.GRAY
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
        if fmt in ("JPEG", "MPO"):
            out = decode_jpeg(encoded, mode=read_mode, apply_exif_orientation=exif_transpose)
        else:
            out = decode_image(encoded, mode=read_mode, apply_exif_orientation=exif_transpose)
    assert isinstance(out, torch.Tensor)
    if grey_of_colour and out.shape[0] == 3:
        return _luma(_to_uint8(out))
    if out.shape[0] != (3 if mode == "RGB" else 1):  # e.g. WebP ignores ImageReadMode.GRAY: let PIL convert
        return pil_to_uint8(decode_image_file(io.BytesIO(data), mode, max_pixels, exif_transpose))
    return _to_uint8(out)


def decode_image_tensor(
    path: str | os.PathLike[str] | IO[bytes],
    mode: str = "RGB",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
) -> torch.Tensor:
    """:func:`decode_image_bytes` of a file: only a regular file is opened (a FIFO or device raises ``OSError``).

    The drop-in counterpart of :func:`semmim.data.datasets.decode_image` for ``data.decode=torchvision``.

    Examples:
        >>> decode_image_tensor("cat.jpg").shape  # doctest: +SKIP
        torch.Size([3, 375, 500])
    """
    data = path.read() if hasattr(path, "read") else read_regular_file(path)
    if not data:
        raise OSError("empty file")
    return decode_image_bytes(data, mode, max_pixels, exif_transpose)


def decode_conflict(decode: str, dataset: str, dataset_cls: object, rand_augment: str | None) -> str | None:
    """Why ``data.decode`` cannot be used with the rest of the data config (``None`` if it can).

    Args:
        decode: ``data.decode``.
        dataset: ``data.name``.
        dataset_cls: the registered dataset class (or factory); it supports a decode if listed in its
            ``decodes`` attribute (``("pil",)`` when it has none).
        rand_augment: ``data.rand_augment``.
    """
    if decode not in DECODES:
        return f"data.decode={decode!r} is not one of {', '.join(DECODES)}"
    if decode == "pil":
        return None
    if decode not in getattr(dataset_cls, "decodes", ("pil",)):
        from semmim.registry import DATASETS

        able = [n for n in DATASETS.names() if decode in getattr(DATASETS.get(n), "decodes", ("pil",))]
        return (
            f"data.decode={decode} decodes image files and is available for data.name={' or '.join(able)}; "
            f"dataset '{dataset}' does not support it: set data.decode=pil"
        )
    if rand_augment:
        return (
            f"data.decode={decode} does not combine with data.rand_augment={rand_augment} (timm's RandAugment works "
            f"on PIL images): set data.decode=pil, or remove data.rand_augment"
        )
    return None


FILE_DECODERS["torchvision"] = decode_image_tensor
