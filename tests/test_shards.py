"""WebDataset shards: bad, lost and oversized samples, truncation, exact epoch length, resume (StatefulDataLoader)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

import semmim
from semmim.config import DataConfig
from semmim.data import ShardStream, build_dataset, count_shard_samples
from semmim.data.datasets import pil_to_tensor01

BLOCK = 512


def _png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(i: int, **extra: bytes) -> tuple[str, dict[str, bytes]]:
    return f"{i:06d}", {"png": _png(i), "txt": f"caption {i}".encode(), **extra}


def _bad(i: int) -> tuple[str, dict[str, bytes]]:
    return f"{i:06d}", {"jpg": b"not an image", "txt": f"caption {i}".encode()}


def _write(folder: Path, shards: list[list[tuple[str, dict[str, bytes]]]], manifest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s, samples in enumerate(shards):
        (folder / f"shard-{s:06d}.tar").write_bytes(_tar_bytes(samples))
        records.append({"file": f"shard-{s:06d}.tar", "num_samples": len(samples)})
    if manifest:
        meta = {"num_samples": sum(len(x) for x in shards), "shards": records, "classes": []}
        (folder / "manifest.json").write_text(json.dumps(meta))
    return folder


def _loader(stream: ShardStream, batch_size: int, num_workers: int = 0) -> StatefulDataLoader:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's own deprecation notice
        return StatefulDataLoader(
            stream, batch_size=batch_size, num_workers=num_workers, drop_last=True, snapshot_every_n_steps=1
        )


def _batches(loader: Any) -> list[tuple[list[int], list[int], bytes]]:
    return [(b["index"].tolist(), b["skipped"].tolist(), b["image"].numpy().tobytes()) for b in loader]


def _resumed(stream: ShardStream, k: int, batch_size: int, num_workers: int, whole: bool = False) -> list[Any]:
    """The batches after batch ``k`` of a loader resumed from the state an interrupted one had after it."""
    first = _loader(stream, batch_size, num_workers)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    del it
    fresh = copy.deepcopy(stream)
    again = _loader(fresh, batch_size, num_workers)
    again.load_state_dict(state)
    got = _batches(again)
    return got if whole else [b[0] for b in got]


def _jitter(img: Image.Image) -> torch.Tensor:
    """A transform that draws from torch, random and NumPy (like timm's RandAugment)."""
    x = pil_to_tensor01(img)
    return x + torch.rand(()) + random.random() + float(np.random.rand())


def _items(stream: Any) -> list[tuple[int, int, str]]:
    return [(int(it["index"]), int(it["skipped"]), str(it["caption"])) for it in stream]


def _quiet(stream: Any) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(stream)


# --------------------------------------------------------------------------------------------------
# 1 + 2: bad samples are replaced and counted once; the epoch keeps its length; all bad is an error
# --------------------------------------------------------------------------------------------------


def test_bad_samples_are_replaced_counted_once_and_keep_the_epoch_length(tmp_path: Path) -> None:
    samples = [_good(0), _bad(1), _bad(2), _good(3), _good(4), _bad(5)]
    root = _write(tmp_path, [samples])
    stream = ShardStream(root, transform=None, shuffle=False)
    with pytest.warns(RuntimeWarning, match=r"bad sample '000001' of .*shard-000000\.tar"):
        items = list(stream)
    # each bad sample is served as the next good one (the last wraps around to the first good one)
    assert [(int(it["index"]), it["skipped"]) for it in items] == [(0, 0), (3, 1), (3, 1), (3, 0), (4, 0), (0, 1)]
    assert len(items) == len(stream) == 6 and sum(it["skipped"] for it in items) == 3
    shard = str(root / "shard-000000.tar")
    bad = [it["bad"] for it in items if it["bad"]]
    assert [b.split(": ", 1)[0] for b in bad] == [f"{shard}:000001", f"{shard}:000002", f"{shard}:000005"]
    assert all("UnidentifiedImageError" in b for b in bad)
    assert all(it["bad"] == "" for it in items if not it["skipped"])
    batches = list(_loader(stream, batch_size=2))
    assert [b["skipped"].tolist() for b in batches] == [[0, 1], [1, 0], [0, 1]]  # collated: summed by the trainer
    assert [b["bad"][1] for b in batches] == [bad[0], "", bad[2]]


def test_bad_samples_never_stop_a_worker_but_no_good_sample_does(tmp_path: Path) -> None:
    # 3 of 10 bad: the stream serves all 10 items; the trainer (not the worker) checks data.max_bad_fraction
    root = _write(tmp_path / "some", [[_bad(i) if i in (2, 3, 4) else _good(i) for i in range(10)]])
    items = _quiet(ShardStream(root, transform=None, shuffle=False))
    assert len(items) == 10 and sum(it["skipped"] for it in items) == 3
    cfg = DataConfig(name="webdataset", root=str(root), max_bad_fraction=0.2, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset(cfg, img_size=8, in_chans=3, train=True)
        assert isinstance(ds, ShardStream)
        assert sum(int(b["skipped"].sum()) for b in _loader(ds, batch_size=2, num_workers=2)) == 3
    # a worker whose shards hold no good sample at all stops, naming them
    root = _write(tmp_path / "all", [[_bad(i) for i in range(4)]])
    with pytest.raises(RuntimeError, match=r"no good sample in shard\(s\) .*shard-000000\.tar \(rank 0, epoch 0\)"):
        _quiet(ShardStream(root, transform=None, shuffle=False))
    # so does one whose shards all end before their first sample (count from a wrong manifest)
    root = _write(tmp_path / "empty", [[]], manifest=False)
    (root / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-000000.tar", "num_samples": 2}]}))
    with pytest.raises(RuntimeError, match=r"no good sample in shard\(s\) .*shard-000000\.tar"):
        _quiet(ShardStream(root, transform=None, shuffle=False))


def test_an_empty_shard_list_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no shards given"):
        ShardStream([], transform=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no shards \(\*\.tar"):
        ShardStream(tmp_path / "empty", transform=None)
    with pytest.raises(FileNotFoundError, match="2 of 2 shard files do not exist"):
        ShardStream(str(tmp_path / "x-{0..1}.tar"), transform=None)
    # a rank without samples in an epoch that is sized to have some
    root = _write(tmp_path / "one", [[_good(0), _good(1)]])
    with pytest.warns(RuntimeWarning, match="do not split evenly"):
        stream = ShardStream(root, transform=None, rank=1, world_size=2, num_samples=2)
    with pytest.raises(ValueError, match=r"rank 1 of 2 has no samples in epoch 0 \(0 of the 1 shards\)"):
        list(stream)


def test_a_local_glob_pattern_lists_the_shards_it_matches(tmp_path: Path) -> None:
    from semmim.data.shards import expand_urls

    for k in (2, 0, 1):
        (tmp_path / f"shard-{k:06d}.tar").write_bytes(b"")
    (tmp_path / "other.tar").write_bytes(b"")
    assert expand_urls(str(tmp_path / "shard-*.tar")) == [str(tmp_path / f"shard-{k:06d}.tar") for k in range(3)]
    assert expand_urls(str(tmp_path / "shard-00000[12].tar::") + str(tmp_path / "o*.tar")) == [
        str(tmp_path / "shard-000001.tar"),
        str(tmp_path / "shard-000002.tar"),
        str(tmp_path / "other.tar"),
    ]
    with pytest.raises(FileNotFoundError, match=r"no shard files match .*/x-\*\.tar"):
        expand_urls(str(tmp_path / "x-*.tar"))


@pytest.mark.parametrize("num_samples", [None, 13, 40])
def test_any_number_of_workers_delivers_exactly_the_promised_batches(tmp_path: Path, num_samples: int | None) -> None:
    sizes = [5, 3, 7, 1, 4]  # 20 samples in shards of uneven size
    root = _write(tmp_path, [[_good(100 * s + i) for i in range(n)] for s, n in enumerate(sizes)])
    for batch_size in (1, 3, 4):
        stream = ShardStream(
            root, transform=None, seed=1, shuffle_buffer=4, num_samples=num_samples, batch_size=batch_size,
            drop_last=True,
        )  # fmt: skip
        want = stream.epoch_size() // batch_size
        for num_workers in (0, 1, 2, 3):
            got = [b["index"].tolist() for b in _loader(stream, batch_size=batch_size, num_workers=num_workers)]
            assert len(got) == want, (batch_size, num_workers)
            seen = Counter(i for b in got for i in b)
            if num_samples is None:  # each worker leaves out or repeats less than one batch
                assert max(seen.values()) <= 2 and len(seen) >= 20 - max(1, num_workers) * (batch_size - 1)


def test_epoch_of_bad_samples_and_uneven_workers_has_its_length(tmp_path: Path) -> None:
    # all but one sample bad: the epoch still has its 8 samples
    root = _write(tmp_path / "bad", [[_good(0)] + [_bad(i) for i in range(1, 8)]])
    stream = ShardStream(root, transform=None, shuffle=False, batch_size=2, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [b["skipped"].tolist() for b in _loader(stream, batch_size=2)] == [[0, 1], [1, 1], [1, 1], [1, 1]]
    # two workers with 5 and 3 samples deliver 2 + 1 full batches of 2: the stream evens them out to 8 // 2 = 4
    root = _write(tmp_path / "uneven", [[_good(i) for i in range(5)], [_good(i) for i in range(5, 8)]])
    stream = ShardStream(root, transform=None, shuffle=False, batch_size=2, drop_last=True)
    full = [b["index"].tolist() for b in _loader(stream, batch_size=2, num_workers=2)]
    assert len(full) == len(stream) // 2 == 4 and sorted(i for b in full[:3] for i in b) == [0, 1, 2, 3, 5, 6]
    for k in range(5):  # positioned at the end: nothing; before it: exactly the rest
        assert _resumed(stream, k, batch_size=2, num_workers=2) == full[k:]


# --------------------------------------------------------------------------------------------------
# 3: captions
# --------------------------------------------------------------------------------------------------


def test_required_captions_missing_or_empty_are_bad_samples(tmp_path: Path) -> None:
    samples = [_good(0), ("000001", {"png": _png(1)}), ("000002", {"png": _png(2), "txt": b"  "}), _good(3)]
    root = _write(tmp_path, [samples])
    assert [c for _, _, c in _items(ShardStream(root, transform=None, shuffle=False))][1:3] == ["", "  "]
    stream = ShardStream(root, transform=None, shuffle=False, require_captions=True)
    with pytest.warns(RuntimeWarning, match="'000001'.*no caption"):
        items = _items(stream)
    assert items == [(0, 0, "caption 0"), (3, 1, "caption 3"), (3, 1, "caption 3"), (3, 0, "caption 3")]
    cfg = DataConfig(name="webdataset", root=str(root), batch_size=2)
    assert build_dataset(cfg, img_size=8, in_chans=3, require_captions=True).require_captions  # type: ignore[union-attr]
    assert not build_dataset(cfg, img_size=8, in_chans=3).require_captions  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# 4: truncation and corruption
# --------------------------------------------------------------------------------------------------


def _cut_points() -> dict[str, tuple[int, bytes | None]]:
    """Where to cut (or what block to overwrite) a tar of 3 samples (png + txt, each png < 1 block)."""
    sample = 4 * BLOCK  # header + data block for each of the 2 parts
    return {
        "mid-header": (2 * sample + 300, None),
        "mid-data": (2 * sample + BLOCK + 30, None),
        "in-padding": (3 * sample - 200, None),
        "block-boundary-between-samples": (2 * sample, None),
        "block-boundary-before-end-blocks": (3 * sample, None),
        "corrupt-header": (2 * sample, b"\x7f" * BLOCK),
    }


@pytest.mark.parametrize("where", list(_cut_points()))
def test_every_truncation_point_warns_and_counts_the_lost_sample(tmp_path: Path, where: str) -> None:
    data = _tar_bytes([_good(i) for i in range(3)])
    at, overwrite = _cut_points()[where]
    damaged = data[:at] if overwrite is None else data[:at] + overwrite + data[at + BLOCK :]
    for manifest in (True, False):  # counts from manifest.json (3) or from the damaged tar's headers
        folder = tmp_path / f"m{int(manifest)}"
        _write(folder, [[_good(i) for i in range(3)]], manifest=manifest)
        (folder / "shard-000000.tar").write_bytes(damaged)
        with pytest.warns(RuntimeWarning, match=r"shard .*shard-000000\.tar is truncated or corrupt") as record:
            stream = ShardStream(folder, transform=None, shuffle=False)
            items = _items(stream)
        assert len(items) == len(stream) == (3 if manifest else count_shard_samples_quiet(folder))
        assert sum(k for _, k, _ in items) >= 1, [str(w.message) for w in record]  # the lost sample is counted
        assert {i for i, k, _ in items if k == 0} <= {0, 1}  # never a sample from after the damage
    # an intact tar (even one whose end blocks are a single zero block) gives no warning
    for intact in (data, data[: 3 * 4 * BLOCK + BLOCK]):
        (tmp_path / "m1" / "shard-000000.tar").write_bytes(intact)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [k for _, k, _ in _items(ShardStream(tmp_path / "m1", transform=None, shuffle=False))] == [0, 0, 0]


def count_shard_samples_quiet(folder: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count_shard_samples(str(folder / "shard-000000.tar"))


def test_count_shard_samples_warns_about_a_cut_header(tmp_path: Path) -> None:
    data = _tar_bytes([_good(i) for i in range(3)])
    (tmp_path / "t.tar").write_bytes(data[: 2 * 4 * BLOCK + 300])
    with pytest.warns(RuntimeWarning, match=r"t\.tar is truncated or corrupt: it is cut in the middle of a header"):
        assert count_shard_samples(str(tmp_path / "t.tar")) == 2


# --------------------------------------------------------------------------------------------------
# 5: bombs
# --------------------------------------------------------------------------------------------------


def test_tar_gz_member_bomb_is_a_bad_sample_read_in_bounded_memory(tmp_path: Path) -> None:
    big = 80 * 2**20  # > MAX_MEMBER_BYTES (64 MiB) of zeros: about 80 kB compressed
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for key, parts in [_good(0), ("000001", {"png": b""}), _good(2)]:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                if key == "000001":
                    info.size = big
                    tar.addfile(info, io.BytesIO(bytes(big)))
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    manifest = {"shards": [{"file": "bomb.tar.gz", "num_samples": 3}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.warns(RuntimeWarning, match=r"'000001' of .*bomb\.tar\.gz: part 'png' of 83886080 bytes .*limit"):
            items = _items(ShardStream(tmp_path, transform=None, shuffle=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(i, k) for i, k, _ in items] == [(0, 0), (2, 1), (2, 0)]
    assert peak < 16 * 2**20, peak


def test_images_over_the_pixel_budget_are_bad_samples(tmp_path: Path) -> None:
    root = _write(tmp_path, [[_good(0), ("000001", {"png": _png(1, size=64)}), _good(2)]])
    stream = ShardStream(root, transform=None, shuffle=False, max_pixels=32 * 32)
    with pytest.warns(RuntimeWarning, match="64x64 = 4096 pixels, more than data.max_image_pixels=1024"):
        assert [(i, k) for i, k, _ in _items(stream)] == [(0, 0), (2, 1), (2, 0)]


# --------------------------------------------------------------------------------------------------
# 6: exact resume through StatefulDataLoader (bad samples, RandAugment, SIGKILL)
# --------------------------------------------------------------------------------------------------


def test_state_round_trip_resumes_the_rest_of_the_epoch_bit_for_bit(tmp_path: Path) -> None:
    bad = {1, 4, 5, 11, 14}  # the stream's last sample (14 or a shuffle's last) wraps around
    shards = [[_bad(i) if i in bad else _good(i) for i in range(s * 5, s * 5 + 5)] for s in range(3)]
    root = _write(tmp_path, shards)
    stream = ShardStream(root, transform=_jitter, seed=3, shuffle_buffer=4, epoch=1, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(stream)
        assert len(items) == 15 and sum(it["skipped"] for it in items) == len(bad)
        assert stream.state_dict() == {"epoch": 1, "consumed": 15}
        for batch_size, num_workers in ((1, 0), (2, 2)):
            stream.batch_size = batch_size
            full = _batches(_loader(stream, batch_size=batch_size, num_workers=num_workers))
            assert len(full) == 15 // batch_size and sum(sum(b[1]) for b in full) <= len(bad)
            for k in sorted({0, 1, len(full) // 2, len(full) - 1, len(full)}):  # from the start to the last batch
                assert _resumed(stream, k, batch_size, num_workers, whole=True) == full[k:], (batch_size, k)
    # the bad samples before the resume point are neither warned about again nor counted again
    resumed = ShardStream(root, transform=None, seed=3, shuffle_buffer=4, epoch=1)
    resumed.load_state_dict({"epoch": 1, "consumed": 15})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(resumed) == []
    # a loaded position belongs to its epoch: another epoch starts from the beginning
    resumed.load_state_dict({"epoch": 1, "consumed": 15})
    resumed.set_epoch(2)
    assert len(_quiet(resumed)) == 15


_CHILD = """
import os, signal, sys, warnings
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from semmim.data import ShardStream
from semmim.data.transforms import pretrain_transform

warnings.simplefilter("ignore")
root, out, k, state = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stream = ShardStream(root, transform=pretrain_transform(32, rand_augment="rand-m9-mstd0.5-inc1"), seed=11,
                     shuffle_buffer=6, epoch=1, batch_size=3, drop_last=True)
loader = StatefulDataLoader(stream, batch_size=3, num_workers=2, drop_last=True, snapshot_every_n_steps=1)
if state != "-":
    loader.load_state_dict(torch.load(state))
batches = []
for b in loader:
    batches.append((b["index"], b["image"]))
    if len(batches) == k:
        torch.save({"batches": batches, "state": loader.state_dict()}, out)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save({"batches": batches, "state": loader.state_dict()}, out)
"""


def test_sigkill_and_resume_on_shards_with_rand_augment_is_bit_identical(tmp_path: Path) -> None:
    """A process killed after batch k resumes, in a new process, from the loader state it saved then."""
    from semmim.data import SyntheticDataset
    from semmim.data.shards import write_shards
    from semmim.data.transforms import pretrain_transform

    root = tmp_path / "shards"
    write_shards(SyntheticDataset(26, img_size=32, seed=2), root, shard_size=5, image_format="png", progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(semmim.__file__).parents[1]), *sys.path])}

    def child(out: Path, k: int, state: str = "-") -> tuple[int, dict[str, Any]]:
        args = [sys.executable, "-c", _CHILD, str(root), str(out), str(k), state]
        rc = subprocess.run(args, env=env, timeout=300, capture_output=True, text=True)
        assert rc.returncode in (0, -signal.SIGKILL), rc.stderr[-2000:]
        return rc.returncode, torch.load(out)

    stream = ShardStream(root, transform=pretrain_transform(32, rand_augment="rand-m9-mstd0.5-inc1"), seed=11,
                         shuffle_buffer=6, epoch=1, batch_size=3, drop_last=True)  # fmt: skip
    whole = [(b["index"], b["image"]) for b in _loader(stream, batch_size=3, num_workers=2)]  # uninterrupted
    assert len(whole) == 26 // 3
    k = 4
    rc, head = child(tmp_path / "head.pt", k)
    assert rc == -signal.SIGKILL and len(head["batches"]) == k
    torch.save(head["state"], tmp_path / "state.pt")
    _, tail = child(tmp_path / "tail.pt", 0, str(tmp_path / "state.pt"))
    got = head["batches"] + tail["batches"]
    assert len(got) == len(whole)
    for (i, x), (j, y) in zip(got, whole, strict=True):
        assert torch.equal(i, j) and torch.equal(x, y)
