"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch shuffling, sharded across ranks, with mid-epoch resume.

    Epoch ``e`` uses the permutation of a ``torch.Generator`` seeded with ``seed + e`` (or
    ``0 .. num_samples - 1`` without shuffling). The list is truncated (``drop_last``) or padded by
    repeating its start to a multiple of ``world_size``; rank ``r`` takes ``indices[r::world_size]``.
    Shards are disjoint, and their union is every index when ``num_samples`` is divisible by
    ``world_size``.

    To resume after ``b`` batches of size ``B`` in epoch ``e``: ``set_epoch(e); set_start(b * B)``
    (or ``load_state_dict`` of a saved ``{"epoch": e, "start": b * B}``). The sampler does not count
    what the DataLoader consumed (the loader prefetches ahead), so the trainer provides ``start``.

    Args:
        num_samples: dataset length.
        shuffle: shuffle every epoch.
        seed: base seed (same on every rank).
        rank: this process's rank.
        world_size: number of ranks.
        drop_last: truncate instead of pad to a multiple of ``world_size``.

    Examples:
        >>> s = ResumableSampler(10, shuffle=False, rank=1, world_size=2)
        >>> list(s)
        [1, 3, 5, 7, 9]
        >>> s.set_start(3); list(s), len(s)
        ([7, 9], 2)
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start = 0

    @property
    def shard_size(self) -> int:
        """Number of indices of one rank in a full epoch."""
        n, w = self.num_samples, self.world_size
        if self.drop_last:
            return n // w
        return -(-n // w) if n else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one resets the start to 0."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's shard in the current epoch."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = int(start)

    def epoch_indices(self) -> list[int]:
        """This rank's full shard for the current epoch (ignoring ``start``)."""
        n, w = self.num_samples, self.world_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.shard_size * w
        if total <= n:
            order = order[:total]
        else:
            reps = -(-(total - n) // n)
            order = (order + order * reps)[:total]
        return order[self.rank :: w]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.shard_size - self.start)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": int, "start": int}``."""
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        missing = {"epoch", "start"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.epoch = int(state["epoch"])
        self.set_start(int(state["start"]))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, shuffle={self.shuffle}, "
            f"seed={self.seed}, rank={self.rank}, world_size={self.world_size}, drop_last={self.drop_last}, "
            f"epoch={self.epoch}, start={self.start})"
        )
