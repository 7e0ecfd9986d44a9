"""WebDataset shards in the img2dataset layout: writing them, and streaming them back.

A shard is a tar file of samples; sample ``KEY`` is the files ``KEY.jpg`` (or ``.png`` / ``.webp``
...), ``KEY.txt`` (the caption, UTF-8) and, for labelled data, ``KEY.cls`` (the integer label as
text). :func:`write_shards` writes ``prefix-000000.tar``, ``prefix-000001.tar``, ... and a
``manifest.json`` that lists the shards with their sample counts; :class:`ShardStream` reads any
shards in this layout (img2dataset's output included) as an ``IterableDataset``.

Exactly-once reading: in epoch ``e`` the shard list is permuted with a generator seeded by
``(seed, e)`` (the same on every rank); rank ``r`` of ``W`` takes ``shards[r::W]`` and DataLoader
worker ``w`` of ``K`` takes ``rank_shards[w::K]``. Every sample is therefore read exactly once per
epoch across all ranks and workers; the ranks get equally many samples when the shard count is
divisible by ``W`` and the shards are equally full. Within a worker, samples pass through a
bounded shuffle buffer seeded by ``(seed, e, r, w)``, so the order is a function of those numbers
(and of the worker count) only.

Resuming: ``resume_samples=k`` (or :meth:`ShardStream.set_start`) drops the first ``k`` samples of
this rank's epoch stream, exactly as a DataLoader delivered them, without decoding their images.

Hostile shards: a bad sample (undecodable, too large, lost to a truncated shard, without a required
caption) is replaced by the next good one and counted in the item's ``"skipped"``; every cut or
corrupt tar warns, naming the shard. With known shard counts an epoch has exactly its promised length
(whole batches evened out between workers), so an epoch ends when the stream ends. See
:class:`ShardStream`.

Command line (:mod:`semmim.cli.data`)::

    semmim data shards --src fashion_mnist --out data/fmnist-shards --captions templates --shard-size 1000
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any, NamedTuple

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from semmim.data.captions import has_captions
from semmim.data.datasets import (
    ImageTooLargeError,
    Sample,
    Transform,
    apply_transform,
    decode_image_file,
    image_mode_for,
)
from semmim.data.seeding import seeded
from semmim.data.summary import describe
from semmim.registry import DATASETS

__all__ = [
    "IMAGE_EXTS",
    "MAX_IMAGE_PIXELS",
    "MAX_MEMBER_BYTES",
    "SHARD_MANIFEST",
    "ShardStream",
    "count_shard_samples",
    "expand_urls",
    "read_shard_manifest",
    "write_shards",
]

SHARD_MANIFEST = "manifest.json"
"""Name of the file :func:`write_shards` writes next to the shards."""

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
"""Sample parts read as the image, in order of preference."""

SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
"""File endings :func:`expand_urls` picks up in a directory."""

MAX_MEMBER_BYTES: int = 64 * 2**20
"""Largest tar member, and largest sample (its parts together), read into memory: 64 MiB. A larger one is
skipped over in bounded chunks and counted as a bad sample (a ``.tar.gz`` member bomb costs time, not memory)."""

MAX_IMAGE_PIXELS: int = 89_478_485
"""Largest image (width x height) decoded, Pillow's default ``Image.MAX_IMAGE_PIXELS``; a larger one is a bad
sample, read from its header without decoding (``ShardStream(max_pixels=...)`` changes it)."""

_USED_PARTS = frozenset((*IMAGE_EXTS, "txt", "cls"))
_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# --------------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def _local(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else os.path.expanduser(url)


def _brace_expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def expand_urls(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard URLs from a brace pattern, a directory, a list of them, or ``::``-separated patterns.

    A directory yields its ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` files in sorted order; a pattern such as
    ``data/shard-{000000..000009}.tar`` is brace-expanded (``{a,b}`` works too). Local files must
    exist; ``http://``, ``pipe:`` and other URLs that :func:`webdataset.gopen` opens are passed on.

    Raises:
        FileNotFoundError: a directory holds no shards, or local shard files are missing.
        ValueError: nothing was given.

    Examples:
        >>> expand_urls("s3://bucket/shard-{000000..000002}.tar")
        ['s3://bucket/shard-000000.tar', 's3://bucket/shard-000001.tar', 's3://bucket/shard-000002.tar']
    """
    items = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    out: list[str] = []
    for item in items:
        for part in os.fspath(item).split("::"):
            part = part.strip()
            if not part:
                continue
            if not _is_remote(part) and "{" not in part and Path(_local(part)).is_dir():
                folder = Path(_local(part))
                found = sorted(str(p) for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
                if not found:
                    raise FileNotFoundError(f"no shards ({', '.join('*' + s for s in SHARD_SUFFIXES)}) in {folder}")
                out += found
            else:
                out += [u if _is_remote(u) else _local(u) for u in _brace_expand(part)]
    if not out:
        raise ValueError("no shards given: pass a brace pattern, a directory of .tar files, or a list of shards")
    missing = [u for u in out if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shard files do not exist: {shown}")
    return out


def read_shard_manifest(urls: Sequence[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` written by :func:`write_shards` next to local ``urls``, if there is one.

    Returns:
        The manifest, with ``counts`` added (sample count per URL, in the order of ``urls``) when it
        lists every one of them; ``None`` when there is no readable manifest.
    """
    folders = {str(Path(u).parent) for u in urls if not _is_remote(u)}
    if len(folders) != 1:
        return None
    path = Path(folders.pop()) / SHARD_MANIFEST
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    shards = [s for s in meta.get("shards", []) if isinstance(s, dict)]
    per_file = {str(s.get("file")): int(s.get("num_samples", -1)) for s in shards}
    counts = [per_file.get(Path(u).name, -1) for u in urls]
    if all(c >= 0 for c in counts):
        meta["counts"] = counts
    return meta


def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> ``("dir/KEY", "ext.more")`` as webdataset splits names; ``None`` to skip."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _image_part(parts: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTS if parts.get(e)), None)


class _EndRecorder(tarfile.TarInfo):
    """A ``TarInfo`` that remembers on its ``TarFile`` the header error that ended the archive.

    ``tarfile`` ends an archive quietly at a header cut in the middle, at a missing end-of-archive block
    and at a corrupt header; :func:`_damage` tells those apart from a proper end.
    """

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> _EndRecorder:
        """Read the next header of ``archive``, remembering the error that ends it."""
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as err:
            archive.semmim_end = err  # type: ignore[attr-defined]
            raise


def _damage(tar: tarfile.TarFile) -> str | None:
    """Why a tar whose members ran out did not end properly (``None``: it ended with an end-of-archive block)."""
    err = getattr(tar, "semmim_end", None)
    kind = type(err).__name__  # tarfile's undocumented subclasses of HeaderError
    if err is None or kind == "EOFHeaderError":
        return None
    if kind == "EmptyHeaderError":
        return "it ends without the end-of-archive blocks (cut at a block boundary)"
    if kind == "TruncatedHeaderError":
        return "it is cut in the middle of a header"
    return f"corrupt header after byte {tar.offset} ({kind}: {err})"


def count_shard_samples(url: str) -> int:
    """Samples with an image in a local shard, counted from the tar headers (no image is read).

    A damaged shard counts the samples before the damage, with a warning.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(_local(url), mode="r:*", tarinfo=_EndRecorder) as tar:
            for m in tar:
                split = _split_name(m.name) if m.isfile() and m.size > 0 else None
                if split is not None and split[1] in IMAGE_EXTS:
                    keys.add(split[0])
            damage = _damage(tar)
    except _TAR_ERRORS as err:
        damage = f"{type(err).__name__}: {err}"
    if damage is not None:
        warnings.warn(
            f"shard {url} is truncated or corrupt: {damage}; counted {len(keys)} samples before the damage",
            RuntimeWarning,
            stacklevel=2,
        )
    return len(keys)


def _open(url: str) -> IO[bytes]:
    if _is_remote(url):
        from webdataset import gopen

        stream: IO[bytes] = gopen(url, "rb")
        return stream
    return open(_local(url), "rb")  # the caller closes it


def _iter_tar(
    url: str, max_bytes: int = MAX_MEMBER_BYTES, *, quiet: bool = False
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """``(key, {ext: bytes}, problem)`` for each group of consecutive files with the same key in a shard.

    Only the parts a sample uses (images, ``txt``, ``cls``) are read, and only up to ``max_bytes`` per
    sample: a larger member is skipped over without being held in memory and ``problem`` says so (it is
    ``None`` for a sample read whole). A shard that is cut or corrupt anywhere (in a header, in a member's
    data, at a block boundary before its end-of-archive blocks) is read up to the damage, with a warning
    (unless ``quiet``) naming it; the sample being read at the damage is dropped, since its parts may be
    incomplete.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    problem: str | None = None
    held = 0
    count = 0
    damage: str | None = None
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecorder) as tar:
            for m in tar:
                split = _split_name(m.name) if m.isfile() else None
                if split is None:
                    continue
                if split[0] != key:  # the previous sample is complete
                    if key is not None and parts:
                        count += 1
                        yield key, parts, problem
                    key, parts, problem, held = split[0], {}, None, 0
                if split[1] not in _USED_PARTS or problem is not None:
                    parts[split[1]] = b""  # not read: tarfile skips the data in bounded chunks
                    continue
                if held + m.size > max_bytes:
                    parts[split[1]] = b""
                    problem = (
                        f"part {split[1]!r} of {m.size} bytes makes the sample larger than the {max_bytes}-byte limit "
                        f"(semmim.data.shards.MAX_MEMBER_BYTES)"
                    )
                    continue
                f = tar.extractfile(m)
                # at most m.size <= max_bytes bytes (read(n) would allocate n bytes up front)
                parts[split[1]] = f.read() if f is not None else b""
                held += len(parts[split[1]])
            damage = _damage(tar)
    except _TAR_ERRORS as err:
        damage = f"{type(err).__name__}: {err}"
    if damage is not None:
        if not quiet:
            lost = f"; sample {key!r}, being read there, is dropped" if key is not None else ""
            warnings.warn(
                f"shard {url} is truncated or corrupt after {count} samples: {damage}{lost}; skipping the rest of it",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    if key is not None and parts:
        yield key, parts, problem


def _mix(*values: int | str) -> int:
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sample_index(key: str) -> int:
    """A stable integer for a sample key: the number itself for numeric keys (img2dataset, ours)."""
    base = key.rpartition("/")[2]
    return int(base) if base.isdigit() else _mix("key", key)


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``size`` items (``size <= 1``: keep the order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _split_resume(start: int, counts: Sequence[int], batch_size: int, drop_last: bool) -> tuple[list[int], int]:
    """Where each worker's stream stood after a DataLoader delivered ``start`` samples.

    The DataLoader takes whole batches from its workers in turn, skipping exhausted ones; a worker
    with ``c`` samples yields ``c // batch_size`` batches with ``drop_last`` and ``ceil(c / batch_size)``
    without.

    Returns:
        ``(skips, next_worker)``: samples each worker had delivered, and the worker whose batch came next.
    """
    n = len(counts)
    batches = [c // batch_size if drop_last else -(-c // batch_size) for c in counts]
    done = [0] * n
    skips = [0] * n
    remaining = start
    w = 0
    while remaining > 0 and any(d < b for d, b in zip(done, batches, strict=True)):
        if done[w] < batches[w]:
            size = min(batch_size, counts[w] - done[w] * batch_size, remaining)
            skips[w] += size
            remaining -= size
            done[w] += 1
        w = (w + 1) % n
    return skips, w


def _worker_targets(counts: Sequence[int], samples: int, batch_size: int | None, drop_last: bool) -> list[int]:
    """Samples each worker yields so that a rank delivers exactly ``samples`` (whole batches with ``drop_last``).

    Workers start from ``counts`` (the samples of their shards). Without ``drop_last`` (or a batch size) the
    targets sum to ``samples``; with it, each target is a multiple of ``batch_size`` and the DataLoader
    delivers exactly ``samples // batch_size`` batches. Missing batches are added to the workers with the
    largest partial batch first (they repeat their own samples), then round-robin; surplus batches are taken
    from the workers with the most. Workers without samples get none.
    """
    unit = batch_size if batch_size and drop_last else 1
    want = samples // unit
    full = [c // unit for c in counts]
    have = sum(full)
    while have > want:
        w = max(range(len(full)), key=lambda i: (full[i], i))
        full[w] -= 1
        have -= 1
    live = [w for w, c in enumerate(counts) if c > 0]
    if have < want and live:
        for w in sorted((w for w in live if counts[w] % unit), key=lambda i: (-(counts[i] % unit), i)):
            if have == want:
                break
            full[w] += 1
            have += 1
        k = 0
        while have < want:
            full[live[k % len(live)]] += 1
            have += 1
            k += 1
    return [f * unit for f in full]


class _Entry(NamedTuple):
    """One sample of a worker's stream before decoding."""

    url: str
    key: str
    parts: dict[str, bytes]
    problem: str | None
    """Why the sample is bad before any decoding (too large, lost to damage); ``None`` if it may be good."""
    quiet: bool = False
    """Already warned about (per shard): no warning of its own."""


_Loaded = tuple[Image.Image, int, str, int]
"""A decoded sample: ``(image, label, caption, index)``."""


@dataclass
class _WorkerState:
    """Bad-sample bookkeeping of one worker's pass over its shards."""

    shards: list[str]
    total: int | None
    """Samples of the worker's shards; ``None`` when unknown (the tolerated share then refers to ``read``)."""
    max_bad_fraction: float
    bad: int = 0
    read: int = 0
    first_good: _Loaded | None = None

    @property
    def limit(self) -> int:
        """Bad samples tolerated: ``max(1, max_bad_fraction x samples)``."""
        return max(1, int(self.max_bad_fraction * (self.total if self.total is not None else self.read)))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class ShardStream(IterableDataset[Sample]):
    """Streams WebDataset shards (img2dataset layout) as items like every other semmim dataset.

    Items are ``{"image": (C, H, W) float in [0, 1], "caption": str, "label": int, "index": int,
    "skipped": int}``: the caption is the ``.txt`` part (``""`` when absent, unless ``require_captions``),
    the label the ``.cls`` part (``-1`` when absent) and the index the sample key when it is a number (as
    :func:`write_shards` and img2dataset write them), a stable hash of it otherwise. The transform runs
    in a random scope seeded by ``(seed, epoch, index)`` as in :class:`semmim.data.SeededDataset`.

    See the module docstring for how shards are split between ranks and workers.

    Bad samples: a sample whose image does not decode, has more than ``max_pixels`` pixels or a part
    larger than :data:`MAX_MEMBER_BYTES`, whose ``.cls`` is not an integer, whose caption is missing or
    empty while ``require_captions``, or that a truncated or corrupt shard lost (the shard holds fewer
    samples than its count), is warned about and replaced by the next good sample of the same worker's
    stream (wrapping around to its first), like :class:`semmim.data.ImageFolderDataset` does. The
    replacement has ``"skipped": 1`` (each bad sample is counted once, in the pass that meets it; the
    trainer sums the field per epoch against ``data.max_bad_fraction``); every other item has 0. A
    worker stops with a ``RuntimeError`` as soon as more than ``max(1, max_bad_fraction x its samples)``
    of its samples are bad, or when none is good. Samples without an image part are dropped before
    shuffling (the header count does not count them either).

    Exact length: when the shard counts are known (``manifest.json``, or local shards), the rank's
    workers together yield exactly ``len(stream)`` samples, and with ``batch_size`` and ``drop_last`` a
    DataLoader with any number of workers delivers exactly ``epoch_size() // batch_size`` batches per
    epoch (fewer after :meth:`set_start`, by the batches before the start). Each shard yields exactly
    its count (bad and lost samples are replaced; a shard holding more is cut, with a warning), and the
    workers' shares are evened out to whole batches by repeating a few of their own samples (at most
    one partial batch per worker when ``num_samples`` is the shards' total). An iteration positioned at
    or after that end yields nothing; before it, it never yields nothing.

    Call :meth:`set_epoch` before each epoch in the main process (the DataLoader's workers get a
    fresh copy every epoch unless ``persistent_workers``); it also counts local shards without a
    ``manifest.json`` once, before the workers start.

    Call :meth:`set_epoch` before each epoch in the main process (the DataLoader's workers get a
    fresh copy every epoch unless ``persistent_workers``).

    Args:
        urls: a brace pattern (``"data/shard-{000000..000009}.tar"``), a directory, or a list (see
            :func:`expand_urls`).
        transform: callable on a PIL image returning a (C, H, W) tensor; ``None`` = plain conversion.
        seed: base seed of the shard order, the sample shuffle and the augmentation.
        shuffle_buffer: samples held by each worker's shuffle buffer (``<= 1``: no sample shuffle).
        rank: this process's rank.
        world_size: number of ranks.
        num_samples: samples in one epoch over all ranks; sets ``len()`` (default: the counts in the
            shards' ``manifest.json``, else counted from the tar headers of local shards).
        resume_samples: skip this many samples of this rank's stream in the current epoch.
        epoch: the initial epoch.
        shuffle: permute the shards per epoch and shuffle samples; ``False`` reads in list order.
        in_chans: 3 decodes to RGB, 1 to grayscale.
        batch_size: the DataLoader's batch size; needed (with ``drop_last``) to split ``resume_samples``
            between more than one worker.
        drop_last: the DataLoader's ``drop_last``.
        max_bad_fraction: tolerated fraction of bad samples per worker (``data.max_bad_fraction``).
        require_captions: a sample with a missing or empty ``.txt`` is bad (set it for methods that
            train on captions, such as ``clip`` and ``rils``).
        max_pixels: largest image (width x height) decoded; a larger one is a bad sample.
        max_member_bytes: largest sample part read into memory; a larger one is a bad sample.

    Attributes:
        urls: the expanded shard list.
        classes: class names from ``manifest.json`` (empty when unknown).
        epoch: current epoch.
        start: samples skipped at the start of the current epoch.

    Examples:
        >>> ds = ShardStream("data/fmnist/shard-{000000..000059}.tar", transform=None)  # doctest: +SKIP
        >>> ds.set_epoch(3)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=4)  # doctest: +SKIP
    """

    name = "webdataset"

    def __init__(
        self,
        urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        transform: Transform | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
        resume_samples: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        in_chans: int = 3,
        batch_size: int | None = None,
        drop_last: bool = False,
        max_bad_fraction: float = 0.01,
        require_captions: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        if max_pixels < 1 or max_member_bytes < 1:
            raise ValueError(f"max_pixels and max_member_bytes must be >= 1, got {max_pixels} and {max_member_bytes}")
        self.urls = expand_urls(urls)
        self.root = urls if isinstance(urls, str) else None
        self.transform = transform
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_samples = num_samples
        self.shuffle = bool(shuffle)
        self.mode = image_mode_for(in_chans)
        self.in_chans = in_chans
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.max_bad_fraction = float(max_bad_fraction)
        self.require_captions = bool(require_captions)
        self.max_pixels = int(max_pixels)
        self.max_member_bytes = int(max_member_bytes)
        self.epoch = int(epoch)
        self.start = 0
        self.set_start(resume_samples)
        meta = read_shard_manifest(self.urls)
        self.classes: list[str] = [str(c) for c in (meta or {}).get("classes", []) or []]
        counts = (meta or {}).get("counts")
        self._counts: dict[str, int] | None = dict(zip(self.urls, counts, strict=True)) if counts else None
        if len(self.urls) % self.world_size:
            warnings.warn(
                f"{len(self.urls)} shards do not split evenly over {self.world_size} ranks: ranks hold different "
                f"numbers of samples (with num_samples set, each rank repeats or leaves out some to yield its share)",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one resets the start to 0.

        Also counts the samples of local shards without a ``manifest.json`` (once), so that the
        DataLoader's workers inherit the counts instead of each reading every tar header again.
        """
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch
        self._known_counts()

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's stream in the current epoch."""
        if start < 0:
            raise ValueError(f"resume_samples must be >= 0, got {start}")
        self.start = int(start)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": int, "start": int}``."""
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.epoch = int(state["epoch"])
        self.set_start(int(state["start"]))

    # ------------------------------------------------------------------ shards and sizes
    def epoch_shards(self, epoch: int | None = None) -> list[str]:
        """This rank's shards in ``epoch`` (default: the current one), in reading order."""
        order = list(self.urls)
        if self.shuffle:
            e = self.epoch if epoch is None else int(epoch)
            random.Random(_mix(self.seed, e, "shards")).shuffle(order)
        return order[self.rank :: self.world_size]

    def shard_counts(self) -> dict[str, int]:
        """Samples per shard: from ``manifest.json``, else counted from local tar headers (cached)."""
        if self._counts is None:
            remote = [u for u in self.urls if _is_remote(u)]
            if remote:
                raise TypeError(
                    f"the sample counts of remote shards ({remote[0]}, ...) are unknown; set num_samples "
                    f"(data.num_samples) or write a {SHARD_MANIFEST} next to them"
                )
            self._counts = {u: count_shard_samples(u) for u in self.urls}
        return self._counts

    def _known_counts(self) -> dict[str, int] | None:
        """:meth:`shard_counts`, or ``None`` for remote shards without a manifest."""
        if self._counts is None and any(_is_remote(u) for u in self.urls):
            return None
        return self.shard_counts()

    def epoch_size(self) -> int:
        """Samples of this rank in a full epoch (``num_samples // world_size`` when ``num_samples`` is set)."""
        if self.num_samples is not None:
            return self.num_samples // self.world_size
        counts = self.shard_counts()
        return sum(counts[u] for u in self.epoch_shards())

    def __len__(self) -> int:
        """Samples of this rank left in the current epoch (after the resume point).

        Exact when the shard counts are known (see the class docstring); with ``batch_size`` and
        ``drop_last`` the DataLoader delivers ``epoch_size() // batch_size - start // batch_size`` batches.
        """
        return max(0, self.epoch_size() - self.start)

    # ------------------------------------------------------------------ iteration
    def _worker_plan(self, groups: list[list[str]], worker: int) -> tuple[int, int, int | None]:
        """``(logical worker, samples to skip, samples to yield or None if unknown)`` for DataLoader worker ``worker``.

        A resumed DataLoader asks its worker 0 first, but the interrupted one would have asked
        ``next_worker`` next; so worker ``w`` plays the part of worker ``(w + next_worker) % K``.
        """
        counts = self._known_counts()
        if counts is None:  # remote shards without a manifest: each worker yields what its shards hold
            if self.start and len(groups) > 1:
                self.shard_counts()  # raises: the split of a resume point needs the counts
            return worker, self.start, None
        per_worker = [sum(counts[u] for u in g) for g in groups]
        targets = _worker_targets(per_worker, self.epoch_size(), self.batch_size, self.drop_last)
        if self.start == 0:
            return worker, 0, targets[worker]
        if len(groups) == 1:
            return worker, self.start, targets[0]
        if self.batch_size is None:
            raise ValueError(
                "resume_samples with more than one DataLoader worker needs batch_size (and drop_last) of the "
                "DataLoader, to know which worker delivered which batch"
            )
        skips, next_worker = _split_resume(self.start, targets, self.batch_size, self.drop_last)
        logical = (worker + next_worker) % len(groups)
        return logical, skips[logical], targets[logical]

    def _shard_entries(self, url: str, *, quiet: bool) -> Iterator[_Entry]:
        """The samples of a shard that have an image part; exactly its count of them when that is known.

        Missing samples (a truncated shard, a wrong count) become bad entries at the shard's end; samples
        beyond the count are not read. ``quiet`` drops the warnings (a second pass over the same shard).
        """
        expected = self._counts.get(url) if self._counts is not None else None
        got = extra = 0
        for key, parts, problem in _iter_tar(url, self.max_member_bytes, quiet=quiet):
            if problem is None and _image_part(parts) is None:
                if not quiet:
                    warnings.warn(
                        f"skipping sample {key!r} of {url}: no image part (found {', '.join(sorted(parts))})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            if expected is not None and got >= expected:
                extra += 1
                continue
            got += 1
            yield _Entry(url, key, parts, problem)
        if expected is None:
            return
        if extra and not quiet:
            warnings.warn(
                f"shard {url} holds {got + extra} samples, more than the {expected} of its count (manifest.json or "
                f"tar headers); the last {extra} are not read, to keep the epoch length",
                RuntimeWarning,
                stacklevel=2,
            )
        if got < expected:
            if not quiet:
                warnings.warn(
                    f"shard {url} gave {got} of its {expected} samples: {expected - got} lost (truncated or corrupt "
                    f"shard, or a wrong count) are counted as bad and replaced",
                    RuntimeWarning,
                    stacklevel=2,
                )
            for n in range(expected - got):
                yield _Entry(url, f"{url}#lost-{n}", {}, "lost: the shard is truncated or corrupt", quiet=True)

    def _positions(self, mine: list[str], logical: int, skip: int, *, quiet: bool) -> Iterator[tuple[int, _Entry]]:
        """``(position, entry)`` of worker ``logical``'s stream from the start; shards wholly before ``skip``
        are passed over unread when there is no shuffle buffer (their counts are exact)."""
        size = self.shuffle_buffer if self.shuffle else 0
        pos = 0
        if size <= 1 and self._counts is not None:
            while mine and pos + self._counts[mine[0]] <= skip:
                pos += self._counts[mine[0]]
                mine = mine[1:]
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, logical, "samples"))
        entries = chain.from_iterable(self._shard_entries(u, quiet=quiet) for u in mine)
        return enumerate(_buffer_shuffle(entries, size, rng), start=pos)

    def _load(self, entry: _Entry) -> _Loaded | str:
        """Decode a sample: ``(image, label, caption, index)``, or why it is bad."""
        if entry.problem is not None:
            return entry.problem
        ext = _image_part(entry.parts)
        assert ext is not None
        try:
            label = int(entry.parts["cls"].decode("utf-8").strip()) if entry.parts.get("cls") else -1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit budget below
                image = decode_image_file(io.BytesIO(entry.parts[ext]), self.mode, self.max_pixels)
        except ImageTooLargeError as err:
            return f"{err} (max_pixels; a decompression bomb?)"
        except Exception as err:  # PIL raises many types for corrupt data; all mean "bad sample"
            return f"{type(err).__name__}: {err}"
        caption = entry.parts.get("txt", b"").decode("utf-8", errors="replace")
        if self.require_captions and not caption.strip():
            return "no caption: the .txt part is missing or empty, and captions are required (require_captions)"
        return image, label, caption, _sample_index(entry.key)

    def _item(self, loaded: _Loaded, slot: _Entry, rnd: int, skipped: int) -> Sample:
        """The item of ``loaded`` served at the position of ``slot`` in round ``rnd`` of the stream.

        The augmentation is seeded by ``(seed, epoch, index of slot)``: a sample at its own place gets
        the same augmentation as ever; a replacement or a repeat gets another one.
        """
        image, label, caption, index = loaded
        aug = _sample_index(slot.key)
        if rnd:
            aug = _mix(aug, "repeat", rnd)
        with seeded(self.seed, self.epoch, aug):
            tensor = apply_transform(self.transform, image)
        return {"image": tensor, "caption": caption, "label": label, "index": index, "skipped": skipped}

    def _where(self, state: _WorkerState) -> str:
        shown = ", ".join(state.shards[:3]) + (", ..." if len(state.shards) > 3 else "")
        return f"shard(s) {shown} (rank {self.rank}, epoch {self.epoch})"

    def _bad(self, entry: _Entry, why: str, state: _WorkerState) -> None:
        state.bad += 1
        if not entry.quiet:
            warnings.warn(
                f"skipping bad sample {entry.key!r} of {entry.url}: {why}; replaced by the next good one",
                RuntimeWarning,
                stacklevel=3,
            )
        if state.bad > state.limit:
            among = f"the {state.total}" if state.total is not None else f"{state.read} read"
            raise RuntimeError(
                f"{state.bad} bad samples among {among} samples of {self._where(state)}, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows ({state.limit}); the warnings name them"
            )

    def _first_good(self, mine: list[str], logical: int, state: _WorkerState) -> _Loaded:
        """The first good sample of the worker's stream (the replacement for bad samples at its end)."""
        if state.first_good is None:
            for _, entry in self._positions(mine, logical, 0, quiet=True):
                loaded = self._load(entry)
                if not isinstance(loaded, str):
                    state.first_good = loaded
                    break
            else:
                raise RuntimeError(
                    f"no good sample in {self._where(state)}: all are bad (undecodable, lost or without a required "
                    f"caption), so none can replace them (data.max_bad_fraction={self.max_bad_fraction})"
                )
        return state.first_good

    def _serve_round(
        self, mine: list[str], logical: int, rnd: int, lo: int, hi: int | None, state: _WorkerState
    ) -> Iterator[Sample]:
        """Items at positions ``[lo, hi)`` of one round over the worker's entries (``hi=None``: to the end).

        A bad entry is served as the next good entry (read ahead past ``hi`` if need be, else the first
        good one of the stream); bad entries are warned about and counted in round 0 only.
        """
        first = rnd == 0
        pending: list[_Entry] = []
        for q, entry in self._positions(mine, logical, lo, quiet=not first):
            if q < lo:
                continue
            inside = hi is None or q < hi
            if not inside and not pending:
                break
            if inside and first:
                state.read += 1
            loaded = self._load(entry)
            if isinstance(loaded, str):
                if inside:
                    if first:
                        self._bad(entry, loaded, state)
                    pending.append(entry)
                continue
            for slot in pending:
                yield self._item(loaded, slot, rnd, int(first))
            pending = []
            if not inside:
                break
            yield self._item(loaded, entry, rnd, 0)
        if pending:
            loaded = self._first_good(mine, logical, state)
            for slot in pending:
                yield self._item(loaded, slot, rnd, int(first))

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.epoch_shards()
        groups = [shards[w::num_workers] for w in range(num_workers)]
        logical, skip, target = self._worker_plan(groups, worker)
        mine = groups[logical]
        counts = self._counts
        if target is None or counts is None:
            # counts unknown (remote shards without a manifest): one round, as long as the shards last
            state = _WorkerState(mine, None, self.max_bad_fraction)
            yield from self._serve_round(mine, logical, 0, skip, None, state)
            return
        if skip == 0 and self.epoch_size() > 0 and not sum(counts[u] for u in shards):
            raise ValueError(
                f"rank {self.rank} of {self.world_size} has no samples in epoch {self.epoch} ({len(shards)} of the "
                f"{len(self.urls)} shards), but the epoch is sized to {self.epoch_size()} samples per rank"
            )
        total = sum(counts[u] for u in mine)
        state = _WorkerState(mine, total, self.max_bad_fraction)
        pos = skip
        while pos < target:  # positions past the worker's total repeat its stream (evening out whole batches)
            rnd, lo = divmod(pos, total)
            hi = min(total, lo + target - pos)
            yield from self._serve_round(mine, logical, rnd, lo, hi, state)
            pos += hi - lo

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.urls)} shards, seed={self.seed}, shuffle_buffer={self.shuffle_buffer}, "
            f"rank={self.rank}, world_size={self.world_size}, epoch={self.epoch}, start={self.start})"
        )


@DATASETS.register(
    "webdataset", help="WebDataset shards (img2dataset layout: KEY.jpg + KEY.txt [+ KEY.cls]); data.root = the shards"
)
def webdataset_stream(
    root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    transform: Transform | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    num_samples: int | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> ShardStream:
    """A :class:`ShardStream` over ``root`` (a brace pattern, a directory or a list of shards).

    Extra keyword arguments (``resume_samples``, ``shuffle``, ``batch_size``, ...) go to :class:`ShardStream`.
    """
    return ShardStream(
        root,
        transform=transform,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        num_samples=num_samples,
        in_chans=in_chans,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _unwrap_source(source: Any) -> Any:
    ds = source
    while not hasattr(ds, "load") and hasattr(ds, "dataset"):
        ds = ds.dataset  # e.g. a SeededDataset: write the undecorated images
    if not hasattr(ds, "load"):
        raise TypeError(f"write_shards needs a dataset with load(i) -> (PIL.Image, label), got {type(source).__name__}")
    return ds


def _encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    if fmt in ("jpg", "webp") and img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def _describe_source(ds: Any) -> str:
    try:
        return describe(ds)
    except Exception:  # describing is best effort, writing must not fail over it
        return type(ds).__name__


def write_shards(
    source: Any,
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    prefix: str = "shard",
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write a dataset as WebDataset shards in the img2dataset layout, plus ``manifest.json``.

    Sample ``i`` of ``source`` becomes ``KEY.jpg`` (``image_format``), ``KEY.txt`` (``source.caption(i)``,
    or ``""`` when the dataset has no captions: wrap a labelled dataset in
    :class:`semmim.data.ClassCaptions` for template captions) and, when its label is ``>= 0``,
    ``KEY.cls``; ``KEY`` is ``i`` zero-padded to 9 digits, so :class:`ShardStream` gives it back as
    ``index``. Shards are ``out_dir/{prefix}-000000.tar``, ... with ``shard_size`` samples each (the
    last may hold fewer); each is written to a temporary name and renamed when complete.
    ``manifest.json`` holds ``num_samples``, ``num_shards``, ``shards`` (``[{"file", "num_samples"}]``),
    ``classes``, ``image_format`` and a description of the source.

    Args:
        source: a dataset with ``load(i) -> (PIL.Image, label)`` and ``len`` (a
            :class:`semmim.data.SeededDataset` is unwrapped: images are stored without augmentation).
        out_dir: output folder (created if needed).
        shard_size: samples per shard.
        prefix: shard file name prefix.
        image_format: ``"jpg"``, ``"png"`` (lossless) or ``"webp"``.
        quality: JPEG / WebP quality (1-100).
        progress: show a tqdm progress bar.
        overwrite: replace existing ``{prefix}-NNNNNN.tar`` shards in ``out_dir`` (otherwise an error).

    Returns:
        The shard paths, in order.

    Raises:
        FileExistsError: ``out_dir`` already holds shards with this prefix and ``overwrite`` is false.
        ValueError: an empty source or a bad argument.
    """
    from tqdm.auto import tqdm
    from webdataset import TarWriter

    ds = _unwrap_source(source)
    n = len(ds)
    if n == 0:
        raise ValueError("the source dataset is empty; there is nothing to write")
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("jpg", "png", "webp"):
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix may only hold letters, digits, '_', '.' and '-', got {prefix!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shard_name = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    existing = sorted(p for p in out.iterdir() if shard_name.fullmatch(p.name))
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(existing)} shard(s) named {prefix}-NNNNNN.tar; pass overwrite=True "
                f"(--overwrite) or choose another folder or prefix"
            )
        for p in existing:
            p.unlink()

    captioned = has_captions(ds)
    width = max(9, len(str(n - 1)))
    num_shards = math.ceil(n / shard_size)
    paths: list[Path] = []
    records: list[dict[str, Any]] = []
    tmp: Path | None = None
    bar = tqdm(total=n, unit="img", desc=f"writing {num_shards} shards", disable=not progress, dynamic_ncols=True)
    try:
        for s in range(num_shards):
            path = out / f"{prefix}-{s:06d}.tar"
            tmp = path.with_name(path.name + ".tmp")
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            with open(tmp, "wb") as f, TarWriter(f, encoder=False) as writer:
                for i in range(lo, hi):
                    img, label = ds.load(i)
                    sample: dict[str, Any] = {
                        "__key__": f"{i:0{width}d}",
                        fmt: _encode_image(img, fmt, quality),
                        "txt": (str(ds.caption(i)) if captioned else "").encode("utf-8"),
                    }
                    if int(label) >= 0:
                        sample["cls"] = str(int(label)).encode("ascii")
                    writer.write(sample)
                    bar.update(1)
            os.replace(tmp, path)
            tmp = None
            paths.append(path)
            records.append({"file": path.name, "num_samples": hi - lo})
            bar.set_postfix_str(f"{s + 1}/{num_shards} shards", refresh=False)
    finally:
        bar.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    meta = {
        "format": "webdataset",
        "layout": "img2dataset",
        "created_by": "semmim",
        "num_samples": n,
        "num_shards": len(paths),
        "shard_size": shard_size,
        "image_format": fmt,
        "captions": captioned,
        "classes": [str(c) for c in getattr(ds, "classes", []) or []],
        "source": _describe_source(ds),
        "shards": records,
    }
    manifest = out / SHARD_MANIFEST
    tmp_manifest = manifest.with_name(manifest.name + ".tmp")
    tmp_manifest.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, manifest)
    return paths
