"""Tests of the image–text data: manifests, class-name captions and WebDataset shards."""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from semmim.cli.data import add_data_parser
from semmim.config import DataConfig
from semmim.data import (
    TEMPLATES,
    ClassCaptions,
    FashionMNIST,
    ManifestDataset,
    SeededDataset,
    ShardStream,
    SyntheticDataset,
    build_dataset,
    caption_class_name,
    class_prompts,
    expand_urls,
    pil_to_tensor01,
    subset_keeping_captions,
    write_shards,
)
from semmim.data import fashion_mnist as fm
from semmim.registry import DATASETS

HAVE_FMNIST = fm.find_fashion_mnist(None, "test") is not None
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")

N_SHARDS, PER_SHARD = 5, 20


def _img(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _cfg(**kwargs: Any) -> DataConfig:
    """A DataConfig; fields it does not (yet) declare are set as attributes."""
    known = set(DataConfig.__dataclass_fields__)
    cfg = DataConfig(**{k: v for k, v in kwargs.items() if k in known})
    for k, v in kwargs.items():
        if k not in known:
            setattr(cfg, k, v)
    return cfg


def _images(folder: Path, n: int) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = [_img(i) for i in range(n)]
    for i, im in enumerate(imgs):
        im.save(folder / f"im{i}.png")
    return imgs


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


def test_manifest_csv_round_trip(tmp_path: Path) -> None:
    imgs = _images(tmp_path / "imgs", 4)
    rows = [
        ("imgs/im0.png", 'a cat, "quoted"', "2"),
        ("imgs/im1.png", "ünïcode dog", ""),
        (str(tmp_path / "imgs" / "im2.png"), "absolute path", "0"),
        ("imgs/im3.png", "", "1"),
    ]
    path = tmp_path / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        w.writerows(rows)
    ds = ManifestDataset(path)
    assert len(ds) == 4 and ds.classes == [] and DATASETS.get("manifest") is ManifestDataset
    for i, (_, cap, lab) in enumerate(rows):
        img, label = ds.load(i)
        assert np.array_equal(np.asarray(img), np.asarray(imgs[i]))
        assert label == (int(lab) if lab else -1)
        assert ds.caption(i) == cap
    # SeededDataset adds the caption; the default collate makes a list of str
    seeded = SeededDataset(ds, seed=0)
    item = seeded[0]
    assert item["caption"] == rows[0][1] and item["label"] == 2 and item["index"] == 0
    batch = next(iter(DataLoader(seeded, batch_size=4)))
    assert batch["caption"] == [r[1] for r in rows]
    assert batch["label"].tolist() == [2, -1, 0, 1]
    # relative paths resolved against root=
    (tmp_path / "lists").mkdir()
    moved = tmp_path / "lists" / "train.csv"
    moved.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert ManifestDataset(moved, root=tmp_path).caption(1) == "ünïcode dog"


def test_manifest_jsonl_class_names_and_custom_keys(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 3)
    recs = [
        {"file": "imgs/im0.png", "text": "first", "label": "dog"},
        {"file": "imgs/im1.png", "text": "second", "label": "cat"},
        {"file": "imgs/im2.png", "text": "third", "label": "dog", "extra": 1},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    ds = ManifestDataset(path, image_key="file", caption_key="text", in_chans=1)
    assert ds.classes == ["cat", "dog"]
    assert [ds.load(i)[1] for i in range(3)] == [1, 0, 1]
    assert [ds.caption(i) for i in range(3)] == ["first", "second", "third"]
    assert ds.load(0)[0].mode == "L"
    assert ds[2]["caption"] == "third" and ds[2]["image"].shape == (1, 10, 12)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        ManifestDataset(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.png,hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'image', 'caption'.*found columns: 'path', 'text'"):
        ManifestDataset(bad)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "txt": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: missing column\(s\) 'caption'; found columns: 'image', 'txt'"):
        ManifestDataset(bad_jsonl)
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        ManifestDataset(tmp_path / "broken.jsonl")


def test_manifest_missing_and_corrupt_images(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    lines = ["image,caption"] + [f"im{i}.png,cap {i}" for i in range(3)]
    missing = tmp_path / "m.csv"
    missing.write_text("\n".join([*lines, "gone.png,lost"]) + "\n", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=r"skipping 1 of 4 listed images that do not exist.*gone.png"):
        ds = ManifestDataset(missing, max_bad_fraction=0.5)
    assert len(ds) == 3 and ds.missing_files[0].endswith("gone.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(ManifestDataset(missing, max_bad_fraction=0.0)) == 3  # at least one bad file is tolerated
        missing.write_text("\n".join([*lines, "gone.png,lost", "gone2.png,lost"]) + "\n", encoding="utf-8")
        with pytest.raises(FileNotFoundError, match="2 of 5 listed images do not exist"):
            ManifestDataset(missing, max_bad_fraction=0.2)
    # corrupt file: skipped at load time, the caption follows the image actually served
    corrupt = tmp_path / "c.csv"
    corrupt.write_text("\n".join([lines[0], "im0.png,zero", "corrupt.png,bad", "im2.png,two"]) + "\n", encoding="utf-8")
    ds = ManifestDataset(corrupt, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match="skipping unreadable image .*corrupt.png"):
        item = SeededDataset(ds)[1]
    served = ds.served_index(1)
    assert served in (0, 2) and item["caption"] == ["zero", "bad", "two"][served] == ds.caption(1)
    assert torch.equal(item["image"], SeededDataset(ds)[served]["image"])


# --------------------------------------------------------------------------------------------------
# Class-name captions
# --------------------------------------------------------------------------------------------------


def test_class_captions_deterministic_and_per_epoch() -> None:
    base = SyntheticDataset(64, img_size=8, num_classes=3, seed=1)
    names = ["T-shirt/top", "Ankle boot", "golden_retriever"]
    ds = ClassCaptions(base, names, seed=5)
    natural = ["t-shirt or top", "ankle boot", "golden retriever"]
    caps0 = [ds.caption(i) for i in range(64)]
    assert caps0 == [ClassCaptions(base, names, seed=5).caption(i) for i in range(64)]
    for i, cap in enumerate(caps0):
        assert natural[base.load(i)[1]] in cap
        assert cap in {t.format(c=natural[base.load(i)[1]]) for t in TEMPLATES}
    ds.set_epoch(1)
    caps1 = [ds.caption(i) for i in range(64)]
    assert caps1 != caps0 and sum(a != b for a, b in zip(caps0, caps1, strict=True)) > 32
    assert [ClassCaptions(base, names, seed=6).caption(i) for i in range(64)] != caps0
    assert len(set(caps0)) > 8  # several templates in use
    # SeededDataset forwards its epoch and adds the caption
    seeded = SeededDataset(ClassCaptions(base, names, seed=5), seed=0)
    seeded.set_epoch(1)
    assert [seeded[i]["caption"] for i in range(64)] == caps1
    # wrapped in a subset, captions survive
    sub = subset_keeping_captions(ds, [3, 4])
    assert sub.caption(1) == caps1[4]  # type: ignore[attr-defined]


def test_class_captions_errors_and_prompts() -> None:
    with pytest.raises(ValueError, match="need class names"):
        ClassCaptions(SyntheticDataset(4, img_size=8, num_classes=0))
    with pytest.raises(ValueError, match="placeholder"):
        ClassCaptions(SyntheticDataset(4, img_size=8), templates=["no class here"])
    assert caption_class_name("T-shirt/top") == "t-shirt or top"
    prompts = class_prompts(fm.FASHION_MNIST_CLASSES)
    assert len(prompts) == 10 and all(len(p) == len(TEMPLATES) for p in prompts)
    assert prompts[0][0] == "a photo of a t-shirt or top." and "ankle boot" in prompts[9][3]
    assert class_prompts(["Cat"], ["a {}."], normalize=False) == [["a Cat."]]
    assert 6 <= len(TEMPLATES) <= 12 and all("{c}" in t for t in TEMPLATES)


def test_build_dataset_captions_and_manifest(tmp_path: Path) -> None:
    ds = build_dataset(_cfg(name="synthetic", limit=6, captions="templates"), img_size=8, in_chans=3, seed=2)
    assert isinstance(ds, SeededDataset)
    allowed = {k: {t.format(c=f"class {k}") for t in TEMPLATES} for k in range(10)}
    first = [ds[i]["caption"] for i in range(6)]
    assert all(ds[i]["caption"] in allowed[ds[i]["label"]] for i in range(6))
    ds.set_epoch(3)
    assert all(ds[i]["caption"] in allowed[ds[i]["label"]] for i in range(6))
    assert [ds[i]["caption"] for i in range(6)] != first
    # unlabelled data has no classes to caption
    _images(tmp_path / "flat", 2)
    with pytest.raises(ValueError, match=r"data\.captions=templates needs a labelled dataset"):
        build_dataset(
            _cfg(name="imagefolder", root=str(tmp_path / "flat"), captions="templates"), img_size=8, in_chans=3
        )
    with pytest.raises(ValueError, match=r"data\.captions must be one of"):
        build_dataset(_cfg(name="synthetic", captions="bogus"), img_size=8, in_chans=3)
    # manifest with custom keys and a limit keeps its captions
    path = tmp_path / "m.csv"
    path.write_text("file,text\nflat/im0.png,zero\nflat/im1.png,one\n", encoding="utf-8")
    cfg = _cfg(name="manifest", root=str(path), manifest_image_key="file", manifest_caption_key="text", limit=1)
    ds = build_dataset(cfg, img_size=8, in_chans=3, train=False)
    assert len(ds) == 1 and ds[0]["caption"] == "zero" and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"data\.root is not set"):
        build_dataset(_cfg(name="manifest"), img_size=8, in_chans=3)


# --------------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_source() -> ClassCaptions:
    if not HAVE_FMNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    return ClassCaptions(subset_keeping_captions(FashionMNIST(split="test"), range(N_SHARDS * PER_SHARD)), seed=0)


@pytest.fixture(scope="module")
def shard_dir(fmnist_source: ClassCaptions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(fmnist_source, out, shard_size=PER_SHARD, image_format="png", progress=False)
    return out


def _stream(shard_dir: Path, **kwargs: Any) -> ShardStream:
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("shuffle_buffer", 16)
    kwargs.setdefault("in_chans", 1)
    return ShardStream(str(shard_dir / "shard-{000000..000004}.tar"), transform=None, **kwargs)


def _indices(stream: ShardStream) -> list[int]:
    return [int(item["index"]) for item in stream]


def test_write_shards_manifest_and_layout(fmnist_source: ClassCaptions, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = write_shards(fmnist_source, out, shard_size=30, prefix="fm", image_format="jpg", progress=True)
    assert [p.name for p in paths] == [f"fm-{k:06d}.tar" for k in range(4)]
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["num_samples"] == 100 and meta["num_shards"] == 4 and meta["image_format"] == "jpg"
    assert meta["shards"] == [{"file": f"fm-{k:06d}.tar", "num_samples": n} for k, n in enumerate([30, 30, 30, 10])]
    assert meta["classes"] == list(fm.FASHION_MNIST_CLASSES) and meta["captions"] is True
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert sorted(names[:3]) == ["000000000.cls", "000000000.jpg", "000000000.txt"]
        txt = tar.extractfile("000000000.txt").read().decode()  # type: ignore[union-attr]
        assert txt == fmnist_source.caption(0)
    assert not list(out.glob("*.tmp"))
    with pytest.raises(FileExistsError, match="already holds 4 shard"):
        write_shards(fmnist_source, out, shard_size=30, prefix="fm", progress=False)
    assert len(write_shards(fmnist_source, out, shard_size=50, prefix="fm", progress=False, overwrite=True)) == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["fm-000000.tar", "fm-000001.tar"]
    # JPEG: close to the original within compression error
    stream = ShardStream(out, transform=None, in_chans=1, shuffle=False)
    assert len(stream) == 100 and stream.classes == list(fm.FASHION_MNIST_CLASSES)
    first = next(iter(stream))
    ref = pil_to_tensor01(fmnist_source.load(0)[0])
    assert first["index"] == 0 and float((first["image"] - ref).abs().mean()) < 0.03


def test_write_shards_progress_bar(fmnist_source: ClassCaptions, tmp_path: Path, capsys: Any) -> None:
    write_shards(subset_keeping_captions(fmnist_source, range(5)), tmp_path, shard_size=2, progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "3 shards" in err


def test_shard_stream_round_trip_workers(fmnist_source: ClassCaptions, shard_dir: Path) -> None:
    stream = _stream(shard_dir)
    assert len(stream) == N_SHARDS * PER_SHARD
    loader = DataLoader(stream, batch_size=8, num_workers=2)
    seen: Counter[int] = Counter()
    for batch in loader:
        assert batch["image"].shape[1:] == (1, 28, 28) and isinstance(batch["caption"], list)
        for img, cap, label, index in zip(
            batch["image"], batch["caption"], batch["label"], batch["index"], strict=True
        ):
            i = int(index)
            seen[i] += 1
            ref_img, ref_label = fmnist_source.load(i)
            assert torch.equal(img, pil_to_tensor01(ref_img))  # PNG is lossless
            assert cap == fmnist_source.caption(i) and int(label) == ref_label
    assert set(seen) == set(range(N_SHARDS * PER_SHARD)) and set(seen.values()) == {1}


def test_shard_stream_ranks_epochs_and_resume(shard_dir: Path) -> None:
    everything = set(range(N_SHARDS * PER_SHARD))
    # two ranks over 4 of the 5 shards (divisible): disjoint, covering, equally long
    four = [str(shard_dir / f"shard-{k:06d}.tar") for k in range(4)]
    parts = [_indices(ShardStream(four, transform=None, in_chans=1, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(range(80))
    assert len(parts[0]) == len(parts[1]) == 40
    with pytest.warns(RuntimeWarning, match="do not split evenly"):
        odd = [_stream(shard_dir, rank=r, world_size=2) for r in range(2)]
    assert set(_indices(odd[0])) | set(_indices(odd[1])) == everything
    # the order depends on (seed, epoch) only
    stream = _stream(shard_dir)
    e0 = _indices(stream)
    assert e0 == _indices(_stream(shard_dir)) and set(e0) == everything
    stream.set_epoch(1)
    e1 = _indices(stream)
    assert e1 != e0 and set(e1) == everything
    assert _indices(_stream(shard_dir, seed=8)) != e0
    # resume from a saved position: exactly the rest of the same epoch
    for k in (1, 17, 60, 99, 100):
        resumed = _stream(shard_dir)
        resumed.load_state_dict({"epoch": 1, "consumed": k})
        assert _indices(resumed) == e1[k:] and resumed.state_dict() == {"epoch": 1, "consumed": 100}
    # a new epoch starts from the beginning again
    resumed.load_state_dict({"epoch": 1, "consumed": 5})
    resumed.set_epoch(2)
    assert len(_indices(resumed)) == 100


def test_shard_stream_resume_with_workers(shard_dir: Path) -> None:
    stream = _stream(shard_dir, batch_size=6, drop_last=True)
    stream.set_epoch(4)

    def loader(ds: ShardStream) -> StatefulDataLoader:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(ds, batch_size=6, num_workers=2, drop_last=True, snapshot_every_n_steps=1)

    full = [b["index"].tolist() for b in loader(stream)]
    assert len(full) == 100 // 6
    for k in (3, len(full) - 2):  # the second one lies past the end of the smaller worker's share
        first = loader(stream)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        del it
        again = loader(_stream(shard_dir, batch_size=6, drop_last=True))
        again.load_state_dict(state)
        assert [b["index"].tolist() for b in again] == full[k:]


def test_shard_stream_corrupt_samples(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    png = io.BytesIO()
    _img(0).save(png, format="PNG")
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tar:
        add(tar, "a/0001.png", png.getvalue())
        add(tar, "a/0001.txt", b"good one")
        add(tar, "a/0002.jpg", b"garbage")
        add(tar, "a/0002.txt", b"bad image")
        add(tar, "a/0003.txt", b"no image at all")
        add(tar, "key_x.png", png.getvalue())
        add(tar, "key_x.cls", b"4")
    with pytest.warns(RuntimeWarning) as record:
        items = list(ShardStream(tmp_path, transform=None, shuffle=False))
    messages = " ".join(str(w.message) for w in record)
    assert "bad sample 'a/0002'" in messages and "'a/0003'" in messages and "no image part" in messages
    assert items[0]["index"] == 1 and items[0]["caption"] == "good one" and items[0]["label"] == -1
    # the bad a/0002 is replaced by the next good sample (counted once), which then comes at its own place
    assert [it["skipped"] for it in items] == [0, 1, 0] and items[1]["index"] == items[2]["index"] >= 0
    assert items[2]["label"] == 4 and items[2]["caption"] == ""
    assert len(ShardStream(tmp_path, transform=None)) == 3  # counted from the headers: samples with an image part
    # a truncated shard is read up to the damage; the lost sample is replaced by the first good one
    big = io.BytesIO()
    _img(1, size=(64, 64)).save(big, format="PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, "0001.png", png.getvalue())
        add(tar, "0002.png", big.getvalue())
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "t.tar").write_bytes(buf.getvalue()[: 2 * 512 + len(png.getvalue()) + 4000])
    with pytest.warns(RuntimeWarning, match="truncated or corrupt"):
        items = list(ShardStream(cut, transform=None, shuffle=False))
    assert [(it["index"], it["skipped"]) for it in items] == [(1, 0), (1, 1)]


def test_expand_urls(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"x-{k:06d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    listed = [str(tmp_path / f"x-{k:06d}.tar") for k in range(3)]
    assert expand_urls(tmp_path) == listed
    assert expand_urls(str(tmp_path / "x-{000000..000002}.tar")) == listed
    assert expand_urls([listed[2], listed[0]]) == [listed[2], listed[0]]
    assert expand_urls(f"{listed[0]}::{listed[1]}") == listed[:2]
    with pytest.raises(FileNotFoundError, match="1 of 4 shard files do not exist"):
        expand_urls(str(tmp_path / "x-{000000..000003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand_urls(tmp_path / "empty")


def test_build_dataset_webdataset(shard_dir: Path) -> None:
    cfg = _cfg(name="webdataset", root=str(shard_dir), shuffle_buffer=10, num_samples=100)
    ds = build_dataset(cfg, img_size=16, in_chans=3, train=True, seed=1)
    assert isinstance(ds, ShardStream) and not isinstance(ds, SeededDataset)
    assert ds.shuffle_buffer == 10 and len(ds) == 100 and ds.classes == list(fm.FASHION_MNIST_CLASSES)
    ds.set_epoch(2)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    again = next(iter(DataLoader(ds, batch_size=4)))
    assert torch.equal(batch["image"], again["image"])  # augmentation seeded by (seed, epoch, index)
    evaluation = build_dataset(_cfg(name="webdataset", root=str(shard_dir)), img_size=16, in_chans=3, train=False)
    assert isinstance(evaluation, ShardStream)
    assert [int(it["index"]) for it in evaluation][:3] == [0, 1, 2]  # eval: list order, no shuffle
    assert isinstance(DATASETS.build("webdataset", root=str(shard_dir)), ShardStream)
    with pytest.raises(ValueError, match="captions=templates does not apply"):
        build_dataset(_cfg(name="webdataset", root=str(shard_dir), captions="templates"), img_size=8, in_chans=3)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="semmim")
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@needs_fmnist
def test_cli_shards_fashion_mnist(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "fm"
    argv = ["data", "shards", "--src", "fashion_mnist", "--out", str(out), "--captions", "templates"]
    assert _cli([*argv, "--shard-size", "10", "--limit", "25", "--split", "test", "--no-progress"]) == 0
    assert "wrote 3 shards, 25 samples" in capsys.readouterr().out
    items = list(ShardStream(out, transform=None, shuffle=False))
    assert [it["index"] for it in items] == list(range(25))
    assert all(it["image"].shape == (3, 28, 28) for it in items)
    assert any("t-shirt or top" in it["caption"] or "ankle boot" in it["caption"] for it in items)
    assert _cli(["data"]) == 2  # `semmim data` alone prints its help


def test_cli_shards_folder_and_manifest(tmp_path: Path, capsys: Any) -> None:
    for cls in ("cat", "dog"):
        _images(tmp_path / "folder" / cls, 3)
    assert (
        _cli(["data", "shards", "--src", str(tmp_path / "folder"), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    )
    assert "wrote 1 shards, 6 samples" in capsys.readouterr().out
    assert [it["label"] for it in ShardStream(tmp_path / "a", transform=None, shuffle=False)] == [0, 0, 0, 1, 1, 1]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"image": f"folder/cat/im{i}.png", "caption": f"cat {i}"}) for i in range(3)),
        encoding="utf-8",
    )
    argv = ["data", "shards", "--src", str(manifest), "--out", str(tmp_path / "b"), "--shard-size", "2"]
    assert _cli([*argv, "--image-format", "png", "--no-progress"]) == 0
    assert "wrote 2 shards, 3 samples" in capsys.readouterr().out
    assert [it["caption"] for it in ShardStream(tmp_path / "b", transform=None, shuffle=False)] == [
        "cat 0",
        "cat 1",
        "cat 2",
    ]
    with pytest.raises(FileNotFoundError, match="not an image folder"):
        _cli(["data", "shards", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="need class names"):
        _cli(["data", "shards", "--src", str(manifest), "--out", str(tmp_path / "d"), "--captions", "templates"])


def test_write_shards_leaves_out_unreadable_files_instead_of_duplicating(tmp_path: Path, capsys: Any) -> None:
    """An unreadable file of the source is not written as a copy of its substitute; the CLI and manifest say so."""
    src = tmp_path / "imgs" / "cat"
    src.mkdir(parents=True)
    for k in range(5):
        _img(k).save(src / f"{k}.png")
    (src / "2.png").write_bytes(b"")  # empty: unreadable
    (src / "3.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "shards", "--src", str(tmp_path / "imgs"), "--out", str(out)])
    args.shard_size, args.no_progress = 2, True
    with pytest.warns(RuntimeWarning, match="left out 2 unreadable image"):
        assert args.func(args) == 0
    assert "3 samples" in capsys.readouterr().out
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["num_samples"] == 3 and [s["num_samples"] for s in meta["shards"]] == [2, 1]
    assert [s.split(":")[0] for s in meta["skipped"]] == [str(src / "2.png"), str(src / "3.png")]
    stream = ShardStream(out, transform=None, in_chans=3, shuffle=False)
    assert sorted(_indices(stream)) == [0, 1, 4]
