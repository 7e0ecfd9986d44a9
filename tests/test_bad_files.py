"""Bad image files: each counted once per epoch, named, and the data.max_bad_fraction limit applied as batches come.

The report behind these tests (issue #15): 2 bad files of 44 were reported as 3, and the over-the-limit error
came at the end of the run, as a worker traceback.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semmim.config import load_config
from semmim.data import DataError, EpochBadFiles, ImageFolderDataset, SeededDataset, one_line_error, train_sampler
from semmim.engine.metrics import read_metrics
from semmim.engine.trainer import pretrain
from tests.conftest import tiny_overrides

N_FILES = 44
BATCH = 4


def _folder(root: Path, bad: dict[int, bytes]) -> list[Path]:
    """``N_FILES`` PNGs in sorted order; those at the positions in ``bad`` hold the given (broken) bytes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = [root / f"img{i:02d}.png" for i in range(N_FILES)]
    for i, p in enumerate(paths):
        if i in bad:
            p.write_bytes(bad[i])
        else:
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
    return paths


TWO_BAD = {20: b"\xff\xd8\xff\xe0 not a jpeg", 21: b""}
"""Two broken files next to each other in sorted order: the substitute of the first is the second."""


def _overrides(root: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        "data.name=imagefolder",
        f"data.root={root}",
        "data.limit=null",
        f"data.batch_size={BATCH}",
        "trainer.log_every_n_steps=1",
        *extra,
    )


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("workers", [0, 2])
def test_two_bad_files_of_44_are_counted_exactly_once_per_epoch_and_named(
    tmp_path: Path, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _folder(tmp_path / "imgs", TWO_BAD)
    steps_per_epoch = N_FILES // BATCH
    cfg = load_config(
        None,
        _overrides(
            tmp_path / "imgs",
            f"data.num_workers={workers}",
            "data.max_bad_fraction=0.05",  # 2 of 44 allowed
            f"trainer.max_steps={2 * steps_per_epoch}",
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = pretrain(cfg, tmp_path / "run")
    assert result.steps == 2 * steps_per_epoch
    printed = capsys.readouterr().out
    for epoch in (0, 1):  # per-epoch semantics: the same 2 files again in epoch 1, never 3 nor 4 in one epoch
        assert f"epoch {epoch}: skipped 2 unreadable image(s) in {N_FILES} samples" in printed
    events = _events(tmp_path / "run")
    assert [e["skipped_images"] for e in events] == [2, 2]
    bad_paths = sorted(str(paths[i]) for i in TWO_BAD)
    for e in events:
        assert sorted(entry.partition(": ")[0] for entry in e["bad_files"]) == bad_paths
        assert all(entry.partition(": ")[2] for entry in e["bad_files"])  # each with its reason


@pytest.mark.parametrize(("in_worker", "epoch", "warns"), [(True, 0, True), (True, 2, False), (False, 2, True)])
def test_loader_workers_name_a_bad_file_in_a_warning_only_in_the_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_worker: bool, epoch: int, warns: bool
) -> None:
    """Workers are fresh copies every epoch, without what the last ones learnt: without the epoch rule each epoch
    repeated every file's warning (12 lines for 4 files over 3 epochs). A worker warns in the first epoch only
    (the trainer's per-epoch line names the files after it); the main process remembers, so it warns once."""
    import semmim.data.datasets as datasets_module

    _folder(tmp_path / "imgs", TWO_BAD)
    monkeypatch.setattr(datasets_module, "get_worker_info", lambda: object() if in_worker else None)
    ds = SeededDataset(ImageFolderDataset(tmp_path / "imgs", max_bad_fraction=0.0))
    ds.set_epoch(epoch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = ds[20]
    assert item["skipped"] == 1
    assert any("skipping unreadable image" in str(w.message) for w in caught) == warns


def test_items_carry_skipped_and_the_bad_file_they_replaced(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    paths = _folder(tmp_path / "imgs", TWO_BAD)
    ds = SeededDataset(ImageFolderDataset(tmp_path / "imgs", max_bad_fraction=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        items = [ds[i] for i in range(len(ds))]
        batches = list(DataLoader(ds, batch_size=BATCH, num_workers=2))
    assert [i for i, it in enumerate(items) if it["skipped"]] == sorted(TWO_BAD)
    assert items[20]["bad"].startswith(f"{paths[20]}: ") and items[21]["bad"].startswith(f"{paths[21]}: ")
    assert all(it["bad"] == "" for i, it in enumerate(items) if i not in TWO_BAD)
    assert "\n" not in items[20]["bad"] + items[21]["bad"]
    # the default collate: a list of str per batch; both workers met both files, each is named once per index
    flat = [b for batch in batches for b in batch["bad"]]
    assert all(isinstance(batch["bad"], list) for batch in batches)
    assert sorted(b.partition(": ")[0] for b in flat if b) == [str(paths[20]), str(paths[21])]


def test_epoch_tally_counts_a_file_once_however_many_items_name_it() -> None:
    tally = EpochBadFiles(0.05, N_FILES)
    assert tally.limit == 2
    tally.add(["", "a.jpg: OSError: truncated", ""])
    tally.add(["a.jpg: OSError: truncated", "b.png: SyntaxError: not a PNG file"])  # a.jpg from another worker
    assert len(tally) == 2
    with pytest.raises(DataError) as info:
        tally.add(["c.png: OSError: x", "d.png: OSError: y"])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.max_bad_fraction=0.05 allows 2 bad images per epoch of 44; 4 found so far: ")
    assert "a.jpg (OSError: truncated), b.png (SyntaxError: not a PNG file), c.png (OSError: x) and 1 more" in msg
    assert msg.endswith("fix or remove them, or raise data.max_bad_fraction")
    tally.reset()
    assert len(tally) == 0
    assert EpochBadFiles(0.0, 10).limit == 1  # one bad file is always tolerated


def _order(seed: int) -> list[int]:
    """The training order of epoch 0 of the 44 files in one process."""
    return list(train_sampler(range(N_FILES), seed=seed))


def _crossing_batch(cfg_seed: int, bad: list[int]) -> int:
    """The batch of epoch 0 in which the second of ``bad`` is requested (the sampler's order)."""
    order = _order(cfg_seed)
    positions = sorted(order.index(i) for i in bad)
    return positions[1] // BATCH


@pytest.mark.parametrize("workers", [0, 2])
def test_crossing_the_limit_stops_at_that_batch_with_one_line_naming_the_files(tmp_path: Path, workers: int) -> None:
    overrides = _overrides(tmp_path / "imgs", f"data.num_workers={workers}", "data.max_bad_fraction=0.01")
    cfg = load_config(None, [*overrides, "trainer.max_steps=22"])
    order = _order(cfg.trainer.seed)
    bad = {order[1]: b"", order[9]: b"GIF89a broken"}  # requested in batches 0 and 2 of the 11 of epoch 0
    paths = _folder(tmp_path / "imgs", bad)
    assert _crossing_batch(cfg.trainer.seed, list(bad)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(DataError) as info:
            pretrain(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.max_bad_fraction=0.01 allows 1 bad image per epoch of 44; 2 found so far: ")
    for i in bad:
        assert str(paths[i]) in msg
    assert msg.endswith("or raise data.max_bad_fraction")
    # stopped when batch 2 arrived: the 2 batches before it trained, nothing after it did
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert _events(tmp_path / "run") == []  # not at the end of the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_mid_epoch_still_counts_the_files_met_before_the_checkpoint(tmp_path: Path, workers: int) -> None:
    """The checkpoint keeps each rank's bad files of the epoch so far: the one met in batch 0 and the one in
    batch 2 together cross the limit of 1, although the crash came between them."""
    from semmim.engine.data_state import BAD_FILES_KEY
    from tests.test_resume import Crash, _crash_at

    overrides = _overrides(
        tmp_path / "imgs",
        f"data.num_workers={workers}",
        "data.max_bad_fraction=0.01",
        "trainer.max_steps=22",
        "trainer.ckpt_every_n_steps=1",
    )
    cfg = load_config(None, overrides)
    order = _order(cfg.trainer.seed)
    bad = {order[1]: b"", order[9]: b"GIF89a broken"}  # requested in batches 0 and 2
    paths = _folder(tmp_path / "imgs", bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(Crash):
            pretrain(cfg, tmp_path / "run", on_step=_crash_at(2))  # the checkpoint of step 1: batch 0 read
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert int(ckpt["step"]) == 1
        assert [e.partition(": ")[0] for e in ckpt[BAD_FILES_KEY][0]] == [str(paths[order[1]])]
        with pytest.raises(DataError, match="allows 1 bad image per epoch of 44; 2 found so far: ") as info:
            pretrain(load_config(None, overrides), tmp_path / "run", resume=True)
    assert str(paths[order[1]]) in str(info.value) and str(paths[order[9]]) in str(info.value)
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 2  # stopped when batch 2 arrived


def _cli_error_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> list[str]:
    """Run ``semmim pretrain`` (in this process); its exit status must be 2 and stderr hold no traceback."""
    from semmim.cli import main

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = main(["pretrain", "--config", "demo/mae", "--out", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("semmim pretrain: error:")]


def test_cli_prints_the_over_the_limit_error_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEMMIM_DEBUG", raising=False)
    paths = _folder(tmp_path / "imgs", TWO_BAD)
    overrides = _overrides(
        tmp_path / "imgs", "data.num_workers=2", "data.max_bad_fraction=0.01", "trainer.max_steps=11"
    )
    errors = _cli_error_lines(tmp_path, capsys, *overrides)
    assert len(errors) == 1
    assert "data.max_bad_fraction=0.01 allows 1 bad image per epoch of 44; 2 found so far" in errors[0]
    assert str(paths[20]) in errors[0] and str(paths[21]) in errors[0]


def test_cli_shows_a_worker_that_decodes_nothing_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEMMIM_DEBUG", raising=False)
    _folder(tmp_path / "imgs", {i: b"junk" for i in range(N_FILES)})
    overrides = _overrides(tmp_path / "imgs", "data.num_workers=2", "data.max_bad_fraction=1.0", "trainer.max_steps=2")
    errors = _cli_error_lines(tmp_path, capsys, *overrides)
    assert len(errors) == 1
    assert errors[0].startswith("semmim pretrain: error: DataLoader worker ")
    assert "DataError: no image of" in errors[0] and "could be decoded" in errors[0]


def test_worker_traceback_is_cut_to_its_last_line() -> None:
    text = (
        "Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise DataError("none")\nsemmim.data.badfiles.DataError: none decoded\n'
    )
    assert one_line_error(DataError(text)) == "DataLoader worker 1: DataError: none decoded"
    assert one_line_error(ValueError("plain")) == "plain"


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` pixels, with one empty data chunk (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_a_header_claiming_a_huge_image_is_a_bad_file_with_a_clear_reason(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    _png_header_only(root / "a_bomb.png", 12000, 12000)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b_ok.png")
    assert (root / "a_bomb.png").stat().st_size < 100
    ds = SeededDataset(ImageFolderDataset(root, max_bad_fraction=1.0))  # data.max_image_pixels: 64 M by default
    with pytest.warns(RuntimeWarning, match="a decompression bomb"):
        item = ds[0]
    assert item["skipped"] == 1 and item["image"].shape == (3, 8, 8)
    reason = "12000x12000 = 144 Mpx, more than data.max_image_pixels=64000000 (a decompression bomb?)"
    assert item["bad"] == f"{root / 'a_bomb.png'}: {reason}"


def test_pillows_own_bomb_error_and_warning_never_escape(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    _png_header_only(root / "a_error.png", 20000, 20000)  # over 2x Pillow's limit: DecompressionBombError
    _png_header_only(root / "b_warn.png", 10000, 10000)  # over Pillow's limit: DecompressionBombWarning
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "c_ok.png")
    ds = SeededDataset(ImageFolderDataset(root, max_bad_fraction=1.0, max_image_pixels=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # even as an error it is a bad file
        items = [ds[i] for i in range(3)]
    assert items[0]["bad"].startswith(f"{root / 'a_error.png'}: DecompressionBombError: ")
    assert "could be decompression bomb" in items[0]["bad"]
    assert "DecompressionBombWarning" in items[1]["bad"]
    assert [it["skipped"] for it in items] == [1, 1, 0]
    assert all(it["image"].shape == (3, 8, 8) for it in items)


class _MeanTokens(torch.nn.Module):
    """A stand-in encoder: ``forward_features`` gives (N, 1 + 1, C) tokens (channel means)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, None, :].expand(-1, 2, -1)


def test_feature_extraction_reads_the_bad_field_and_stops_over_one_percent(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from semmim.eval.features import extract_features

    _folder(tmp_path / "one", {3: b"junk"})
    _folder(tmp_path / "three", {3: b"junk", 7: b"", 30: b"GIF89a"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = DataLoader(SeededDataset(ImageFolderDataset(tmp_path / "one")), batch_size=8, num_workers=2)
        feats, labels = extract_features(_MeanTokens(), loader, [0.5] * 3, [0.25] * 3)
        assert feats["cls"].shape == (N_FILES, 3) and labels.shape == (N_FILES,)
        loader = DataLoader(SeededDataset(ImageFolderDataset(tmp_path / "three")), batch_size=8)
        with pytest.raises(DataError) as info:
            extract_features(_MeanTokens(), loader, [0.5] * 3, [0.25] * 3)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("max_bad_fraction=0.01 allows 1 bad image per split of 44; 3 found")
    # no "or raise max_bad_fraction": the evaluations have no such key
    assert msg.endswith(": fix or remove them (an evaluation's limit is fixed: substitutes would bias its accuracy)")
    assert "img07.png" in msg


@pytest.mark.slow
def test_two_gloo_ranks_count_the_distinct_bad_files_of_the_epoch(tmp_path: Path) -> None:
    """Each rank counts its own share; the end-of-epoch line gathers the names over the ranks."""
    paths = _folder(tmp_path / "imgs", {5: b"junk", **TWO_BAD})
    overrides = _overrides(
        tmp_path / "imgs",
        "data.num_workers=1",
        "data.max_bad_fraction=0.2",  # 4 per rank's 22
        "trainer.max_steps=5",  # one epoch: 2 ranks x 5 batches of 4
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-W", "ignore", "-m", "semmim.cli", "pretrain", "--config", "demo/mae"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "run"), *overrides], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = load_config(None, overrides).trainer.seed
    order = _order(seeds)[:40]  # what the 2 ranks read
    expected = sorted(str(paths[i]) for i in (5, *TWO_BAD) if i in order)
    (event,) = _events(tmp_path / "run")
    assert event["skipped_images"] == len(expected) and event["samples"] == 40
    assert sorted(e.partition(": ")[0] for e in event["bad_files"]) == expected
    assert f"epoch 0: skipped {len(expected)} unreadable image(s) in 40 samples" in proc.stdout


@pytest.mark.parametrize("decode", ["pil", "torchvision"])
def test_reason_of_an_unidentifiable_file_names_no_file_object(tmp_path: Path, decode: str) -> None:
    """The fast path decodes from bytes (PIL names an ``<_io.BytesIO object at 0x...>``): the reason must not
    carry that address, which differs from run to run and says nothing."""
    from semmim.data.badfiles import bad_reason
    from semmim.data.datasets import decode_image
    from semmim.data.tensor_decode import decode_image_tensor

    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\x01" * 500)
    with pytest.raises(Exception) as info:
        (decode_image_tensor if decode == "torchvision" else decode_image)(path)
    assert bad_reason(info.value) == "UnidentifiedImageError: cannot identify image file"
