"""data.decode=torchvision: decode_jpeg into uint8 tensors, tensor crops, and the guarantees of the PIL path."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from semmim.config import ConfigError, DataConfig, load_config
from semmim.data import (
    ImageFolderDataset,
    ImageTooLargeError,
    ManifestDataset,
    TensorEvalTransform,
    TensorPretrainTransform,
    build_dataset,
    decode_image,
    decode_image_tensor,
)

W, H = 80, 60


def photo(seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """A smooth, photo-like RGB array (gradients + blobs + a little noise), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, phase = [*rng.uniform(0.02, 0.12, 2).tolist(), rng.uniform(0, 6.28)]
        chans.append(128 + 90 * np.sin(fx * x + phase) * np.cos(fy * y) + rng.normal(0, 6, (h, w)))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def save(img: Image.Image, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)  # type: ignore[arg-type]
    return path


def folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        save(Image.fromarray(photo(i)), root / f"c{i % 2}" / f"im{i}.jpg", quality=90)
    return root


def as_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(np.int64)


def cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The same items as the PIL path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_items_match_the_pil_path(tmp_path: Path, uint8: bool, train: bool) -> None:
    root = folder(tmp_path)
    fast = build_dataset(cfg(root, decode="torchvision", uint8=uint8), img_size=32, in_chans=3, train=train, seed=3)
    slow = build_dataset(cfg(root, uint8=uint8), img_size=32, in_chans=3, train=train, seed=3)
    assert isinstance(fast.transform, TensorPretrainTransform if train else TensorEvalTransform)
    for i in range(len(fast)):
        a, b = fast[i]["image"], slow[i]["image"]
        assert a.shape == b.shape == (3, 32, 32)
        assert a.dtype == b.dtype == (torch.uint8 if uint8 else torch.float32)
        if not uint8:
            assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        scale = 1.0 if uint8 else 255.0
        # the same crop box and flip (same draws under the same seed), Pillow's bicubic filter on both paths
        diff = (a.double() - b.double()).abs().mean().item() * scale
        assert diff < 1.0, (i, diff)


def test_eval_resize_and_crop_of_a_portrait_image() -> None:
    img = photo(1, w=90, h=130)
    ref = TensorEvalTransform(64, uint8=True)(torch.from_numpy(img).permute(2, 0, 1))
    from semmim.data import eval_transform

    pil = eval_transform(64, uint8=True)(Image.fromarray(img))
    assert ref.shape == pil.shape == (3, 64, 64)
    assert (ref.double() - pil.double()).abs().mean() < 1.0


# --------------------------------------------------------------------------------------------------
# Seeded: the same sample gets the same crop in every worker and after a resume
# --------------------------------------------------------------------------------------------------


def test_same_seed_epoch_index_gives_the_same_crop_in_any_worker(tmp_path: Path) -> None:
    root = tmp_path / "same"
    twin = Image.fromarray(photo(7, w=120, h=90))
    for i in range(4):  # four copies of one photo: only the crop can tell the items apart
        save(twin, root / f"im{i}.jpg", quality=90)
    c = cfg(root, decode="torchvision", uint8=True)
    ds = build_dataset(c, img_size=32, in_chans=3, seed=5)
    ds.set_epoch(2)
    first = [ds[i]["image"] for i in range(4)]
    again = build_dataset(c, img_size=32, in_chans=3, seed=5)  # a fresh copy, as a resumed run builds
    again.set_epoch(2)
    assert all(torch.equal(first[i], again[i]["image"]) for i in range(4))
    assert not torch.equal(first[0], first[1])  # another index, another crop of the same picture
    ds.set_epoch(3)
    assert not torch.equal(first[0], ds[0]["image"])  # another epoch, another crop
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2)  # indices spread over two workers
    for batch in loader:
        for img, idx in zip(batch["image"], batch["index"].tolist(), strict=True):
            assert torch.equal(img, first[idx])


