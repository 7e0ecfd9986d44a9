"""Tests of the input pipeline: datasets, transforms, seeded augmentation, the training sampler and loaders."""

from __future__ import annotations

import gzip
import random
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semmim.config import DataConfig
from semmim.data import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    IdxFormatError,
    ImageFolderDataset,
    SeededDataset,
    SubsetDataset,
    SyntheticDataset,
    build_dataset,
    build_loader,
    describe,
    eval_transform,
    pretrain_transform,
    read_idx,
    train_sampler,
)
from semmim.data import fashion_mnist as fm
from semmim.registry import DATASETS

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN_FMNIST = (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file()


def _rgb(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _check_image(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape) == shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


@pytest.fixture(autouse=True)
def _no_fmnist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.ENV_VAR, raising=False)


# --------------------------------------------------------------------------------------------------
# ImageFolderDataset
# --------------------------------------------------------------------------------------------------


def test_imagefolder_class_tree(tmp_path: Path) -> None:
    for k, cls in enumerate(["dog", "cat", "bird"]):
        (tmp_path / cls).mkdir()
        for j in range(2):
            _rgb(10 * k + j).save(tmp_path / cls / f"{j}.JPG" if j else tmp_path / cls / f"{j}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["bird", "cat", "dog"]
    assert len(ds) == 6
    assert [ds[i]["label"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    item = ds[3]
    _check_image(item["image"], (3, 16, 20))
    assert item["index"] == 3
    assert ds.samples[0][0].endswith("0.png")  # sorted order
    assert "imagefolder" in DATASETS and DATASETS.get("imagefolder") is ImageFolderDataset
    # labels=False on a class tree reads every image, unlabelled
    assert {ImageFolderDataset(tmp_path, labels=False)[i]["label"] for i in range(6)} == {-1}


def test_imagefolder_flat_folder_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for j in range(3):
        _rgb(j).save(src / f"img{j}.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    for j in range(3):
        (flat / f"link{j}.png").symlink_to(src / f"img{j}.png")
    ds = ImageFolderDataset(flat)
    assert ds.classes == []
    assert len(ds) == 3 and all(ds[i]["label"] == -1 for i in range(3))
    with pytest.raises(ValueError, match="class subfolders"):
        ImageFolderDataset(flat, labels=True)
    # a symlinked class folder is followed
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").symlink_to(src, target_is_directory=True)
    assert ImageFolderDataset(tree).classes == ["a"]


def test_imagefolder_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found in .*empty.*\.jpg"):
        ImageFolderDataset(empty)


def _make_broken_folder(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    for j in range(6):
        _rgb(j).save(root / f"good{j}.png")
    zero = root / "b_zero.jpg"
    zero.write_bytes(b"")
    buf = root / "full.tmp"
    _rgb(99, (256, 256)).save(buf, format="JPEG", quality=95)
    data = buf.read_bytes()
    buf.unlink()
    truncated = root / "c_truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = root / "d_garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    return {"zero": zero, "truncated": truncated, "garbage": garbage}


def test_imagefolder_skips_broken_files(tmp_path: Path) -> None:
    bad = _make_broken_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5)
    assert len(ds) == 9
    names = [Path(p).name for p, _ in ds.samples]
    with pytest.warns(RuntimeWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in record]
    for path in bad.values():
        assert sum(str(path) in m for m in messages) == 1, (path, messages)
    assert sorted(ds.bad_files) == sorted(str(p) for p in bad.values())
    for item in items:
        _check_image(item["image"], (3, 16, 20))
    # a broken sample is replaced by a good one that depends only on its index (the same in a fresh copy)
    i_zero = names.index("b_zero.jpg")
    sub = ds.served_index(i_zero)
    assert names[sub].startswith("good")
    assert torch.equal(items[i_zero]["image"], items[sub]["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ImageFolderDataset(tmp_path, max_bad_fraction=0.5)[i_zero]["image"], items[i_zero]["image"])
    # warned once per file: reading again does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ds[i_zero]["image"], items[i_zero]["image"])
    assert len(ds.bad_files) == 3


def test_imagefolder_names_bad_files_in_items_and_never_raises_the_limit_itself(tmp_path: Path) -> None:
    bad = _make_broken_folder(tmp_path)
    ds = SeededDataset(ImageFolderDataset(tmp_path, max_bad_fraction=0.01))  # the limit is the trainer's to apply
    with pytest.warns(RuntimeWarning):
        items = [ds[i] for i in range(len(ds))]
    named = sorted(it["bad"].partition(": ")[0] for it in items if it["bad"])
    assert named == sorted(str(p) for p in bad.values())
    assert all(it["skipped"] == bool(it["bad"]) for it in items)


def test_imagefolder_decompression_bomb_is_a_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rgb(0, (64, 64)).save(tmp_path / "a_big.png")
    _rgb(1, (8, 8)).save(tmp_path / "b_small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: DecompressionBombError
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match="a_big.png"):
        item = ds[0]
    _check_image(item["image"], (3, 8, 8))


def test_imagefolder_decodes_unusual_modes(tmp_path: Path) -> None:
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    ramp = (np.arange(10 * 12, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    img16.save(tmp_path / "deep16.png")
    Image.fromarray(np.full((10, 12), 77, dtype=np.uint8)).save(tmp_path / "gray.png")
    pal = Image.new("P", (12, 10))
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "palette.gif")
    pal.save(tmp_path / "palette_alpha.png", transparency=0)
    Image.new("RGBA", (12, 10), (0, 0, 255, 128)).save(tmp_path / "rgba.webp")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tmp_path / "plain.tiff")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tmp_path / "plain.bmp")
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.0)
    assert len(ds) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items = {Path(ds.samples[i][0]).name: ds[i]["image"] for i in range(len(ds))}
    for x in items.values():
        _check_image(x, (3, 10, 12))
    assert ds.bad_files == []
    assert items["cmyk.jpg"][0].mean() > 0.9 and items["cmyk.jpg"][1:].mean() < 0.1  # red
    deep = items["deep16.png"][0]
    assert deep.max() > 0.8 and deep.min() == 0.0 and deep.unique().numel() > 50  # scaled, not clipped
    assert torch.allclose(items["gray.png"], torch.full((3, 10, 12), 77 / 255))
    assert items["palette.gif"][0, 0, 0] == 1.0 and items["palette.gif"][0, 5, 5] == 0.0
    gray = ImageFolderDataset(tmp_path, in_chans=1)
    _check_image(gray[0]["image"], (1, 10, 12))


# --------------------------------------------------------------------------------------------------
# FashionMNIST
# --------------------------------------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray, *, truncate: int = 0) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if truncate:
        data = data[:-truncate]
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _write_fake_fmnist(folder: Path, n: int = 5, prefix: str = "train", truncate: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, truncate=truncate)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_files() -> None:
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.classes == list(FASHION_MNIST_CLASSES) and train.classes[0] == "T-shirt/top"
    assert isinstance(train.targets, np.ndarray) and set(np.unique(train.targets)) == set(range(10))
    for ds, i in ((train, 0), (train, 59999), (test, 123)):
        item = ds[i]
        _check_image(item["image"], (1, 28, 28))
        assert 0 <= item["label"] <= 9 and item["index"] == i
    assert train[0]["image"].max() > 0.5
    rgb = FashionMNIST(split="test", in_chans=3)
    x = rgb[0]["image"]
    _check_image(x, (3, 28, 28))
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], test[0]["image"][0])
    assert "fashion_mnist" in describe(train) and "60000" in describe(train)


def test_fashion_mnist_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [])
    bogus = tmp_path / "bogus"
    with pytest.raises(FileNotFoundError) as err:
        FashionMNIST(root=bogus, split="train", download=False)
    msg = str(err.value)
    assert str(bogus) in msg and "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_fashion_mnist_layouts_and_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [])
    _write_fake_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw", n=5)  # torchvision layout
    ds = FashionMNIST(root=tmp_path / "tv")
    assert len(ds) == 5 and [ds[i]["label"] for i in range(5)] == [0, 1, 2, 3, 4]
    assert torch.allclose(ds[0]["image"].flatten()[:3] * 255, torch.tensor([0.0, 1.0, 2.0]))
    _write_fake_fmnist(tmp_path / "env", n=3, prefix="t10k")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "env"))
    assert len(FashionMNIST(split="test")) == 3  # no root: $SEMMIM_FASHION_MNIST
    with pytest.raises(FileNotFoundError, match="nothing_here"):  # a named root is the only place looked in
        FashionMNIST(root=tmp_path / "nothing_here", split="test")
    _write_fake_fmnist(tmp_path / "broken", n=5, truncate=100)
    with pytest.raises(IdxFormatError, match="truncated"):
        FashionMNIST(root=tmp_path / "broken")
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(IdxFormatError):
        read_idx(tmp_path / "junk.gz")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(root=tmp_path / "tv", split="validation")


