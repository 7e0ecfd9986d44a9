"""Where a run's data stands: saved with every checkpoint, restored by ``--resume``.

The position inside an epoch is the state of each rank's ``StatefulDataLoader``
(:func:`semmim.data.build_loader`): for map-style data, how many samples the rank's sampler has drawn;
for a stream, each worker's ``dataset.state_dict()``. The ranks' positions differ (each reads its own
part of the data), so a checkpoint stores one state per rank, ``checkpoint["loader"][rank]``, next to
``epoch`` and ``batch_in_epoch``. At an epoch boundary there is nothing to store: the next epoch starts
with a fresh loader (``checkpoint["loader"]`` is ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from semmim.config import ConfigError

LOADER_KEY = "loader"
"""The checkpoint entry holding the per-rank loader states (a list indexed by rank, or ``None``)."""
BAD_FILES_KEY = "bad_files"
"""Checkpoint key: every rank's bad files met in the current epoch before the checkpoint (``None`` at its end)."""


def loader_workers(state: Mapping[str, Any]) -> int:
    """The ``num_workers`` of the ``StatefulDataLoader`` whose ``state_dict()`` is ``state``.

    A multi-process loader's state is ``{"_snapshot": {"_main_snapshot": {"_num_workers": K, ...}, ...}}``,
    a single-process one has no ``_snapshot``.
    """
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping):
        return int(snapshot["_main_snapshot"]["_num_workers"])
    return 0


def gather_loader_states(state: Any, world: int) -> list[Any]:
    """Every rank's loader state (or another picklable value), indexed by rank (a collective call: every rank must
    make it)."""
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


@dataclass
class ResumePosition:
    """Where a resumed run continues.

    Attributes:
        epoch: the epoch to continue in.
        batch_in_epoch: batches of this rank already consumed in ``epoch`` (0: a fresh epoch).
        loader: this rank's loader state to load, or ``None``: a fresh loader, positioned by the trainer
            at ``batch_in_epoch`` when that is not 0 (a checkpoint without loader states, or map-style data
            resumed with another worker count).
        note: a line for the log when the position is not restored from the loader state.
    """

    epoch: int
    batch_in_epoch: int
    loader: dict[str, Any] | None = None
    note: str | None = None


def resume_position(
    checkpoint: Mapping[str, Any],
    *,
    rank: int,
    world: int,
    batches_per_epoch: int,
    num_workers: int,
    streaming: bool,
) -> ResumePosition:
    """The data position a resumed rank continues from.

    A checkpoint written at the last batch of an epoch (``batch_in_epoch == batches_per_epoch``) continues at
    the start of the next epoch with a fresh loader; its loader state, if any, is not used.

    Args:
        checkpoint: the loaded checkpoint (``epoch``, ``batch_in_epoch`` and optionally ``loader``).
        rank: this process's rank.
        world: the number of ranks now.
        batches_per_epoch: the batches of one rank the trainer consumes per epoch.
        num_workers: ``data.num_workers`` now.
        streaming: the data is an ``IterableDataset`` (its worker positions cannot move to other workers).

    Raises:
        ConfigError: mid-epoch, the checkpoint holds the loader states of another number of ranks, or of
            another number of workers for streamed data.
    """
    epoch, done = int(checkpoint["epoch"]), int(checkpoint["batch_in_epoch"])
    if done >= batches_per_epoch:
        return ResumePosition(epoch + 1, 0)
    if done == 0:
        return ResumePosition(epoch, 0)
    states = checkpoint.get(LOADER_KEY)
    if states is None:
        return ResumePosition(
            epoch, done, note=f"the checkpoint has no loader state: skipping the first {done} batches of epoch {epoch}"
        )
    if len(states) != world:
        raise ConfigError(
            f"the checkpoint's '{LOADER_KEY}' holds the data positions of {len(states)} rank(s) in the middle of "
            f"epoch {epoch}, this run has {world}: resume with {len(states)} process(es) (trainer.devices x "
            "trainer.num_nodes)"
        )
    mine = states[rank]
    saved = loader_workers(mine)
    if saved == num_workers:
        return ResumePosition(epoch, done, loader=mine)
    if streaming:
        raise ConfigError(
            f"the checkpoint's '{LOADER_KEY}' holds the stream positions of {saved} data worker(s) per rank in the "
            f"middle of epoch {epoch}: resume with data.num_workers={saved} (it may change at an epoch boundary)"
        )
    return ResumePosition(
        epoch,
        done,
        note=f"data.num_workers {saved} -> {num_workers}: the sampler continues at batch {done} of epoch {epoch}",
    )