# --------------------------------------------------------------------------------------------------
# Decoding: EXIF, channels, formats
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_the_pil_path(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(photo(2)), tmp_path / "o.jpg", quality=95, exif=exif.tobytes())
    fast, slow = decode_image_tensor(path), np.asarray(decode_image(path))
    assert fast.dtype == torch.uint8
    assert as_hwc(fast).shape == slow.shape
    assert np.abs(as_hwc(fast) - slow).mean() < 0.5
    if orientation in (5, 6, 7, 8):
        assert fast.shape[1:] == (W, H)


def _variants(tmp_path: Path) -> dict[str, Path]:
    rgb = Image.fromarray(photo(3))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(photo(4)[:, :, 0]))
    sixteen = Image.fromarray((photo(5)[:, :, 0].astype(np.uint16) * 257).astype(np.uint16))
    return {
        "gray.jpg": save(rgb.convert("L"), tmp_path / "gray.jpg", quality=95),
        "cmyk.jpg": save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95),
        "rgb.png": save(rgb, tmp_path / "rgb.png"),
        "rgba.png": save(rgba, tmp_path / "rgba.png"),
        "palette.png": save(rgb.convert("P"), tmp_path / "palette.png"),
        "gray16.png": save(sixteen, tmp_path / "gray16.png"),
        "rgb.webp": save(rgb, tmp_path / "rgb.webp", lossless=True),
        "palette.gif": save(rgb.convert("P"), tmp_path / "palette.gif"),
        "rgb.bmp": save(rgb, tmp_path / "rgb.bmp"),  # not a torchvision format: through PIL
        "rgb.tiff": save(rgb, tmp_path / "rgb.tiff"),
    }


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_grayscale_cmyk_png_and_other_formats_as_the_pil_path(tmp_path: Path, mode: str) -> None:
    for name, path in _variants(tmp_path).items():
        fast = decode_image_tensor(path, mode)
        slow = np.asarray(decode_image(path, mode))
        slow = slow[:, :, None] if slow.ndim == 2 else slow
        assert fast.dtype == torch.uint8 and fast.shape == (3 if mode == "RGB" else 1, H, W), name
        # the same pixels up to rounding (grey weights and CMYK conversions round differently by 1)
        assert np.abs(as_hwc(fast) - slow).mean() < 1.0, name


def test_grey_of_a_colour_jpeg_or_png_is_pils_luma(tmp_path: Path) -> None:
    """data.decode=torchvision with one channel: libjpeg's Y (before the RGB clamp) and libpng's grey differ from
    PIL's convert("L") by up to ~20/255 on saturated colours; the fast path computes PIL's luma instead."""
    blocks = np.random.default_rng(7).choice([0, 40, 215, 255], size=(H // 4, W // 4, 3)).astype(np.uint8)
    rgb = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))  # saturated colours, sharp edges
    rgba = rgb.copy()
    rgba.putalpha(128)
    for path in (
        save(rgb, tmp_path / "rgb.jpg", quality=90),
        save(rgb, tmp_path / "rgb.png"),
        save(rgba, tmp_path / "rgba.png"),
        save(rgb.convert("P"), tmp_path / "p.png"),
    ):
        fast = decode_image_tensor(path, "L")
        slow = np.asarray(decode_image(path, "L")).astype(np.int32)
        assert fast.shape == (1, H, W), path.name
        assert np.abs(fast[0].numpy().astype(np.int32) - slow).max() <= 1, path.name


# --------------------------------------------------------------------------------------------------
# The pixel budget and broken files go through the bad-file path
# --------------------------------------------------------------------------------------------------


def test_over_budget_image_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    path = save(Image.fromarray(photo(0)), tmp_path / "big.jpg", quality=90)

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded an image over the pixel budget")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_decode)
    with pytest.raises(ImageTooLargeError, match=r"80x60 = 4800 pixels, more than data.max_image_pixels=4799"):
        decode_image_tensor(path, max_pixels=W * H - 1)