# --------------------------------------------------------------------------------------------------
# Transforms and seeded augmentation
# --------------------------------------------------------------------------------------------------


def test_transforms_shape_and_range() -> None:
    torch.manual_seed(0)
    img = _rgb(3, (300, 200))
    for t, size in ((pretrain_transform(64), 64), (pretrain_transform(32, (0.5, 1.0), hflip=False), 32)):
        _check_image(t(img), (3, size, size))
    _check_image(eval_transform(224)(img), (3, 224, 224))
    _check_image(eval_transform(28)(_rgb(4, (28, 28)).convert("L")), (1, 28, 28))
    small = _rgb(5, (28, 28))
    assert torch.allclose(eval_transform(28)(small), torch.from_numpy(np.array(small)).permute(2, 0, 1) / 255)
    with pytest.raises(ValueError, match="crop_scale"):
        pretrain_transform(32, (0.0, 1.0))


def _np_key() -> np.ndarray:
    state: Any = np.random.get_state(legacy=False)
    return np.array(state["state"]["key"])


def test_seeded_dataset_is_deterministic_and_leaves_rng_alone() -> None:
    base = SyntheticDataset(16, img_size=24, in_chans=3, seed=1)
    ds = SeededDataset(base, seed=7, transform=pretrain_transform(16))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(9)
    t_state, py_state, np_key = torch.get_rng_state(), random.getstate(), _np_key()
    a = ds[3]
    assert torch.equal(torch.get_rng_state(), t_state)
    assert random.getstate() == py_state
    assert np.array_equal(_np_key(), np_key)
    assert base.load(3)[0].size == (24, 24)
    _check_image(a["image"], (3, 16, 16))
    assert a["index"] == 3 and a["label"] == base.load(3)[1]
    assert torch.equal(ds[3]["image"], a["image"])
    fresh = SeededDataset(SyntheticDataset(16, img_size=24, in_chans=3, seed=1), 7, pretrain_transform(16))
    assert torch.equal(fresh[3]["image"], a["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])
    ds.set_epoch(0)
    assert torch.equal(ds[3]["image"], a["image"])
    assert not torch.equal(SeededDataset(base, 8, pretrain_transform(16))[3]["image"], a["image"])


def test_seeded_dataset_numpy_transforms() -> None:
    def noisy(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.random.rand(2)) + random.random() + torch.rand(1)

    base = SyntheticDataset(4, img_size=4)
    ds = SeededDataset(base, seed=1, transform=noisy)
    np.random.seed(0)
    key = _np_key()
    a = ds[2]["image"]
    assert np.array_equal(_np_key(), key)
    assert torch.equal(ds[2]["image"], a) and not torch.equal(ds[1]["image"], a)


def test_synthetic_dataset() -> None:
    a, b = (
        SyntheticDataset(10, img_size=8, in_chans=1, seed=3),
        SyntheticDataset(99, img_size=8, in_chans=1, seed=3),
    )
    assert torch.equal(a[4]["image"], b[4]["image"]) and a[4]["label"] == b[4]["label"]
    _check_image(a[4]["image"], (1, 8, 8))
    assert not torch.equal(a[4]["image"], SyntheticDataset(10, img_size=8, in_chans=1, seed=4)[4]["image"])
    assert {SyntheticDataset(5, img_size=4, num_classes=0)[i]["label"] for i in range(5)} == {-1}
    with pytest.raises(IndexError):
        a[10]


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def _hand_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """semmim's training order since 0.1 (the former ResumableSampler): randperm seeded seed + epoch,
    truncated to a multiple of world_size, rank r takes indices[r::world_size]."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return order[: n - n % world_size][rank::world_size]


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 60), world_size=st.integers(1, 4), epoch=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_train_sampler_keeps_the_order_and_splits_disjointly(n: int, world_size: int, epoch: int, seed: int) -> None:
    """DistributedSampler's order equals the hand computation: runs keep their sample order across the change."""
    shards = []
    for rank in range(world_size):
        s = train_sampler(range(n), seed=seed, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        shard = list(s)
        assert shard == _hand_order(n, seed, epoch, rank, world_size)
        assert len(shard) == len(s) == n // world_size
        shards.append(shard)
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat)) == n - n % world_size and all(0 <= i < n for i in flat)


def test_train_sampler_epochs_and_state() -> None:
    s = train_sampler(range(100), seed=0)
    e0 = list(s)
    assert sorted(e0) == list(range(100)) and e0 != list(range(100))
    assert list(s) == e0  # same epoch, same order
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(100))
    assert s.state_dict() == {"yielded": 100}
    s.load_state_dict({"yielded": 37})  # the next pass starts at sample 37, the one after starts anew
    assert list(s) == e1[37:]
    assert list(s) == e1
    r1 = train_sampler(range(10), seed=3, rank=1, world_size=3)
    assert list(r1) == _hand_order(10, 3, 0, 1, 3)


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def test_loader_workers_match_main_process() -> None:
    ds = SeededDataset(SyntheticDataset(24, img_size=20, seed=2), seed=5, transform=pretrain_transform(16))
    ds.set_epoch(3)

    def batches(num_workers: int) -> list[dict[str, torch.Tensor]]:
        sampler = train_sampler(ds, seed=4)
        sampler.set_epoch(3)
        sampler.load_state_dict({"yielded": 4})
        loader = build_loader(ds, batch_size=5, num_workers=num_workers, pin_memory=True, sampler=sampler)
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 4  # 20 remaining samples, batches of 5
    for a, b in zip(main, workers, strict=True):
        assert a["image"].shape == (5, 3, 16, 16) and a["label"].shape == a["index"].shape == (5,)
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])


