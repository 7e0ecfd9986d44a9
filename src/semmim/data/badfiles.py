"""Bad files: how an item names the broken file it replaced, and how the trainer counts them per epoch.

The item protocol, shared by every dataset that feeds the trainer (image folders, manifests, shards):

* ``"skipped": int``: 1 when the item replaces a bad sample, else 0;
* ``"bad": str``: ``""``, or ``"<path>: <reason>"`` of the bad file the item replaced (one line).

The default collate turns ``"bad"`` into a ``list[str]`` per batch. The main process keeps the *distinct*
bad names of the current epoch in an :class:`EpochBadFiles` (a file met by several workers, or twice in one
epoch, counts once) and checks the ``data.max_bad_fraction`` limit after every batch, so a run stops at the
batch where the limit is crossed, with a one-line :class:`DataError`. Workers never raise that error; they
only raise (a :class:`DataError`) when no sample at all can be decoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["DataError", "EpochBadFiles", "ImageTooLargeError", "bad_entry", "bad_reason", "one_line_error"]

REASON_CHARS = 240
"""Longest reason kept in a ``"bad"`` entry (a corrupt file can make PIL write long messages)."""

SHOWN = 3
"""Bad files named in the over-the-limit error."""


class DataError(RuntimeError):
    """The data cannot be trained on (too many unreadable files, none decodable); the message is one line."""


class ImageTooLargeError(ValueError):
    """An image whose header announces more pixels than the decoding budget allows."""


_FILE_OBJECT = re.compile(r" ?<(?:_io\.\w+ name=[^>]*|[^<>]* at 0x[0-9a-fA-F]+)>")
"""Object reprs PIL puts in its messages (``<_io.BufferedReader name=12>``, ``<... object at 0x7f...>``): run-dependent
noise, removed so that a reason is the same in every run."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def bad_reason(err: BaseException) -> str:
    """Why a file is bad, on one line: ``"OSError: cannot identify image file ..."``.

    An :class:`ImageTooLargeError` message already says what is wrong and is kept
    without its class name.
    """
    text = _FILE_OBJECT.sub("", _one_line(str(err)))  # PIL names the open file object, not the path
    if isinstance(err, ImageTooLargeError) and text:
        reason = text
    else:
        reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def bad_entry(path: str, err: BaseException) -> str:
    """The ``"bad"`` field of an item that replaced ``path``: ``"<path>: <reason>"``."""
    return f"{path}: {bad_reason(err)}"


def _path_of(entry: str) -> str:
    return entry.partition(": ")[0]


class EpochBadFiles:
    """The distinct bad files of one epoch on one rank, checked against ``data.max_bad_fraction`` as batches come.

    Args:
        max_bad_fraction: the tolerated share of bad files per epoch.
        epoch_size: samples in a full epoch on this rank (known before the epoch starts).
        key: the config key named in the error.
        remedy: what the error advises (default: fix or remove the files, or raise ``key``).
        per: what ``epoch_size`` counts, for the error ("epoch").

    Examples:
        >>> tally = EpochBadFiles(0.01, 44)
        >>> tally.add(["", "a.jpg: OSError: truncated", "", "a.jpg: OSError: truncated"])
        >>> len(tally), tally.limit
        (1, 1)
        >>> tally.add(["b.png: SyntaxError: not a PNG file"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        semmim.data.badfiles.DataError: data.max_bad_fraction=0.01 allows 1 bad image per epoch of 44; 2 found ...
    """

    def __init__(
        self,
        max_bad_fraction: float,
        epoch_size: int,
        key: str = "data.max_bad_fraction",
        remedy: str | None = None,
        per: str = "epoch",
    ) -> None:
        self.max_bad_fraction = float(max_bad_fraction)
        self.epoch_size = int(epoch_size)
        self.key = key
        self.remedy = remedy if remedy is not None else f"fix or remove them, or raise {key}"
        self.per = per
        self.found: dict[str, str] = {}
        """Path -> ``"<path>: <reason>"``, in the order first met."""

    @property
    def limit(self) -> int:
        """The most bad files an epoch may hold: ``max(1, floor(max_bad_fraction * epoch_size))``."""
        return max(1, int(self.max_bad_fraction * self.epoch_size))

    def __len__(self) -> int:
        return len(self.found)

    @property
    def entries(self) -> list[str]:
        """The epoch's distinct ``"<path>: <reason>"`` entries, in the order first met."""
        return list(self.found.values())

    def reset(self) -> None:
        """Forget the bad files (a new epoch starts)."""
        self.found.clear()

    def record(self, bad: Iterable[str]) -> None:
        """Record a batch's ``"bad"`` entries (empty strings are good items) without checking the limit."""
        for entry in bad:
            if entry:
                self.found.setdefault(_path_of(entry), _one_line(entry))

    def check(self) -> None:
        """Raise :class:`DataError` (one line) when more distinct bad files than :attr:`limit` were recorded."""
        if len(self.found) > self.limit:
            raise DataError(self.message())

    def add(self, bad: Iterable[str]) -> None:
        """Record a batch's ``"bad"`` entries and check the limit.

        Raises:
            DataError: the epoch now holds more distinct bad files than :attr:`limit` (one line).
        """
        self.record(bad)
        self.check()

    def message(self) -> str:
        """The one-line over-the-limit error naming the key, the count, the limit and the first files."""
        n, limit = len(self.found), self.limit
        shown = [f"{path} ({entry[len(path) + 2 :]})" for path, entry in list(self.found.items())[:SHOWN]]
        more = f" and {n - SHOWN} more" if n > SHOWN else ""
        images = "image" if limit == 1 else "images"
        return (
            f"{self.key}={self.max_bad_fraction:g} allows {limit} bad {images} per {self.per} of {self.epoch_size}; "
            f"{n} found so far: {', '.join(shown)}{more}: {self.remedy}"
        )


_WORKER_MARK = "in DataLoader worker process"


def one_line_error(err: BaseException) -> str:
    """``str(err)`` on one line; an error re-raised from a DataLoader worker is cut to its original last line.

    PyTorch re-raises a worker's exception in the main process with the worker's traceback in the message
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); this keeps the worker
    number and the original error (``"DataError: no image of ... could be decoded"``).

    Examples:
        >>> one_line_error(DataError("Caught DataError in DataLoader worker process 1.\\nOriginal Traceback "
        ...     "(most recent call last):\\n  File 'x.py', line 1\\nsemmim.data.badfiles.DataError: none decoded\\n"))
        'DataLoader worker 1: DataError: none decoded'
    """
    text = str(err)
    if _WORKER_MARK in text and "\n" in text:
        head, _, rest = text.partition("\n")
        worker = head.rsplit(" ", 1)[-1].rstrip(".")
        lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
        last = lines[-1] if lines else head
        name, sep, message = last.partition(": ")
        if sep and " " not in name:  # "package.module.ErrorClass: message"
            last = f"{name.rsplit('.', 1)[-1]}: {message}"
        return f"DataLoader worker {worker}: {_one_line(last)}"
    return _one_line(text) if "\n" in text else text