def test_over_budget_image_is_skipped_with_the_clear_reason(tmp_path: Path) -> None:
    root = folder(tmp_path / "f", n=4)
    save(Image.fromarray(photo(9, w=200, h=100)), root / "c0" / "big.jpg", quality=90)
    ds = ImageFolderDataset(root, max_bad_fraction=0.5, max_image_pixels=W * H, decode="torchvision")
    big = [Path(p).name for p, _ in ds.samples].index("big.jpg")
    reason = r"big\.jpg: (ImageTooLargeError: )?200x100 = 20000 pixels, more than data.max_image_pixels=4800"
    with pytest.warns(RuntimeWarning, match=reason):  # the PIL path's reason (the class name as the merge has it)
        img, _ = ds.load(big)
    assert isinstance(img, torch.Tensor) and img.shape == (3, H, W)
    assert ds.last_skipped == 1 and ds.bad_files == [str(root / "c0" / "big.jpg")]


def test_corrupt_files_are_skipped_and_counted_as_on_the_pil_path(tmp_path: Path) -> None:
    root = folder(tmp_path / "f", n=4)
    good = (root / "c0" / "im0.jpg").read_bytes()
    (root / "c1" / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "b_garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(300))
    (root / "c1" / "b_empty.jpg").write_bytes(b"")
    (root / "c1" / "b_text.png").write_bytes(b"not an image at all")
    results = {}
    for decode in ("pil", "torchvision"):
        ds = build_dataset(cfg(root, decode=decode, max_bad_fraction=0.9, uint8=True), img_size=16, in_chans=3)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            items = [ds[i] for i in range(len(ds))]
        skipped = {Path(ds.dataset.samples[i][0]).name for i, it in enumerate(items) if it["skipped"]}
        warned = [str(w.message) for w in record if "skipping unreadable image" in str(w.message)]
        results[decode] = (skipped, len(warned), sorted(ds.dataset.bad_files))
        assert all(it["image"].shape == (3, 16, 16) for it in items)
    assert results["torchvision"] == results["pil"]
    assert results["torchvision"][0] == {"b_truncated.jpg", "b_garbage.jpg", "b_empty.jpg", "b_text.png"}


def test_manifest_with_the_torchvision_decode(tmp_path: Path) -> None:
    folder(tmp_path / "imgs", n=3)
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([(f"imgs/c{i % 2}/im{i}.jpg", f"photo {i}") for i in range(3)])
    ds = ManifestDataset(path, decode="torchvision")
    img, _ = ds.load(1)
    assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.shape == (3, H, W)
    item = build_dataset(
        DataConfig(name="manifest", root=str(path), decode="torchvision", uint8=True), img_size=24, in_chans=1
    )[2]
    assert item["image"].shape == (1, 24, 24) and item["caption"] == "photo 2"


def test_tensor_transforms_refuse_a_pil_image() -> None:
    with pytest.raises(TypeError, match="uint8 image tensor"):
        TensorPretrainTransform(16)(Image.new("RGB", (8, 8)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint8 image tensor"):
        TensorEvalTransform(16)(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------------------
# Config conflicts: one-line errors before any work
# --------------------------------------------------------------------------------------------------


def test_config_refuses_rand_augment_with_the_torchvision_decode() -> None:
    needle = r"data.decode=torchvision does not combine with data.rand_augment=rand-m9.*: set data.decode=pil, or"
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["data.root=/x", "data.decode=torchvision", "data.rand_augment=rand-m9-mstd0.5-inc1"])


@pytest.mark.parametrize("name", ["synthetic", "fashion_mnist"])
def test_config_refuses_datasets_without_image_files(name: str) -> None:
    needle = rf"data.decode=torchvision .* available for data.name=.*; dataset '{name}' does"
    with pytest.raises(ConfigError, match=needle + r" not support it: set data.decode=pil"):
        load_config(None, [f"data.name={name}", "data.decode=torchvision"])


def test_config_refuses_an_unknown_decode() -> None:
    with pytest.raises(ConfigError, match=r"data.decode='opencv' is not one of pil, torchvision"):
        load_config(None, ["data.root=/x", "data.decode=opencv"])


def test_build_dataset_refuses_the_same_conflicts() -> None:
    with pytest.raises(ValueError, match="dataset 'synthetic' does not support it"):
        build_dataset(DataConfig(name="synthetic", limit=4, decode="torchvision"), img_size=16, in_chans=3)
    assert load_config(None, ["data.root=/x", "data.decode=torchvision"]).data.decode == "torchvision"


@pytest.mark.parametrize("train", [True, False])
def test_shards_with_the_torchvision_decode_match_the_pil_path(tmp_path: Path, train: bool) -> None:
    """WebDataset shards decode their JPEG members with the same tensor path (same crops as PIL, within 1/255)."""
    from semmim.data import write_shards

    src = build_dataset(cfg(folder(tmp_path / "src")), img_size=32, in_chans=3, train=False)
    write_shards(src, tmp_path / "shards", shard_size=3, image_format="png", progress=False)
    shards = str(tmp_path / "shards")
    kw = {"name": "webdataset", "root": shards, "num_samples": 6, "batch_size": 2, "uint8": True}
    fast = build_dataset(DataConfig(**kw, decode="torchvision"), img_size=16, in_chans=3, train=train, seed=1)
    slow = build_dataset(DataConfig(**kw), img_size=16, in_chans=3, train=train, seed=1)
    assert fast.decode == "torchvision" and isinstance(
        fast.transform, TensorPretrainTransform if train else TensorEvalTransform
    )
    a, b = list(fast), list(slow)
    assert [x["index"] for x in a] == [x["index"] for x in b] and len(a) == 6
    for x, y in zip(a, b, strict=True):
        assert x["image"].dtype == torch.uint8 and x["image"].shape == (3, 16, 16)
        assert (x["image"].double() - y["image"].double()).abs().mean() < 1.0


def test_decode_bytes_from_a_file_object() -> None:
    buf = io.BytesIO()
    Image.fromarray(photo(0)).save(buf, "JPEG", quality=90)
    buf.seek(0)
    assert decode_image_tensor(buf, "L").shape == (1, H, W)


# --------------------------------------------------------------------------------------------------
# End to end: a training run on the fast path resumes exactly
# --------------------------------------------------------------------------------------------------


def test_pretrain_with_the_torchvision_decode_resumes_exactly(tmp_path: Path) -> None:
    from semmim.engine import pretrain
    from semmim.engine.metrics import read_metrics
    from tests.conftest import tiny_overrides

    root = folder(tmp_path / "photos", n=24)
    overrides = tiny_overrides(
        "data.name=imagefolder",
        f"data.root={root}",
        "data.decode=torchvision",
        "data.uint8=true",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
    )
    cfg = load_config(None, overrides)
    pretrain(cfg, tmp_path / "full")
    assert load_config(tmp_path / "full" / "config.yaml").data.decode == "torchvision"
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}

    from tests.test_resume import Crash, _crash_at

    with pytest.raises(Crash):
        pretrain(cfg, tmp_path / "crashed", on_step=_crash_at(3))
    pretrain(cfg, tmp_path / "crashed", resume=True)
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "crashed")}
    assert sorted(resumed) == sorted(full) == [1, 2, 3, 4]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_header_over_pillows_warning_limit_raises_ours_without_pillows_warning(tmp_path: Path) -> None:
    """A header between data.max_image_pixels and 2x Pillow's limit: our error as on the PIL path, no
    DecompressionBombWarning printed for every such file."""
    import struct
    import warnings
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)  # 100 Mpx > Pillow's 89 Mpx warning limit
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    for decode in (decode_image_tensor, decode_image):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageTooLargeError) as info:
                decode(path)
        assert str(info.value) == (
            "10000x10000 = 100 Mpx, more than data.max_image_pixels=64000000 (a decompression bomb?)"
        ), decode.__name__
