"""One seeded-randomness primitive for every data path: a sample's draws are a function of ``(seed, epoch, index)``.

Augmentations draw from three generators: torch's CPU generator (torchvision transforms), Python's ``random``
(some torchvision v2 and timm ops) and NumPy's legacy global generator (timm's RandAugment picks its ops with
it). :func:`seeded` seeds all three from :func:`sample_seed` for the duration of a block and restores them
afterwards, so a sample looks the same whichever worker, process or resumed run draws it, and the caller's
random state is untouched. Map-style datasets (:class:`semmim.data.SeededDataset`), WebDataset shards
(:class:`semmim.data.ShardStream`) and the segmentation transforms all go through it.

Examples:
    >>> import torch
    >>> with seeded(0, 1, 7):
    ...     a = torch.rand(2)
    >>> with seeded(0, 1, 7):
    ...     b = torch.rand(2)
    >>> bool((a == b).all())
    True
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["sample_seed", "seeded"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, epoch, index)`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(b"%d,%d,%d" % (int(seed), int(epoch), int(index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[int]:
    """Seed torch (CPU), Python's ``random`` and NumPy's global generator from ``(seed, epoch, index)``.

    The three generators are restored when the block ends (also on an exception). Yields the sample seed.
    CUDA generators are neither seeded nor touched (``torch.manual_seed`` would reseed them).
    """
    s = sample_seed(seed, epoch, index)
    py_state = random.getstate()
    np_state = np.random.get_state(legacy=False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        try:
            yield s
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