def test_build_dataset(tmp_path: Path) -> None:
    ds = build_dataset(DataConfig(name="synthetic", limit=12), img_size=16, in_chans=3, seed=1)
    assert isinstance(ds, SeededDataset) and len(ds) == 12
    _check_image(ds[0]["image"], (3, 16, 16))
    with pytest.raises(ValueError, match=r"data\.root is not set"):
        build_dataset(DataConfig(name="imagefolder"), img_size=16, in_chans=3)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    for j in range(4):
        _rgb(j).save(tmp_path / "train" / ("a" if j < 2 else "b") / f"{j}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), split="train", limit=3)
    ev = build_dataset(cfg, img_size=32, in_chans=3, train=False)
    assert len(ev) == 3 and isinstance(ev.dataset, SubsetDataset) and ev.classes == ["a", "b"]
    _check_image(ev[2]["image"], (3, 32, 32))
    assert ev[2]["label"] == 1
    assert "imagefolder" in describe(ev) and "3 images (first 3 of 4)" in describe(ev)


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_build_dataset_fashion_mnist() -> None:
    cfg = DataConfig(name="fashion_mnist", split="test", limit=8, mean=[0.5], std=[0.5])
    ds = build_dataset(cfg, img_size=32, in_chans=1, train=True)
    batch = next(iter(build_loader(ds, batch_size=4, num_workers=0, pin_memory=False, sampler=None)))
    _check_image(batch["image"], (4, 1, 32, 32))
    assert batch["label"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2, 3]
