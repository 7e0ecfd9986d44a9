"""Hostile WebDataset shards: bad, lost and oversized samples, truncation, exact epoch length and resume."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from semmim.config import DataConfig
from semmim.data import ShardStream, build_dataset, count_shard_samples

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


def _items(stream: Any) -> list[tuple[int, int, str]]:
    return [(int(it["index"]), int(it["skipped"]), str(it["caption"])) for it in stream]


def _quiet(stream: Any) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(stream)


# --------------------------------------------------------------------------------------------------
# 1 + 2: bad samples are replaced and counted; the epoch keeps its length; all bad is an error
# --------------------------------------------------------------------------------------------------


def test_bad_samples_are_replaced_counted_once_and_keep_the_epoch_length(tmp_path: Path) -> None:
    samples = [_good(0), _bad(1), _bad(2), _good(3), _good(4), _bad(5)]
    root = _write(tmp_path, [samples])
    stream = ShardStream(root, transform=None, shuffle=False, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match=r"bad sample '000001' of .*shard-000000\.tar"):
        items = _items(stream)
    # each bad sample is served as the next good one (the last wraps around to the first good one)
    assert [(i, k) for i, k, _ in items] == [(0, 0), (3, 1), (3, 1), (3, 0), (4, 0), (0, 1)]
    assert len(items) == len(stream) == 6 and sum(k for _, k, _ in items) == 3
    batches = list(DataLoader(stream, batch_size=2, drop_last=True))
    assert [b["skipped"].tolist() for b in batches] == [[0, 1], [1, 0], [0, 1]]  # collated: summed by the trainer


def test_all_bad_or_too_many_bad_samples_stop_with_a_clear_error(tmp_path: Path) -> None:
    root = _write(tmp_path / "all", [[_bad(i) for i in range(4)]])
    with pytest.raises(RuntimeError, match=r"no good sample in shard\(s\) .*shard-000000\.tar.*data\.max_bad_fraction"):
        _quiet(ShardStream(root, transform=None, shuffle=False, max_bad_fraction=1.0))
    # a worker stops as soon as its own count exceeds max(1, fraction x its samples): here 2 of 10
    root = _write(tmp_path / "some", [[_bad(i) if i in (2, 3, 4) else _good(i) for i in range(10)]])
    with pytest.raises(RuntimeError, match=r"3 bad samples among the 10 .*data\.max_bad_fraction=0\.2 allows \(2\)"):
        _quiet(ShardStream(root, transform=None, shuffle=False, max_bad_fraction=0.2))
    assert len(_quiet(ShardStream(root, transform=None, shuffle=False, max_bad_fraction=0.3))) == 10
    cfg = DataConfig(name="webdataset", root=str(root), max_bad_fraction=0.2, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset(cfg, img_size=8, in_chans=3, train=True)
    assert isinstance(ds, ShardStream) and ds.max_bad_fraction == 0.2
    with pytest.raises(RuntimeError, match=r"data\.max_bad_fraction=0\.2"):
        _quiet(DataLoader(ds, batch_size=2, drop_last=True))


def _trainer_epoch(stream: ShardStream, batch_size: int, num_workers: int, limit: int = 10) -> tuple[int, int]:
    """The trainer's epoch loop (re-entering after StopIteration): ``(batches, iter() calls)``; raises if it spins."""
    steps = (stream.num_samples or sum(stream.shard_counts().values())) // batch_size
    done = calls = 0
    while done < steps:
        calls += 1
        if calls > limit:
            raise AssertionError(f"the epoch loop spins: {done} of {steps} batches after {calls - 1} passes")
        stream.set_epoch(0)
        stream.set_start(done * batch_size)
        for _ in DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=True):
            done += 1
            if done == steps:
                break
    return done, calls


