"""Checkpoint writing that stages nothing outside the checkpoint's own folder.

Lightning Fabric's default ``TorchCheckpointIO.save_checkpoint`` (``lightning_fabric.utilities.cloud_io.
_atomic_save``) serialises the whole checkpoint into an in-memory buffer and writes it through an fsspec
transaction, whose local file system stages the bytes in ``tempfile.mkstemp()`` -- in ``$TMPDIR``, often
another (small, RAM-backed) disk that a free-space check of the run directory does not see -- and then
moves them over (a copy across file systems). :class:`DirectCheckpointIO` writes the file in place instead
(the caller already writes to ``last.ckpt.tmp`` next to ``last.ckpt`` and renames it), with an ``fsync``,
so the only disk involved is the run directory's.

Use it as ``Fabric(..., plugins=[DirectCheckpointIO()])``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["DirectCheckpointIO", "save_in_place"]


def save_in_place(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` straight into ``path`` (no temporary file elsewhere, no in-memory copy), then ``fsync``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class DirectCheckpointIO(TorchCheckpointIO):
    """A Fabric checkpoint plugin whose saves touch only the destination's folder (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("DirectCheckpointIO.save_checkpoint takes no storage_options")
        save_in_place(checkpoint, path)
