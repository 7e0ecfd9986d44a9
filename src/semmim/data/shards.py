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

Command line::

    semmim data shards --src fashion_mnist --out data/fmnist-shards --captions templates --shard-size 1000
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from semmim.data.captions import MANIFEST_SUFFIXES, ClassCaptions, ManifestDataset, has_captions
from semmim.data.datasets import (
    Sample,
    Transform,
    _apply,
    _mode_for,
    _to_8bit,
    sample_seed,
)
from semmim.registry import DATASETS

__all__ = [
    "IMAGE_EXTS",
    "SHARD_MANIFEST",
    "ShardStream",
    "add_data_parser",
    "cmd_data_shards",
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


def count_shard_samples(url: str) -> int:
    """Samples with an image in a local shard, counted from the tar headers (no image is read).

    A damaged shard counts the samples before the damage, with a warning.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(_local(url), mode="r:*") as tar:
            for m in tar:
                split = _split_name(m.name) if m.isfile() and m.size > 0 else None
                if split is not None and split[1] in IMAGE_EXTS:
                    keys.add(split[0])
    except _TAR_ERRORS as err:
        warnings.warn(
            f"cannot count the samples of shard {url}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2
        )
    return len(keys)


def _open(url: str) -> IO[bytes]:
    if _is_remote(url):
        from webdataset import gopen

        stream: IO[bytes] = gopen(url, "rb")
        return stream
    return open(_local(url), "rb")  # the caller closes it


def _iter_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each group of consecutive files with the same key in a shard."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                split = _split_name(m.name) if m.isfile() else None
                if split is None:
                    continue
                if split[0] != key:  # the previous sample is complete
                    if key is not None and parts:
                        yield key, parts
                    key, parts = split[0], {}
                f = tar.extractfile(m)
                parts[split[1]] = f.read() if f is not None else b""
    except _TAR_ERRORS as err:
        warnings.warn(
            f"shard {url} is unreadable or truncated at sample {key!r} ({type(err).__name__}: {err}); "
            f"skipping the rest of it",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    if key is not None and parts:
        yield key, parts


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


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class ShardStream(IterableDataset[Sample]):
    """Streams WebDataset shards (img2dataset layout) as items like every other semmim dataset.

    Items are ``{"image": (C, H, W) float in [0, 1], "caption": str, "label": int, "index": int}``:
    the caption is the ``.txt`` part (``""`` when absent), the label the ``.cls`` part (``-1`` when
    absent) and the index the sample key when it is a number (as :func:`write_shards` and
    img2dataset write them), a stable hash of it otherwise. The transform runs in a random scope
    seeded by ``(seed, epoch, index)`` as in :class:`semmim.data.SeededDataset`.

    See the module docstring for how shards are split between ranks and workers. Samples whose
    image does not decode, or whose ``.cls`` is not an integer, are skipped with a warning; a
    truncated shard is read up to the damage. Samples without an image part are dropped before
    shuffling (so they do not shift a resume point); an image that fails to decode does, by one.

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
        self.urls = expand_urls(urls)
        self.root = urls if isinstance(urls, str) else None
        self.transform = transform
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_samples = num_samples
        self.shuffle = bool(shuffle)
        self.mode = _mode_for(in_chans)
        self.in_chans = in_chans
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.epoch = int(epoch)
        self.start = 0
        self.set_start(resume_samples)
        meta = read_shard_manifest(self.urls)
        self.classes: list[str] = [str(c) for c in (meta or {}).get("classes", []) or []]
        counts = (meta or {}).get("counts")
        self._counts: dict[str, int] | None = dict(zip(self.urls, counts, strict=True)) if counts else None
        if len(self.urls) % self.world_size:
            warnings.warn(
                f"{len(self.urls)} shards do not split evenly over {self.world_size} ranks: ranks will read "
                f"different numbers of samples",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one resets the start to 0."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

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

    def epoch_size(self) -> int:
        """Samples of this rank in a full epoch (``num_samples // world_size`` when ``num_samples`` is set)."""
        if self.num_samples is not None:
            return self.num_samples // self.world_size
        counts = self.shard_counts()
        return sum(counts[u] for u in self.epoch_shards())

    def __len__(self) -> int:
        """Samples of this rank left in the current epoch (after the resume point)."""
        return max(0, self.epoch_size() - self.start)

    # ------------------------------------------------------------------ iteration
    def _worker_plan(self, groups: list[list[str]], worker: int) -> tuple[int, int]:
        """``(logical worker, samples to skip)`` for DataLoader worker ``worker``.

        A resumed DataLoader asks its worker 0 first, but the interrupted one would have asked
        ``next_worker`` next; so worker ``w`` plays the part of worker ``(w + next_worker) % K``.
        """
        if self.start == 0:
            return worker, 0
        if len(groups) == 1:
            return worker, self.start
        if self.batch_size is None:
            raise ValueError(
                "resume_samples with more than one DataLoader worker needs batch_size (and drop_last) of the "
                "DataLoader, to know which worker delivered which batch"
            )
        counts = self.shard_counts()
        per_worker = [sum(counts[u] for u in g) for g in groups]
        skips, next_worker = _split_resume(self.start, per_worker, self.batch_size, self.drop_last)
        logical = (worker + next_worker) % len(groups)
        return logical, skips[logical]

    def _raw(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """``(url, key, parts)`` of the samples with an image part, in shard order."""
        for url in shards:
            for key, parts in _iter_tar(url):
                if _image_part(parts) is None:
                    warnings.warn(
                        f"skipping sample {key!r} of {url}: no image part (found {', '.join(sorted(parts))})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                yield url, key, parts

    def _decode(self, url: str, key: str, parts: dict[str, bytes]) -> Sample | None:
        ext = _image_part(parts)
        assert ext is not None
        index = _sample_index(key)
        try:
            with Image.open(io.BytesIO(parts[ext])) as img:
                img.load()
                image = _to_8bit(img)
                image = image.convert(self.mode) if image.mode != self.mode else image.copy()
            label = int(parts["cls"].decode("utf-8").strip()) if parts.get("cls") else -1
        except Exception as err:  # PIL raises many types for corrupt data; all mean "bad sample"
            warnings.warn(
                f"skipping corrupt sample {key!r} of {url}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2
            )
            return None
        caption = parts.get("txt", b"").decode("utf-8", errors="replace")
        with torch.random.fork_rng(devices=[]):
            s = sample_seed(self.seed, self.epoch, index)
            torch.default_generator.manual_seed(s)
            py_state = random.getstate()
            random.seed(s)
            try:
                tensor = _apply(self.transform, image)
            finally:
                random.setstate(py_state)
        return {"image": tensor, "caption": caption, "label": label, "index": index}

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.epoch_shards()
        groups = [shards[w::num_workers] for w in range(num_workers)]
        logical, skip = self._worker_plan(groups, worker)
        mine = groups[logical]
        size = self.shuffle_buffer if self.shuffle else 0
        if size <= 1 and self._counts is not None:
            # without a shuffle buffer, whole shards inside the skipped prefix need not be read at all
            while mine and skip >= self._counts[mine[0]]:
                skip -= self._counts[mine[0]]
                mine = mine[1:]
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, logical, "samples"))
        stream = _buffer_shuffle(self._raw(mine), size, rng)
        for pos, (url, key, parts) in enumerate(stream):
            if pos < skip:
                continue
            item = self._decode(url, key, parts)
            if item is not None:
                yield item

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
        from semmim.data.loader import describe

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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _source_dataset(args: argparse.Namespace) -> Any:
    from semmim.data.captions import subset_keeping_captions
    from semmim.data.datasets import ImageFolderDataset
    from semmim.data.fashion_mnist import FashionMNIST

    src = str(args.src)
    ds: Any
    if src in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        ds = FashionMNIST(root=args.root, split=args.split, in_chans=1)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            ds = ImageFolderDataset(path)
        elif path.is_file():
            if path.suffix.lower() not in MANIFEST_SUFFIXES:
                raise ValueError(
                    f"--src {src}: a file must be a manifest ({', '.join(sorted(MANIFEST_SUFFIXES))}), "
                    f"got suffix {path.suffix!r}"
                )
            ds = ManifestDataset(path, root=args.root, image_key=args.image_key, caption_key=args.caption_key)
        else:
            raise FileNotFoundError(
                f"--src {src}: not an image folder, a manifest file (.csv/.tsv/.jsonl) or 'fashion_mnist'"
            )
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.limit < len(ds):
            ds = subset_keeping_captions(ds, range(args.limit))
    if args.captions == "templates":
        ds = ClassCaptions(ds, seed=args.seed)
    return ds


def cmd_data_shards(args: argparse.Namespace) -> int:
    """``semmim data shards``: write a dataset as WebDataset shards; prints the shard and sample counts."""
    ds = _source_dataset(args)
    paths = write_shards(
        ds,
        args.out,
        shard_size=args.shard_size,
        prefix=args.prefix,
        image_format=args.image_format,
        quality=args.quality,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    out = Path(args.out)
    print(f"wrote {len(paths)} shards, {len(ds)} samples to {out} (index: {out / SHARD_MANIFEST})")
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` (with ``data shards``) to an ``argparse`` subparsers object (see :mod:`semmim.data_cli`)."""
    from semmim.data_cli import add_data_parser as add

    return add(subparsers)