def test_epoch_of_bad_samples_and_uneven_workers_ends_without_re_reading(tmp_path: Path) -> None:
    # all but one sample bad: the epoch still has its 8 samples (and the trainer no re-entry)
    root = _write(tmp_path / "bad", [[_good(0)] + [_bad(i) for i in range(1, 8)]])
    stream = ShardStream(root, transform=None, shuffle=False, max_bad_fraction=1.0, batch_size=2, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _trainer_epoch(stream, 2, num_workers=0) == (4, 1)
    # two workers with 5 and 3 samples deliver 2 + 1 full batches of 2: the stream evens them out to 8 // 2 = 4
    root = _write(tmp_path / "uneven", [[_good(i) for i in range(5)], [_good(i) for i in range(5, 8)]])
    stream = ShardStream(root, transform=None, shuffle=False, batch_size=2, drop_last=True)
    assert _trainer_epoch(stream, 2, num_workers=2) == (4, 1)

    def batches() -> list[list[int]]:
        return [b["index"].tolist() for b in DataLoader(stream, batch_size=2, num_workers=2, drop_last=True)]

    full = batches()
    assert len(full) == len(stream) // 2 == 4 and sorted(i for b in full[:3] for i in b) == [0, 1, 2, 3, 5, 6]
    for k in range(5):  # positioned at or after the end: nothing; before it: exactly the rest
        stream.set_start(2 * k)
        assert batches() == full[k:]


# --------------------------------------------------------------------------------------------------
# 3: captions
# --------------------------------------------------------------------------------------------------


def test_required_captions_missing_or_empty_are_bad_samples(tmp_path: Path) -> None:
    samples = [_good(0), ("000001", {"png": _png(1)}), ("000002", {"png": _png(2), "txt": b"  "}), _good(3)]
    root = _write(tmp_path, [samples])
    assert [c for _, _, c in _items(ShardStream(root, transform=None, shuffle=False))][1:3] == ["", "  "]
    stream = ShardStream(root, transform=None, shuffle=False, require_captions=True, max_bad_fraction=0.5)
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
            stream = ShardStream(folder, transform=None, shuffle=False, max_bad_fraction=1.0)
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
            items = _items(ShardStream(tmp_path, transform=None, shuffle=False, max_bad_fraction=0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(i, k) for i, k, _ in items] == [(0, 0), (2, 1), (2, 0)]
    assert peak < 16 * 2**20, peak


def test_images_over_the_pixel_budget_are_bad_samples(tmp_path: Path) -> None:
    root = _write(tmp_path, [[_good(0), ("000001", {"png": _png(1, size=64)}), _good(2)]])
    stream = ShardStream(root, transform=None, shuffle=False, max_pixels=32 * 32, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match="64x64 = 4096 pixels, more than data.max_image_pixels=1024"):
        assert [(i, k) for i, k, _ in _items(stream)] == [(0, 0), (2, 1), (2, 0)]


# --------------------------------------------------------------------------------------------------
# 6: exact resume with bad samples
# --------------------------------------------------------------------------------------------------


def test_resume_is_exact_with_bad_samples_replaced(tmp_path: Path) -> None:
    bad = {1, 4, 5, 11, 14}  # the stream's last sample (14 or a shuffle's last) wraps around
    shards = [[_bad(i) if i in bad else _good(i) for i in range(s * 5, s * 5 + 5)] for s in range(3)]
    root = _write(tmp_path, shards)

    def stream(**kw: Any) -> ShardStream:
        return ShardStream(root, transform=None, seed=3, shuffle_buffer=4, max_bad_fraction=0.5, epoch=1, **kw)

    def run(s: ShardStream) -> list[tuple[int, int, str, bytes]]:
        return [(int(it["index"]), int(it["skipped"]), it["caption"], it["image"].numpy().tobytes()) for it in s]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = run(stream())
        assert len(full) == 15 and sum(k for _, k, _, _ in full) == len(bad)
        for k in range(16):
            assert run(stream(resume_samples=k)) == full[k:], k
        # with two workers and whole batches (the trainer's setting)
        s2 = stream(batch_size=2, drop_last=True)

        def batches() -> list[tuple[list[int], list[int]]]:
            loader = DataLoader(s2, batch_size=2, num_workers=2, drop_last=True)
            return [(b["index"].tolist(), b["skipped"].tolist()) for b in loader]

        whole = batches()
        assert len(whole) == 15 // 2 and sum(sum(k) for _, k in whole) <= len(bad)
        for k in (1, 4, 6, 7):
            s2.set_start(2 * k)
            assert batches() == whole[k:], k
