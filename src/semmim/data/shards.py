"""WebDataset shards in the img2dataset layout: writing them, and streaming them back.

A shard is a tar file of samples; sample ``KEY`` is the files ``KEY.jpg`` (or ``.png`` / ``.webp``
...), ``KEY.txt`` (the caption, UTF-8) and, for labelled data, ``KEY.cls`` (the integer label as
text). :func:`write_shards` writes ``prefix-000000.tar``, ``prefix-000001.tar``, ... and a
``manifest.json`` that lists the shards with their sample counts; :class:`ShardStream` reads any
shards in this layout (img2dataset's output included) as an ``IterableDataset``.

Reading is a ``webdataset`` pipeline: shard list (``wds.SimpleShardList``, permuted per epoch) -> this
rank's shards -> this worker's shards (``wds.split_by_worker``) -> tar members -> samples
(``group_by_keys``) -> exact per-shard counts -> shuffle buffer (``wds.shuffle``) -> decode + transform.
Only the tar member reader is ours: webdataset's reads every member whole and ends a cut tar quietly,
while semmim bounds what it reads (:data:`MAX_MEMBER_BYTES`) and reports damage.

Exactly-once reading: in epoch ``e`` the shard list is permuted with a generator seeded by
``(seed, e)`` (the same on every rank); rank ``r`` of ``W`` takes ``shards[r::W]`` and DataLoader
worker ``w`` of ``K`` takes ``rank_shards[w::K]``. Every sample is therefore read once per epoch
across all ranks and workers (up to the evening-out to whole batches, see :class:`ShardStream`).
Within a worker, samples pass through a shuffle buffer seeded by ``(seed, e, r, w)``, so the order
is a function of those numbers (and of the worker count) only.

Resuming: :meth:`ShardStream.state_dict` is a worker's position (``{"epoch", "consumed"}``), which
torchdata's ``StatefulDataLoader`` saves per worker and restores before the worker iterates; the
restored stream passes over the consumed samples without decoding them.

Hostile shards: a bad sample (undecodable, too large, lost to a truncated shard, without a required
caption) is replaced by the next good one, warned about and named in the item's ``"bad"``, and
counted once in its ``"skipped"``; the trainer checks the count against ``data.max_bad_fraction``.
See :class:`ShardStream`.

Command line (:mod:`semmim.cli.data`)::

    semmim data shards --src fashion_mnist --out data/fmnist-shards --captions templates --shard-size 1000
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.tariterators import group_by_keys
from webdataset.utils import pytorch_worker_info

from semmim.data.badfiles import DataError, bad_reason
from semmim.data.datasets import (
    Sample,
    Transform,
    apply_transform,
    decode_image_file,
    image_mode_for,
)
from semmim.data.seeding import seeded
from semmim.data.shard_writer import SHARD_MANIFEST, write_shards
from semmim.data.tensor_decode import decode_image_bytes
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

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
"""Sample parts read as the image, in order of preference."""

SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
"""File endings :func:`expand_urls` picks up in a directory."""

MAX_MEMBER_BYTES: int = 64 * 2**20
"""Largest sample (its parts together) read into memory: 64 MiB. A larger part is skipped over in bounded
chunks and the sample is bad (a ``.tar.gz`` member bomb costs time, not memory)."""

MAX_IMAGE_PIXELS: int = 89_478_485
"""Largest image (width x height) decoded, Pillow's default ``Image.MAX_IMAGE_PIXELS``; a larger one is a bad
sample, read from its header without decoding (``ShardStream(max_pixels=...)`` changes it)."""

_USED_PARTS = frozenset((*IMAGE_EXTS, "txt", "cls"))
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_PROBLEM = "semmim-problem"
"""Sample part (a ``str``) saying why a sample is bad before it is decoded (too large, lost to damage)."""
_END = "__end__"
"""Key of the marker sample that closes each shard in the pipeline (a tar member with this key is ignored)."""

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


def _local_glob(path: str) -> list[str]:
    """``path``, or the sorted files a shell-style ``*`` / ``?`` / ``[...]`` pattern matches (at least one)."""
    import glob

    if not glob.has_magic(path) or Path(path).exists():
        return [path]
    found = sorted(glob.glob(path))
    if not found:
        raise FileNotFoundError(f"no shard files match {path}")
    return found


def expand_urls(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard URLs from a brace pattern, a directory, a list of them, or ``::``-separated patterns.

    A directory yields its ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` files in sorted order; a pattern such as
    ``data/shard-{000000..000009}.tar`` is brace-expanded (``{a,b}`` works too), and a local ``*`` / ``?``
    pattern (``data/shard-*.tar``) lists the files it matches in sorted order. Local files must exist;
    ``http://``, ``pipe:`` and other URLs that :func:`webdataset.gopen` opens are passed on.

    Raises:
        FileNotFoundError: a directory holds no shards, a pattern matches none, or local shard files are missing.
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
                for u in _brace_expand(part):
                    out += [u] if _is_remote(u) else _local_glob(_local(u))
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


def _image_part(parts: dict[str, Any]) -> str | None:
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


# --------------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------------


def _tar_members(urls: Iterable[dict[str, Any]], max_bytes: int, quiet: bool) -> Iterator[dict[str, Any]]:
    """Members of each shard as webdataset's ``{"fname", "data", "__url__"}``, for ``group_by_keys``.

    Unlike webdataset's reader, a sample is read only up to ``max_bytes`` (a larger part is passed over
    in bounded chunks and the sample gets a ``semmim-problem`` part instead), parts a sample does not use
    are not read (``b""``), and a shard cut or corrupt anywhere is read up to the damage with a warning
    (unless ``quiet``): the sample being read there is marked lost, since its parts may be incomplete.
    Each shard ends with a marker sample keyed :data:`_END`.
    """
    for source in urls:
        url = source["url"]
        key: str | None = None
        flagged, held, count = False, 0, 0
        damage: str | None = None

        def member(name: str, data: Any, url: str = url) -> dict[str, Any]:
            return {"fname": name, "data": data, "__url__": url}

        try:
            with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecorder) as tar:
                for m in tar:
                    split = _split_name(m.name) if m.isfile() else None
                    if split is None or split[0] == _END:
                        continue
                    if split[0] != key:
                        key, flagged, held, count = split[0], False, 0, count + 1
                    if split[1] not in _USED_PARTS or flagged:
                        yield member(m.name, b"")  # not read: tarfile skips the data in bounded chunks
                    elif held + m.size > max_bytes:
                        flagged = True
                        yield member(
                            f"{key}.{_PROBLEM}",
                            f"part {split[1]!r} of {m.size} bytes makes the sample larger than the {max_bytes}-byte "
                            f"limit (semmim.data.shards.MAX_MEMBER_BYTES)",
                        )
                    else:
                        f = tar.extractfile(m)
                        data = f.read() if f is not None else b""  # at most m.size <= max_bytes bytes
                        held += len(data)
                        yield member(m.name, data)
                damage = _damage(tar)
        except _TAR_ERRORS as err:
            damage = f"{type(err).__name__}: {err}"
        if damage is not None:
            if not quiet:
                lost = f"; sample {key!r}, being read there, is lost" if key is not None else ""
                warnings.warn(
                    f"shard {url} is truncated or corrupt after {max(0, count - 1)} samples: {damage}{lost}; "
                    f"skipping the rest of it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if key is not None and not flagged:
                yield member(f"{key}.{_PROBLEM}", f"lost: the shard is truncated or corrupt ({damage})")
        yield member(f"{_END}.end", b"")


def _open(url: str) -> Any:
    return wds.gopen(url, "rb") if _is_remote(url) else open(_local(url), "rb")  # the caller closes it


def _warn_and_continue(exn: Exception) -> bool:
    warnings.warn(f"skipping a tar member: {exn}", RuntimeWarning, stacklevel=2)
    return True


def _exact_counts(samples: Iterable[dict[str, Any]], counts: dict[str, int], quiet: bool) -> Iterator[dict[str, Any]]:
    """Samples with an image part (or a problem), exactly ``counts[url]`` of them per shard when known.

    Samples a shard lacks (truncated, corrupt, a wrong count) are made up as bad ``lost`` samples at its
    end; samples beyond the count are dropped, with a warning.
    """
    got = extra = 0
    for sample in samples:
        url, key = sample["__url__"], sample["__key__"]
        expected = counts.get(url)
        if key == _END:
            if extra and not quiet:
                warnings.warn(
                    f"shard {url} holds {got + extra} samples, more than the {expected} of its count (manifest.json "
                    f"or tar headers); the last {extra} are not read, to keep the epoch length",
                    RuntimeWarning,
                    stacklevel=2,
                )
            why = "lost: the shard holds fewer samples than its count (truncated or corrupt, or a wrong count)"
            for n in range((expected or 0) - got):
                yield {"__key__": f"#lost-{n}", "__url__": url, _PROBLEM: why}
            got = extra = 0
        elif _PROBLEM not in sample and _image_part(sample) is None:
            if not quiet:
                found = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                warnings.warn(
                    f"skipping sample {key!r} of {url}: no image part (found {found})", RuntimeWarning, stacklevel=2
                )
        elif expected is not None and got >= expected:
            extra += 1
        else:
            got += 1
            yield sample


def _mix(*values: int | str) -> int:
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sample_index(key: str) -> int:
    """A stable integer for a sample key: the number itself for numeric keys (img2dataset, ours)."""
    base = key.rpartition("/")[2]
    return int(base) if base.isdigit() else _mix("key", key)


def _share(weights: Sequence[int], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder, ties to the lower index).

    Examples:
        >>> _share([5, 3], 4), _share([10, 0, 10], 3)
        ([3, 1], [2, 0, 1])
    """
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    out = [total * w // whole for w in weights]
    by_rest = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_rest[: total - sum(out)]:
        out[i] += 1
    return out


_Loaded = tuple[Image.Image, int, str, int]
"""A decoded sample: ``(image, label, caption, index)``."""

_Slot = tuple[int, dict[str, Any], str]
"""A place in a worker's stream: ``(round, raw sample, why it is bad or "")``."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class ShardStream(IterableDataset[Sample]):
    """Streams WebDataset shards (img2dataset layout) as items like every other semmim dataset.

    Items are ``{"image": (C, H, W) float in [0, 1], "caption": str, "label": int, "index": int,
    "skipped": int, "bad": str}``: the caption is the ``.txt`` part (``""`` when absent, unless
    ``require_captions``), the label the ``.cls`` part (``-1`` when absent) and the index the sample key
    when it is a number (as :func:`write_shards` and img2dataset write them), a stable hash of it
    otherwise. The transform runs in :func:`semmim.data.seeding.seeded` with ``(seed, epoch, index)`` as
    in :class:`semmim.data.SeededDataset`. See the module docstring for the split between ranks and workers.

    Bad samples: a sample whose image does not decode, has more than ``max_pixels`` pixels or parts
    larger than :data:`MAX_MEMBER_BYTES` together, whose ``.cls`` is not an integer, whose caption is
    missing or empty while ``require_captions``, or that a truncated or corrupt shard lost (the shard
    holds fewer samples than its count) is warned about (naming shard and key) and served as the next
    good sample of the worker's stream (the first good one when none follows). That item has
    ``"skipped": 1`` and ``"bad": "<shard url>:<key>: <reason>"``; every other item has ``0`` and ``""``,
    so summing ``"skipped"`` counts each bad sample once per epoch (the trainer checks the sum against
    ``data.max_bad_fraction``; the stream never stops over it). A worker whose shards hold no good sample
    at all raises a ``RuntimeError``. Samples without an image part are dropped before shuffling (the
    header count does not count them either).

    Exact length: when the shard counts are known (``manifest.json``, or counted from local tar headers),
    each shard yields exactly its count (lost samples are bad samples, a surplus is cut with a warning) and
    the rank yields exactly ``epoch_size()`` samples; with ``batch_size`` and ``drop_last`` a DataLoader
    with any number of workers delivers exactly ``epoch_size() // batch_size`` batches per epoch. The
    rank's ``epoch_size()`` samples are split between its workers in proportion to their shards' counts
    (largest remainder: each worker's own count when ``num_samples`` is the shards' total), each share is
    rounded down to whole batches, and the largest partial batches are rounded up until the batches add
    up. A worker thus leaves out the end of its stream, or repeats its stream from the start (with another
    augmentation; a repeat counts no bad sample), by less than one batch when ``num_samples`` is the total.

    Resume: :meth:`state_dict` is ``{"epoch", "consumed"}`` of the worker (or main process) it runs in,
    the samples it has yielded this epoch; :meth:`load_state_dict` makes the next iteration pass over
    that many samples of the same stream without decoding them. ``torchdata``'s ``StatefulDataLoader``
    calls both in each worker, so ``loader.state_dict()`` resumes the epoch exactly.

    Call :meth:`set_epoch` before each epoch in the main process (the DataLoader's workers get a fresh
    copy every epoch unless ``persistent_workers``); it also counts local shards without a
    ``manifest.json`` once, before the workers start.

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
        epoch: the initial epoch.
        shuffle: permute the shards per epoch and shuffle samples; ``False`` reads in list order.
        in_chans: 3 decodes to RGB, 1 to grayscale.
        batch_size: the DataLoader's batch size; with ``drop_last`` the workers' shares are whole batches.
        drop_last: the DataLoader's ``drop_last``.
        require_captions: a sample with a missing or empty ``.txt`` is bad (set it for methods that
            train on captions, such as ``clip`` and ``rils``).
        max_pixels: largest image (width x height) decoded; a larger one is a bad sample.
        max_member_bytes: largest sample (its parts together) read into memory; a larger one is bad.
        decode: "pil" (the image reaches the transform as a PIL image) or "torchvision" (decoded by
            :func:`semmim.data.tensor_decode.decode_image_bytes` into a uint8 tensor, for the tensor transforms).

    Attributes:
        urls: the expanded shard list.
        classes: class names from ``manifest.json`` (empty when unknown).
        epoch: current epoch.

    Examples:
        >>> ds = ShardStream("data/fmnist/shard-{000000..000059}.tar", transform=None)  # doctest: +SKIP
        >>> ds.set_epoch(3)  # doctest: +SKIP
        >>> loader = StatefulDataLoader(ds, batch_size=64, num_workers=4, drop_last=True)  # doctest: +SKIP
    """

    name = "webdataset"
    decodes: tuple[str, ...] = ("pil", "torchvision")

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
        epoch: int = 0,
        shuffle: bool = True,
        in_chans: int = 3,
        batch_size: int | None = None,
        drop_last: bool = False,
        require_captions: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        decode: str = "pil",
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
        self.require_captions = bool(require_captions)
        self.max_pixels = int(max_pixels)
        self.max_member_bytes = int(max_member_bytes)
        if decode not in self.decodes:
            raise ValueError(f"decode must be one of {', '.join(self.decodes)}, got {decode!r}")
        self.decode = decode
        self.epoch = int(epoch)
        self._resume = 0  # samples the next iteration passes over (load_state_dict)
        self._consumed = 0  # samples the current iteration has yielded (state_dict)
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
        """Select the epoch (another epoch than the current one forgets a loaded resume position).

        Also counts the samples of local shards without a ``manifest.json`` (once), so that the
        DataLoader's workers inherit the counts instead of each reading every tar header again.
        """
        if int(epoch) != self.epoch:
            self._resume = 0
        self.epoch = int(epoch)
        self._known_counts()

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": int, "consumed": int}``: samples this worker's current iteration has yielded."""
        return {"epoch": self.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next iteration continues the epoch after the consumed samples."""
        if int(state["consumed"]) < 0:
            raise ValueError(f"consumed must be >= 0, got {state['consumed']}")
        self.epoch = int(state["epoch"])
        self._resume = self._consumed = int(state["consumed"])

    # ------------------------------------------------------------------ shards and sizes
    def _shard_seed(self, epoch: int | None = None) -> int | None:
        return _mix(self.seed, self.epoch if epoch is None else int(epoch), "shards") if self.shuffle else None

    def epoch_shards(self, epoch: int | None = None) -> list[str]:
        """This rank's shards in ``epoch`` (default: the current one), in reading order."""
        order = [s["url"] for s in wds.SimpleShardList(self.urls, seed=self._shard_seed(epoch))]
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
        """Samples of this rank in an epoch; exact when the shard counts are known (see the class docstring)."""
        return self.epoch_size()

    # ------------------------------------------------------------------ iteration
    def _target(self, shards: list[str], worker: int, num_workers: int) -> int | None:
        """Samples worker ``worker`` yields in the epoch (``None``: as many as its shards hold, counts unknown)."""
        counts = self._known_counts()
        if counts is None:
            return None
        if self.epoch_size() > 0 and not sum(counts[u] for u in shards):
            raise ValueError(
                f"rank {self.rank} of {self.world_size} has no samples in epoch {self.epoch} ({len(shards)} of the "
                f"{len(self.urls)} shards), but the epoch is sized to {self.epoch_size()} samples per rank"
            )
        per_worker = [sum(counts[u] for u in shards[w::num_workers]) for w in range(num_workers)]
        share = _share(per_worker, self.epoch_size())  # the shards' own counts when the epoch is their total
        unit = self.batch_size if self.batch_size and self.drop_last else 1
        batches = [n // unit for n in share]
        by_rest = sorted(range(num_workers), key=lambda w: (-(share[w] % unit), w))
        for w in by_rest[: self.epoch_size() // unit - sum(batches)]:  # the largest partial batches are filled up
            batches[w] += 1
        return batches[worker] * unit

    def _pipeline(self, worker: int, *, quiet: bool) -> wds.DataPipeline:
        """One pass over this worker's samples, undecoded, in the epoch's order."""
        counts = self._known_counts() or {}
        stages: list[Any] = [
            wds.SimpleShardList(self.urls, seed=self._shard_seed()),
            lambda src: islice(src, self.rank, None, self.world_size),
            wds.split_by_worker,
            lambda src: _tar_members(src, self.max_member_bytes, quiet),
            lambda src: group_by_keys(src, handler=_warn_and_continue),
            lambda src: _exact_counts(src, counts, quiet),
        ]
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, "samples"))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def _decode(self, raw: dict[str, Any]) -> _Loaded | str:
        """``(image, label, caption, index)`` of a sample, or why it is bad."""
        if _PROBLEM in raw:
            return str(raw[_PROBLEM])
        ext = _image_part(raw)
        assert ext is not None
        try:
            label = int(raw["cls"].decode("utf-8").strip()) if raw.get("cls") else -1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit budget below
                image: Any = (
                    decode_image_bytes(raw[ext], self.mode, self.max_pixels)
                    if self.decode == "torchvision"
                    else decode_image_file(io.BytesIO(raw[ext]), self.mode, self.max_pixels)
                )
        except Exception as err:  # PIL raises many types for corrupt data; all mean "bad sample"
            return bad_reason(err)  # one line, as on the file path (an ImageTooLargeError names the bomb limit)
        caption = raw.get("txt", b"").decode("utf-8", errors="replace")
        if self.require_captions and not caption.strip():
            return "no caption: the .txt part is missing or empty, and captions are required (require_captions)"
        return image, label, caption, _sample_index(raw["__key__"])

    def _item(self, loaded: _Loaded, slot: _Slot) -> Sample:
        """The item of ``loaded`` served at ``slot``, augmented by ``(seed, epoch, index of the slot)``.

        A sample at its own place gets the same augmentation as ever; a replacement or a repeat another one.
        """
        rnd, raw, why = slot
        image, label, caption, index = loaded
        key = raw["__key__"]
        aug = _mix(raw["__url__"], key) if key.startswith("#") else _sample_index(key)  # "#lost-n": per shard
        if rnd:
            aug = _mix(aug, "repeat", rnd)
        with seeded(self.seed, self.epoch, aug):
            tensor = apply_transform(self.transform, image)
        url = raw["__url__"]
        bad = f"{url}:{key}: {why}" if why and not rnd else ""
        if bad:
            msg = f"skipping bad sample {key!r} of {url}: {why}; replaced by the next good one"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {
            "image": tensor,
            "caption": caption,
            "label": label,
            "index": index,
            "skipped": int(bool(bad)),
            "bad": bad,
        }

    def _raw(self, worker: int, start: int, target: int | None) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(position, round, raw sample)`` of the worker's stream from ``start``; rounds repeat the stream
        until ``target`` positions are covered (the last round is read to its end, for replacements)."""
        pos = rnd = 0
        while True:
            n = 0
            for raw in self._pipeline(worker, quiet=rnd > 0):
                if pos >= start:
                    yield pos, rnd, raw
                pos, n = pos + 1, n + 1
            if n == 0 or target is None or pos >= target:
                return
            rnd += 1

    def _first_good(self, worker: int, shards: list[str]) -> _Loaded:
        for raw in self._pipeline(worker, quiet=True):
            loaded = self._decode(raw)
            if not isinstance(loaded, str):
                return loaded
        shown = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
        raise DataError(
            f"no good sample in shard(s) {shown} (rank {self.rank}, epoch {self.epoch}): all are bad (undecodable, "
            f"too large, lost or without a required caption), so none can replace them; the warnings name them"
        )

    def __iter__(self) -> Iterator[Sample]:
        start, self._resume = self._resume, 0
        self._consumed = start
        return self._generate(start)

    def _generate(self, start: int) -> Iterator[Sample]:
        _, _, worker, num_workers = pytorch_worker_info()  # as wds.split_by_worker splits
        shards = self.epoch_shards()
        target = self._target(shards, worker, num_workers)
        pending: list[_Slot] = []  # bad samples waiting for the next good one
        for pos, rnd, raw in self._raw(worker, start, target):
            inside = target is None or pos < target
            if not inside and not pending:
                break
            loaded = self._decode(raw)
            if isinstance(loaded, str):
                if inside:
                    pending.append((rnd, raw, loaded))
                continue
            for slot in pending:
                self._consumed += 1
                yield self._item(loaded, slot)
            pending = []
            if not inside:
                break
            self._consumed += 1
            yield self._item(loaded, (rnd, raw, ""))
        if pending:
            loaded = self._first_good(worker, shards[worker::num_workers])
            for slot in pending:
                self._consumed += 1
                yield self._item(loaded, slot)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.urls)} shards, seed={self.seed}, shuffle_buffer={self.shuffle_buffer}, "
            f"rank={self.rank}, world_size={self.world_size}, epoch={self.epoch})"
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

    Extra keyword arguments (``shuffle``, ``batch_size``, ``require_captions``, ...) go to :class:`ShardStream`.
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


webdataset_stream.decodes = ShardStream.decodes  # type: ignore[attr-defined]  # read by the data.decode check
