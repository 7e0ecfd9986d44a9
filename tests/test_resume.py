"""Exact resume at any step of any epoch: map-style data and shards, RandAugment on, 1 and 2 processes.

Each test compares a run that was interrupted and resumed with one that was not, bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semmim.config import load_config
from semmim.data import SyntheticDataset
from semmim.data.shards import write_shards
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from tests.conftest import tiny_overrides

SEMMIM = str(Path(sys.executable).with_name("semmim"))
RAND_AUG = "data.rand_augment=rand-m9-mstd0.5-inc1"
# 64 images / batch 16 = 4 optimizer steps per epoch; 10 steps cross two epoch boundaries
EPOCHS = tiny_overrides("data.batch_size=16", "trainer.max_steps=10", "trainer.ckpt_every_n_steps=1", RAND_AUG)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder.safetensors"))


def _assert_same_run(ref: Path, got: Path) -> None:
    a, b = _weights(ref), _weights(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    assert [r["loss"] for r in read_metrics(got)] == [r["loss"] for r in read_metrics(ref)]


class Crash(Exception):
    pass


def _crash_at(k: int):  # type: ignore[no-untyped-def]
    def on_step(step: int, loss: float) -> None:
        if step == k:
            raise Crash

    return on_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(load_config(None, EPOCHS), out)
    return out


@pytest.mark.parametrize("crash_at", [4, 5, 6, 9])
def test_resume_in_any_epoch_is_exact(crash_at: int, reference: Path, tmp_path: Path) -> None:
    """Crash after step k (its checkpoint not yet written), resume from step k-1: epoch 0's end, epoch 1, epoch 2.

    Before the fix, Lightning's loader wrapper reset the sampler to epoch 0 on resume (it counts iter() calls).
    """
    cfg = load_config(None, EPOCHS)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(cfg, out, on_step=_crash_at(crash_at))
    assert int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"]) == crash_at - 1
    pretrain(cfg, out, resume=True)
    _assert_same_run(reference, out)


def test_sigkill_in_a_later_epoch_with_workers_resumes_exactly(tmp_path: Path) -> None:
    """A real SIGKILL in epoch 1 with 2 DataLoader worker processes; --resume gives the same weights."""
    overrides = [o for o in EPOCHS if not o.startswith("data.num_workers")] + ["data.num_workers=2"]
    ref = tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEMMIM_FAULT", None)
    done = subprocess.run([SEMMIM, "pretrain", "--config", "demo/mae", "--out", str(ref), *overrides], env=env)
    assert done.returncode == 0
    out = tmp_path / "run"
    kill_env = {**env, "SEMMIM_FAULT": "kill_after_step:7"}
    killed = subprocess.run(
        [SEMMIM, "pretrain", "--config", "demo/mae", "--out", str(out), *overrides], env=kill_env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [SEMMIM, "pretrain", "--out", str(out), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 7" in resumed.stdout
    _assert_same_run(ref, out)


# ------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(SyntheticDataset(64, img_size=16, seed=3), out, shard_size=16, image_format="png", progress=False)
    return out


def _shard_overrides(shards: Path, *extra: str) -> list[str]:
    keep = [o for o in EPOCHS if not o.startswith(("data.name", "data.limit"))]
    return [*keep, "data.name=webdataset", f"data.root={shards}", "data.limit=null", "data.shuffle_buffer=8", *extra]


@pytest.mark.parametrize("crash_at", [3, 6])
def test_resume_on_shards_is_exact(crash_at: int, shards: Path, tmp_path: Path) -> None:
    """WebDataset shards with RandAugment: a crash in epoch 0 or 1 resumes to the same weights."""
    cfg = load_config(None, _shard_overrides(shards))
    ref = tmp_path / "ref"
    pretrain(cfg, ref)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(cfg, out, on_step=_crash_at(crash_at))
    pretrain(cfg, out, resume=True)
    _assert_same_run(ref, out)


# ------------------------------------------------------------------------------------- 2 processes
def _cli(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEMMIM_FAULT", None)
    return subprocess.run([SEMMIM, "pretrain", "--out", str(out), *args], env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["map", "shards"])
def test_two_processes_resume_exactly_in_a_later_epoch(data: str, shards: Path, tmp_path: Path) -> None:
    """2 gloo processes: a run stopped at step 6 (epoch 1 of 2 x 2 steps) and resumed equals one that went on.

    A constant learning rate (min_lr = lr, no warmup) makes the schedule independent of trainer.max_steps,
    so the first run can simply end at step 6 and the resume extend it (an allowed change).
    """
    base = EPOCHS if data == "map" else _shard_overrides(shards)
    common = [
        *[o for o in base if not o.startswith(("trainer.devices", "trainer.max_steps", "data.batch_size"))],
        "data.batch_size=8",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "optim.warmup_steps=0",
        "optim.min_lr=1e-3",
    ]
    ref, out = tmp_path / "ref", tmp_path / "run"
    done = _cli(ref, "--config", "demo/mae", *common, "trainer.max_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    first = _cli(out, "--config", "demo/mae", *common, "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], len(ckpt["loader"])) == (1, 2, 2)  # one loader state per rank
    resumed = _cli(out, "--resume", "trainer.max_steps=10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6" in resumed.stdout and "trainer.max_steps 6 -> 10" in resumed.stdout
    _assert_same_run(ref, out)


def test_a_resume_on_data_of_another_size_says_it_is_not_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files added to an image folder between the crash and the resume: the sampler's position no longer means
    the same samples, which the resume says instead of continuing silently."""
    import numpy as np
    from PIL import Image

    from semmim.config import load_config
    from semmim.engine.trainer import DATA_SIZE_KEY, pretrain
    from tests.conftest import tiny_overrides

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)

    def add(names: range) -> None:
        for i in names:
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")

    add(range(16))
    over = tiny_overrides("data.name=imagefolder", f"data.root={root}", "data.limit=null", "data.batch_size=4")
    pretrain(load_config(None, [*over, "trainer.max_steps=2"]), tmp_path / "run")  # ends in the middle of epoch 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt[DATA_SIZE_KEY] == 16
    capsys.readouterr()
    pretrain(load_config(None, [*over, "trainer.max_steps=3"]), tmp_path / "run", resume=True)
    assert "warning: the training data" not in capsys.readouterr().out  # the same data: silent
    add(range(16, 20))
    pretrain(load_config(None, [*over, "trainer.max_steps=4"]), tmp_path / "run", resume=True)
    out = capsys.readouterr().out
    assert "warning: the training data has 20 samples now, 16 when the checkpoint was written: the rest of epoch 0" in (
        out
    )
