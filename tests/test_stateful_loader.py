"""Resume through torchdata's StatefulDataLoader: per-rank loader states in the checkpoint, epoch boundaries,
checkpoints without a loader state, and changed worker or rank counts.

The runs are the tiny MAE of tests/test_resume.py: 64 images in batches of 16 = 4 optimizer steps per epoch,
10 steps, a checkpoint after every step, RandAugment on. A run that crashes after step k leaves the checkpoint
of step k - 1; its resume must reach the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from semmim.config import ConfigError, load_config
from semmim.data import SeededDataset, SyntheticDataset, build_loader, train_sampler
from semmim.data.shards import write_shards
from semmim.engine import pretrain
from semmim.engine.checkpoint import CHECKSUM_KEY, content_checksum
from semmim.engine.data_state import LOADER_KEY, loader_workers, resume_position
from tests.test_resume import EPOCHS, Crash, _assert_same_run, _crash_at

CKPT = Path("checkpoints") / "last.ckpt"


def _overrides(*extra: str, workers: int = 0) -> list[str]:
    return [*[o for o in EPOCHS if not o.startswith("data.num_workers")], f"data.num_workers={workers}", *extra]


def _ckpt(run: Path) -> dict[str, Any]:
    return torch.load(run / CKPT, map_location="cpu", weights_only=True)


def _rewrite_ckpt(run: Path, state: dict[str, Any]) -> None:
    """Save an edited checkpoint with a matching checksum (as an older or another writer would have)."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = content_checksum(state)
    torch.save(state, run / CKPT)


def _crashed_run(out: Path, crash_at: int, workers: int) -> dict[str, Any]:
    with pytest.raises(Crash):
        pretrain(load_config(None, _overrides(workers=workers)), out, on_step=_crash_at(crash_at))
    ckpt = _ckpt(out)
    assert int(ckpt["step"]) == crash_at - 1
    return ckpt


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(load_config(None, _overrides()), out)
    return out


# ------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("crash_at", "epoch", "batch_in_epoch"),
    [(3, 0, 2), (5, 0, 4), (8, 1, 3)],
    ids=["mid-epoch-0", "last-step-of-epoch-0", "mid-epoch-1"],
)
def test_resume_at_any_step_is_exact(
    crash_at: int, epoch: int, batch_in_epoch: int, workers: int, reference: Path, tmp_path: Path
) -> None:
    """The checkpoint holds this rank's loader state mid-epoch and none at an epoch's last step; both resume exactly.

    The reference ran with 0 workers: the data do not depend on the worker count.
    """
    out = tmp_path / "run"
    ckpt = _crashed_run(out, crash_at, workers)
    assert (int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])) == (epoch, batch_in_epoch)
    states = ckpt[LOADER_KEY]
    if batch_in_epoch == 4:  # the epoch's last step: the next epoch starts with a fresh loader
        assert states is None
    else:
        assert len(states) == 1 and loader_workers(states[0]) == workers
    pretrain(load_config(None, _overrides(workers=workers)), out, resume=True)
    _assert_same_run(reference, out)


def test_checkpoint_without_loader_state_resumes_exactly(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mid-epoch checkpoint written before the loader state existed: the sampler skips batch_in_epoch batches."""
    out = tmp_path / "run"
    ckpt = _crashed_run(out, 7, workers=2)
    del ckpt[LOADER_KEY]
    _rewrite_ckpt(out, ckpt)
    pretrain(load_config(None, _overrides(workers=2)), out, resume=True)
    assert "no loader state: skipping the first 2 batches of epoch 1" in capsys.readouterr().out
    _assert_same_run(reference, out)


def test_map_style_resume_with_another_worker_count_is_exact(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Map-style data: the position is the sampler's, whatever the workers; 2 workers -> 0 mid-epoch is exact."""
    out = tmp_path / "run"
    _crashed_run(out, 7, workers=2)
    pretrain(load_config(None, _overrides(workers=0)), out, resume=True)
    assert "data.num_workers 2 -> 0: the sampler continues at batch 2 of epoch 1" in capsys.readouterr().out
    _assert_same_run(reference, out)


def test_resume_with_another_rank_count_mid_epoch_names_the_key(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt = _crashed_run(out, 3, workers=0)
    ckpt[LOADER_KEY] = ckpt[LOADER_KEY] * 2  # as written by 2 ranks
    _rewrite_ckpt(out, ckpt)
    with pytest.raises(ConfigError, match=r"'loader' holds the data positions of 2 rank\(s\) .* resume with 2 process"):
        pretrain(load_config(None, _overrides()), out, resume=True)


def test_stream_resume_with_another_worker_count_mid_epoch_names_the_key(tmp_path: Path) -> None:
    """A stream's positions belong to its workers: another data.num_workers mid-epoch is a one-line error."""
    shards = tmp_path / "shards"
    write_shards(SyntheticDataset(64, img_size=16, seed=3), shards, shard_size=16, image_format="png", progress=False)
    keep = [o for o in _overrides(workers=2) if not o.startswith(("data.name", "data.limit"))]
    stream = [*keep, "data.name=webdataset", f"data.root={shards}", "data.limit=null", "data.shuffle_buffer=8"]
    out = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(load_config(None, stream), out, on_step=_crash_at(3))
    assert loader_workers(_ckpt(out)[LOADER_KEY][0]) == 2
    with pytest.raises(ConfigError, match=r"'loader' holds the stream positions of 2 data worker.*data.num_workers=2"):
        pretrain(load_config(None, [*stream, "data.num_workers=0"]), out, resume=True)


# ------------------------------------------------------------------------------ the pieces
def test_resume_position_at_the_epoch_boundary_ignores_the_loader_state() -> None:
    """The past bug: a checkpoint at the epoch's last step resumed into an exhausted loader ("resume after epoch 0")."""
    state = {"epoch": 0, "batch_in_epoch": 4, LOADER_KEY: [{"_iterator_finished": False}]}
    pos = resume_position(state, rank=0, world=3, batches_per_epoch=4, num_workers=5, streaming=True)
    assert (pos.epoch, pos.batch_in_epoch, pos.loader) == (1, 0, None)
    mid = resume_position(
        {**state, "batch_in_epoch": 1}, rank=0, world=1, batches_per_epoch=4, num_workers=0, streaming=True
    )
    assert (mid.epoch, mid.batch_in_epoch, mid.loader) == (0, 1, state[LOADER_KEY][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_continues_the_epoch(workers: int) -> None:
    """A loader's state after 2 batches, loaded into a new loader, yields exactly the epoch's remaining batches."""
    ds = SeededDataset(SyntheticDataset(24, img_size=8, seed=2), seed=5)

    def loader() -> Any:
        sampler = train_sampler(ds, seed=4)
        sampler.set_epoch(3)
        return build_loader(ds, batch_size=4, num_workers=workers, pin_memory=False, sampler=sampler)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchdata's set_vital deprecation warning is filtered
        first = loader()
    full = [b["index"].tolist() for b in first]
    it = iter(first)
    seen = [next(it)["index"].tolist() for _ in range(2)]
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    rest = [b["index"].tolist() for b in second]
    assert seen + rest == full and len(full) == 6
    assert [b["index"].tolist() for b in second] == full  # the next pass is a whole epoch again
