"""Checkpoint files that are written where they land and carry a checksum of their content.

Lightning's default checkpoint IO stages a file in memory and then in ``$TMPDIR`` before moving it,
which a full temporary disk breaks and the run folder's free-space check cannot see. Here the file is
written straight to its destination (the trainer writes ``last.ckpt.tmp`` and renames it), flushed
and fsynced. Every checkpoint also records a BLAKE2b digest of its own content (every tensor's dtype,
shape and bytes, every other value's repr, in a fixed order), checked when it is loaded: a bit flipped
on the disk is an error that names the file, not a run resumed from silently damaged weights.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

CHECKSUM_KEY = "semmim_checksum"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or its content does not match its checksum."""


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_checksum(checkpoint: Mapping[str, Any]) -> str:
    """A hex digest of everything in ``checkpoint`` except the checksum itself."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to the destination itself (no staging copy), with a content checksum; verified on load.

    Args:
        required_keys: keys a loaded checkpoint must have (a missing one is an error naming the file).
    """

    def __init__(self, required_keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.required_keys = tuple(required_keys)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        state = dict(checkpoint)
        state[CHECKSUM_KEY] = content_checksum(state)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_verified(Path(path), map_location=map_location, required_keys=self.required_keys)


def load_verified(path: Path, map_location: Any = "cpu", required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), check its keys and its checksum.

    A checkpoint without a checksum (written by semmim 0.1) loads with a warning that it was not verified.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file cannot be unpickled, lacks one of ``required_keys``, or its content does not
            match its checksum.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, damaged record
        raise CheckpointError(
            f"cannot load the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it may be truncated, damaged or written by an incompatible version"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a semmim checkpoint (it holds a {type(state).__name__}, not a dict)")
    require_keys(state, required_keys, path)
    saved = state.get(CHECKSUM_KEY)
    if saved is None:
        warnings.warn(f"{path} has no checksum (written by semmim 0.1): its content is not verified", stacklevel=2)
    elif content_checksum(state) != saved:
        raise CheckpointError(
            f"the checkpoint {path} is damaged: its content does not match the checksum written with it "
            "(a disk or copy error); restore it from a backup or start the run again"
        )
    return state


def require_keys(state: Mapping[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Fail with the file and the missing keys, not a bare ``KeyError``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint {path} lacks {', '.join(repr(k) for k in missing)} (it has {', '.join(sorted(state))}); "
            "it was not written by semmim's trainer"
        )
