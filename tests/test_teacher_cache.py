"""Cached teacher maps (``semmim teacher cache``, ``teacher.cache``): crop geometry, RoIAlign targets, the writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from semmim.cli import main
from semmim.config import ConfigError, load_config
from semmim.data.datasets import SeededDataset, SyntheticDataset
from semmim.data.tensor_transforms import TensorPretrainTransform, resize_uint8
from semmim.data.transforms import Clamp01, pretrain_transform
from semmim.engine.trainer import pretrain
from semmim.teachers import ModuleTeacher
from semmim.teachers.cache import (
    CropBatch,
    TeacherCache,
    check_cache_dataset,
    crop_maps,
    dequantize_int8,
    quantize_int8,
)
from semmim.teachers.cache_writer import write_cache

from .conftest import teacher_overrides, tiny_overrides
from .test_resume import Crash, _crash_at

# ------------------------------------------------------------------------------ crop geometry in items


def test_pil_transform_draws_and_images_unchanged() -> None:
    """The geometry-reporting transform gives torchvision's RandomResizedCrop + flip images, bit for bit."""
    old = T.Compose(
        [
            T.RandomResizedCrop(16, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            Clamp01(),
        ]
    )
    new = pretrain_transform(16)
    img = SyntheticDataset(4, img_size=40).load(1)[0]
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = old(img)
        torch.manual_seed(seed)
        b, geo = new.with_geometry(img)
        torch.manual_seed(seed)
        c = new(img)
        assert torch.equal(a, b) and torch.equal(a, c)
        flips.add(geo.flip)
        x0, y0, x1, y1 = geo.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert flips == {True, False}


def test_tensor_transform_box_is_the_crop() -> None:
    """Cutting the reported box out of the image and resizing (then flipping) it gives the view."""
    img = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    t = TensorPretrainTransform(16, uint8=True)
    for seed in range(8):
        torch.manual_seed(seed)
        plain = t(img)
        torch.manual_seed(seed)
        view, geo = t.with_geometry(img)
        assert torch.equal(plain, view)
        x0, y0, x1, y1 = (round(v * s) for v, s in zip(geo.box, (50, 30, 50, 30), strict=True))
        assert torch.equal(view, resize_uint8(img[:, y0:y1, x0:x1], (16, 16), hflip=geo.flip))


def test_seeded_items_carry_geometry_without_changing_images() -> None:
    ds = SeededDataset(SyntheticDataset(6, img_size=40), seed=3, transform=pretrain_transform(16))
    plain = [ds[i] for i in range(6)]
    assert "crop" not in plain[0]
    ds.geometry = True
    items = [ds[i] for i in range(6)]
    for a, b in zip(plain, items, strict=True):
        assert torch.equal(a["image"], b["image"])
        assert b["crop"].shape == (4,) and isinstance(b["flip"], bool)
    batch = torch.utils.data.default_collate(items)
    assert batch["crop"].shape == (6, 4) and batch["flip"].dtype == torch.bool


# ------------------------------------------------------------------------------ RoIAlign == teacher of the crop


class PatchMeans(nn.Module):
    """Equivariant by construction: each token is a linear map of its 4x4 patch's mean colour; the CLS attention
    is a softmax of a per-token score (restricting it to a crop and renormalising is the crop's softmax)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 8, 1)
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.proj(F.avg_pool2d(x, 4))
        return {"tokens": tokens, "cls_attn": self.score(tokens).flatten(1).softmax(dim=1)}


def _teacher(size: int) -> ModuleTeacher:
    return ModuleTeacher(PatchMeans(), embed_dim=8, image_size=size, mean=[0.5] * 3, std=[0.25] * 3, has_cls=False)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("box", [(0, 0), (2, 3), (4, 4), (1, 4)])
def test_roi_align_of_the_full_map_is_the_teacher_of_the_crop(box: tuple[int, int], flip: bool) -> None:
    """A 16x16 crop at patch-aligned offsets of a 32x32 image: cut from the full 8x8 map == teacher on the crop."""
    torch.manual_seed(1)
    img = torch.rand(1, 3, 32, 32)
    full = _teacher(32)(img, None, need_attn=True)
    maps = full.tokens[:, 1:].transpose(1, 2).reshape(1, 8, 8, 8)
    attn_map = full.cls_attn.reshape(1, 1, 8, 8)  # type: ignore[union-attr]
    i, j = box  # top-left patch (row, column)
    crop = img[:, :, 4 * i : 4 * i + 16, 4 * j : 4 * j + 16]
    if flip:
        crop = crop.flip(-1)
    online = _teacher(16)(crop, None, need_attn=True)
    norm_box = torch.tensor([[j / 8, i / 8, (j + 4) / 8, (i + 4) / 8]])
    flips = torch.tensor([flip])
    cut = crop_maps(maps, norm_box, flips, (4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(cut, online.tokens[:, 1:], atol=1e-5, rtol=1e-5)
    a = crop_maps(attn_map, norm_box, flips, (4, 4)).flatten(1)
    torch.testing.assert_close(a / a.sum(1, keepdim=True), online.cls_attn, atol=1e-6, rtol=1e-5)


def test_roi_align_shrinking_averages_every_cell() -> None:
    maps = torch.randn(2, 5, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = crop_maps(maps, boxes, torch.tensor([False, True]), (4, 4))
    torch.testing.assert_close(out[0], F.avg_pool2d(maps[:1], 2)[0])
    torch.testing.assert_close(out[1], F.avg_pool2d(maps[1:], 2)[0].flip(-1))


def test_int8_round_trip_error_bound() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, 64) * torch.rand(3, 4, 4, 1) * 10
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 4, 4)
    err = (dequantize_int8(q, scale) - x).abs().amax(dim=-1)
    assert bool((err <= x.abs().amax(dim=-1) / 254 * (1 + 1e-5)).all())


# ------------------------------------------------------------------------------ the writer and the CLI


def _overrides(teacher_dir: Path, method: str = "milan", *extra: str) -> list[str]:
    return tiny_overrides(f"method.name={method}", *teacher_overrides(teacher_dir), "data.limit=20", *extra)


def _cli_cache(teacher_dir: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code = main(["teacher", "cache", "--out", str(out), "--chunk-size", "8", *extra, *_overrides(teacher_dir)])
    assert code == 0
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_cli_writes_resumes_and_splits_over_ranks(
    tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = tmp_path / "one"
    first = _cli_cache(tiny_teacher_dir, one, capsys=capsys)
    assert (first["images"], first["chunks"], first["written"], first["skipped"]) == (20, 3, 3, 0)
    meta = json.loads((one / "cache.json").read_text())
    assert meta["dataset"]["num_images"] == 20 and meta["dim"] == 48 and meta["has_attn"] is True
    assert [(c["start"], c["stop"]) for c in meta["chunks"]] == [(0, 8), (8, 16), (16, 20)]
    again = _cli_cache(tiny_teacher_dir, one, capsys=capsys)
    assert (again["written"], again["skipped"]) == (0, 3)
    (one / "chunk-00001.safetensors").unlink()  # an interrupted run: only the missing chunk is written
    assert _cli_cache(tiny_teacher_dir, one, capsys=capsys)["written"] == 1

    two = tmp_path / "two"
    r0 = _cli_cache(tiny_teacher_dir, two, "--rank", "0", "--world", "2", capsys=capsys)
    assert sorted(p.name for p in two.glob("chunk-*")) == ["chunk-00000.safetensors", "chunk-00002.safetensors"]
    with pytest.raises(ConfigError, match="incomplete: 1 of 3 chunks missing"):
        TeacherCache(two)
    r1 = _cli_cache(tiny_teacher_dir, two, "--rank", "1", "--world", "2", capsys=capsys)
    assert (r0["written"], r1["written"]) == (2, 1)
    TeacherCache(two)
    for c in range(3):
        a, b = (load_file(str(d / f"chunk-{c:05d}.safetensors")) for d in (one, two))
        assert a.keys() == b.keys() == {"tokens", "global", "attn"}
        for k in a:
            assert torch.equal(a[k], b[k])


def test_int8_cache_is_close_to_float16(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(tiny_teacher_dir, "maskdistill"))
    write_cache(cfg, tmp_path / "f16", chunk_size=16)
    write_cache(cfg, tmp_path / "i8", dtype="int8", chunk_size=16)
    index = torch.tensor([0, 7, 19])
    a, ga, _ = TeacherCache(tmp_path / "f16").read(index)
    b, gb, _ = TeacherCache(tmp_path / "i8").read(index)
    assert not TeacherCache(tmp_path / "i8").has_attn  # block masking needs no attention
    bound = a.abs().amax(dim=1, keepdim=True) / 254 + a.abs().amax(dim=1, keepdim=True) * 2**-10
    assert bool(((a - b).abs() <= bound).all())
    assert torch.equal(ga, gb)


# ------------------------------------------------------------------------------ training from a cache


@pytest.fixture(scope="module")
def caches(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for method in ("milan", "maskdistill"):
        write_cache(load_config(None, _overrides(tiny_teacher_dir, method)), root / method, chunk_size=8)
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", ["milan", "maskdistill"])
def test_training_from_the_cache_runs_no_teacher_and_resumes_exactly(
    method: str, caches: dict[str, Path], tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import semmim.methods.base as base

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run with teacher.cache built its teacher")

    monkeypatch.setattr(base, "build_teacher", no_teacher)
    over = _overrides(
        tiny_teacher_dir, method, f"teacher.cache={caches[method]}", "method.num_masks=2", "trainer.max_steps=6"
    )
    over += ["trainer.ckpt_every_n_steps=1"]
    cfg = load_config(None, over)
    ref = pretrain(cfg, tmp_path / "ref")
    assert torch.isfinite(torch.tensor(ref.final_loss))
    out = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(cfg, out, on_step=_crash_at(4))
    pretrain(cfg, out, resume=True)
    a, b = (load_file(str(d / "encoder.safetensors")) for d in (tmp_path / "ref", out))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cached_milan_learns_on_a_fixed_batch(caches: dict[str, Path], tiny_teacher_dir: Path) -> None:
    from semmim.data.loader import build_dataset
    from semmim.methods import build_method

    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan", f"teacher.cache={caches['milan']}"))
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=True, seed=0)
    ds.geometry = True  # type: ignore[union-attr]
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    torch.manual_seed(0)
    method = build_method(cfg)
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same masks every step
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_cached_target_matches_the_cache_geometry(caches: dict[str, Path], tiny_teacher_dir: Path) -> None:
    """The target of a full, unflipped view is the stored map resampled to the student grid (4x4 = stored)."""
    from semmim.methods import build_method

    cfg = load_config(None, _overrides(tiny_teacher_dir, "maskdistill", f"teacher.cache={caches['maskdistill']}"))
    target = build_method(cfg).target
    geo = CropBatch(index=torch.tensor([3]), crop=torch.tensor([[0.0, 0.0, 1.0, 1.0]]), flip=torch.tensor([True]))
    out = target(torch.zeros(1, 3, 16, 16), (4, 4), geometry=geo)
    maps, glob, _ = TeacherCache(caches["maskdistill"]).read(torch.tensor([3]))
    want = torch.cat([glob[:, None], maps.flip(-1).flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(out.tokens, F.layer_norm(want, (want.shape[-1],), eps=1e-6), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ one-line errors


def _one_line_error(over: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        pretrain(load_config(None, over), tmp_path / "run")
    assert "\n" not in str(err.value)


def test_cache_of_another_dataset_is_refused(caches: dict[str, Path], tiny_teacher_dir: Path, tmp_path: Path) -> None:
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={caches['milan']}", "data.limit=24")
    _one_line_error(over, "holds 20 images .* training data has 24", tmp_path)
    meta = json.loads((caches["milan"] / "cache.json").read_text())
    other = dict(meta["dataset"], fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="written for other images"):
        check_cache_dataset(meta, other, "DIR")


def test_cache_of_another_teacher_is_refused(caches: dict[str, Path], tiny_teacher_dir: Path, tmp_path: Path) -> None:
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={caches['milan']}", "teacher.input_norm=data")
    _one_line_error(over, "written with teacher.input_norm='own' but this run has teacher.input_norm='data'", tmp_path)
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={caches['maskdistill']}")
    _one_line_error(over, "holds no CLS attention maps", tmp_path)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["data.rand_augment=rand-m9-mstd0.5"], "RandAugment rotates, shears and translates"),
        (["method.target=codebook", "method.target.path=x.safetensors"], "only method.target=teacher_features"),
    ],
)
def test_configs_a_cache_cannot_follow_are_refused(extra: list[str], match: str, tiny_teacher_dir: Path) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, _overrides(tiny_teacher_dir, "maskdistill", "teacher.cache=DIR", *extra))
    assert "\n" not in str(err.value)


def test_a_method_without_teacher_refuses_the_key() -> None:
    with pytest.raises(ConfigError, match="method 'mae' does not read a teacher cache"):
        load_config(None, tiny_overrides("method.name=mae", "teacher.cache=DIR"))


def test_cache_at_another_size_trains(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """--size 32 for a 16-pixel teacher: 8x8 maps (the teacher rebuilt at that size), the run's teacher recorded."""
    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    report = write_cache(cfg, tmp_path / "c32", size=32, chunk_size=8)
    assert report.map_hw == [8, 8]
    meta = json.loads((tmp_path / "c32" / "cache.json").read_text())
    assert meta["size"] == 32 and meta["teacher_grid"] == [4, 4] and meta["teacher"]["config"]["image_size"] is None
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={tmp_path / 'c32'}", "method.target.grid=native")
    assert torch.isfinite(torch.tensor(pretrain(load_config(None, over), tmp_path / "run").final_loss))


def test_image_folder_fingerprint_follows_the_files(tmp_path: Path) -> None:
    from PIL import Image

    from semmim.data.datasets import ImageFolderDataset
    from semmim.teachers.cache import dataset_identity

    for i in range(3):
        Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    first = dataset_identity(ImageFolderDataset(tmp_path), "imagefolder", str(tmp_path))
    assert first == dataset_identity(ImageFolderDataset(tmp_path), "imagefolder", str(tmp_path))
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "3.png")
    second = dataset_identity(ImageFolderDataset(tmp_path), "imagefolder", str(tmp_path))
    assert second["num_images"] == 4 and second["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_maps_read_in_the_workers_give_the_same_targets(dtype: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """Items carrying their stored maps (``SeededDataset.extras``, read in the loader's workers) give the targets
    the target reads by index itself; the reader pickles into worker processes after use."""
    import pickle

    from semmim.data.loader import build_dataset
    from semmim.methods import build_method

    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    write_cache(cfg, tmp_path / "c", dtype=dtype, chunk_size=8)
    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan", f"teacher.cache={tmp_path / 'c'}"))
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=True, seed=0)
    ds.geometry = True  # type: ignore[union-attr]
    plain = torch.utils.data.default_collate([ds[i] for i in (0, 9, 19)])
    cache = TeacherCache(tmp_path / "c")
    cache.read(torch.tensor([0]))
    ds.extras = pickle.loads(pickle.dumps(cache)).item  # type: ignore[union-attr]
    carried = torch.utils.data.default_collate([ds[i] for i in (0, 9, 19)])
    assert carried["teacher_tokens"].dtype == getattr(torch, dtype)
    a, b = (  # a fresh target each (milan's center conditioning keeps running statistics)
        build_method(cfg).target(torch.zeros(3, 3, 16, 16), (4, 4), need_attn=True, geometry=_geo(x))
        for x in (plain, carried)
    )
    assert _geo(plain).stored is None and _geo(carried).stored is not None
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cls_attn, b.cls_attn)  # type: ignore[arg-type]


def _geo(batch: dict[str, Tensor]) -> CropBatch:
    from semmim.teachers.cache import crop_batch_of

    geo = crop_batch_of(batch)
    assert geo is not None
    return geo


def test_image_folder_with_tensor_decoding(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """data.decode=torchvision: the writer resizes uint8 tensors, the tensor transform reports the crops."""
    from PIL import Image

    torch.manual_seed(0)
    for i in range(8):
        arr = (torch.rand(20, 24 + i, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    data = [f"data.root={tmp_path}", "data.name=imagefolder", "data.decode=torchvision", "data.batch_size=4"]
    over = [o for o in _overrides(tiny_teacher_dir, "maskdistill", *data) if not o.startswith("data.limit")]
    write_cache(load_config(None, over), tmp_path / "cache", chunk_size=4)
    run = load_config(None, [*over, f"teacher.cache={tmp_path / 'cache'}", "trainer.max_steps=2"])
    assert torch.isfinite(torch.tensor(pretrain(run, tmp_path / "run").final_loss))


def test_teacher_weights_replaced_in_place_are_refused(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    write_cache(load_config(None, _overrides(teacher, "milan")), tmp_path / "cache", chunk_size=8)
    weights = load_file(str(teacher / "encoder.safetensors"))
    from safetensors.torch import safe_open, save_file

    with safe_open(str(teacher / "encoder.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, str(teacher / "encoder.safetensors"), metadata=metadata)
    over = _overrides(teacher, "milan", f"teacher.cache={tmp_path / 'cache'}")
    _one_line_error(over, r"weight files changed since the cache was written \(path:encoder.safetensors\)", tmp_path)


# ------------------------------------------------------------------------------ fixed crops (--crops)


def test_crop_layouts_and_the_nearest_view() -> None:
    from semmim.teachers.cache import best_view, crop_boxes

    five = crop_boxes(5, 0.5)
    assert five == [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1], [0.25, 0.25, 0.75, 0.75]]
    nine = crop_boxes(9, 0.8)
    assert len(nine) == 9 and nine[4] == [0.1, 0.1, 0.9, 0.9] and nine[8] == [0.2, 0.2, 1.0, 1.0]
    assert crop_boxes(0, 0.3) == []
    crops = torch.tensor(five)
    assert best_view(torch.tensor([0.0, 0.0, 1.0, 1.0]), crops) == 0  # the full image
    assert best_view(torch.tensor([0.26, 0.24, 0.76, 0.74]), crops) == 5  # the centre crop (1 + its index)
    assert best_view(torch.tensor([0.5, 0.0, 1.0, 0.6]), crops) == 2  # mostly the top-right corner
    assert best_view(torch.tensor([0.0, 0.0, 0.5, 0.5]), torch.zeros(0, 4)) == 0  # no crops stored
    for count, side, match in [(3, 0.5, "--crops must be one of 0, 5, 9"), (5, 1.0, "--crop-side"), (9, 0.0, "side")]:
        with pytest.raises(ConfigError, match=match):
            crop_boxes(count, side)


@pytest.fixture(scope="module")
def crop_cache(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float16 cache of the tiny teacher with the 5 fixed crops of side 0.5 (milan's config: with attention)."""
    out = tmp_path_factory.mktemp("crops") / "c5"
    report = write_cache(
        load_config(None, _overrides(tiny_teacher_dir, "milan")), out, chunk_size=8, crops=5, crop_side=0.5
    )
    assert report.crops == 5
    return out


def test_crops_are_stored_as_the_teacher_sees_them(crop_cache: Path, tiny_teacher_dir: Path) -> None:
    """Each stored crop is the teacher's output for that crop of the image, resized to the cache's size."""
    from semmim.data.loader import build_dataset
    from semmim.methods.base import build_teacher
    from semmim.teachers.cache import crop_boxes
    from semmim.teachers.cache_writer import FullResize

    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    meta = json.loads((crop_cache / "cache.json").read_text())
    assert meta["crops"] == crop_boxes(5, 0.5)
    chunk = load_file(str(crop_cache / "chunk-00001.safetensors"))
    assert chunk.keys() == {"tokens", "global", "attn", "crop_tokens", "crop_global", "crop_attn"}
    assert chunk["crop_tokens"].shape == (8, 5, 4, 4, 48) and chunk["crop_attn"].shape == (8, 5, 4, 4)
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=False)
    views = FullResize(16, meta["crops"])(getattr(ds, "dataset", ds).load(10)[0])
    assert views.shape == (6, 3, 16, 16)
    out = build_teacher(cfg)(views, None, need_attn=True)
    torch.testing.assert_close(chunk["global"][2].float(), out.tokens[0, 0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(chunk["crop_global"][2].float(), out.tokens[1:, 0], atol=2e-3, rtol=2e-3)
    want = out.tokens[1:, 1:].reshape(5, 4, 4, 48)
    torch.testing.assert_close(chunk["crop_tokens"][2].float(), want, atol=2e-3, rtol=2e-3)


def _view_target(cache: Path, tiny_teacher_dir: Path, crop: list[float], flip: bool) -> Tensor:
    """maskdistill's target (LayerNorm of the raw tokens, no running state) of one view of image 3."""
    from semmim.methods import build_method

    cfg = load_config(None, _overrides(tiny_teacher_dir, "maskdistill", f"teacher.cache={cache}"))
    geo = CropBatch(index=torch.tensor([3]), crop=torch.tensor([crop]), flip=torch.tensor([flip]))
    return build_method(cfg).target(torch.zeros(1, 3, 16, 16), (4, 4), geometry=geo).tokens


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_a_view_on_a_stored_crop_takes_that_crops_targets(crop_cache: Path, tiny_teacher_dir: Path, flip: bool) -> None:
    """A training crop equal to stored crop k: its global token and whole map are that crop's (exact)."""
    chunk = load_file(str(crop_cache / "chunk-00000.safetensors"))
    k = 4  # the centre crop
    got = _view_target(crop_cache, tiny_teacher_dir, [0.25, 0.25, 0.75, 0.75], flip)
    maps = chunk["crop_tokens"][3, k].float()  # (h, w, D)
    maps = maps.flip(1) if flip else maps
    want = torch.cat([chunk["crop_global"][3, k].float()[None], maps.reshape(16, 48)])[None]
    torch.testing.assert_close(got, _ln(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_cells_outside_the_nearest_view_come_from_the_full_map(
    crop_cache: Path, tiny_teacher_dir: Path, flip: bool
) -> None:
    """Crop [0, 0, 0.6, 0.6]: nearest view the top-left crop [0, 0, 0.5, 0.5]; of its 4x4 cells (centres at 0.075,
    0.225, 0.375, 0.525) the last row and column lie outside it and are cut from the full image's map."""
    chunk = load_file(str(crop_cache / "chunk-00000.safetensors"))
    box = [0.0, 0.0, 0.6, 0.6]
    got = _view_target(crop_cache, tiny_teacher_dir, box, flip)
    flips = torch.tensor([flip])
    full = crop_maps(chunk["tokens"][3:4].float().permute(0, 3, 1, 2), torch.tensor([box]), flips, (4, 4))
    view = chunk["crop_tokens"][3:4, 0].float().permute(0, 3, 1, 2)
    in_view = crop_maps(view, torch.tensor([[0.0, 0.0, 1.2, 1.2]]), flips, (4, 4))
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:3, :3] = True
    inside = inside.flip(-1) if flip else inside
    patches = torch.where(inside, in_view, full)[0].flatten(1).T
    want = torch.cat([chunk["crop_global"][3, 0].float()[None], patches])[None]
    torch.testing.assert_close(got, _ln(want), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(in_view[..., 3, 3], full[..., 3, 3])  # the two sources differ where they are switched


def test_a_rerun_with_other_crops_is_refused(crop_cache: Path, tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    with pytest.raises(ConfigError, match="holds a cache of another crops"):
        write_cache(cfg, crop_cache, chunk_size=8, crops=9, crop_side=0.5)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_crop_maps_read_in_the_workers_give_the_same_targets_and_train(
    dtype: str, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """With crops, items read in the workers carry their nearest view (chosen there from their own crop box), and
    the targets equal those the target reads by index; a MILAN run (semantic masking) trains from the cache."""
    from semmim.data.loader import build_dataset
    from semmim.methods import build_method

    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    write_cache(cfg, tmp_path / "c", dtype=dtype, chunk_size=8, crops=9, crop_side=0.7)
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={tmp_path / 'c'}")
    cfg = load_config(None, over)
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=True, seed=0)
    ds.geometry = True  # type: ignore[union-attr]
    plain = torch.utils.data.default_collate([ds[i] for i in range(12)])
    ds.extras = TeacherCache(tmp_path / "c").item  # type: ignore[union-attr]
    carried = torch.utils.data.default_collate([ds[i] for i in range(12)])
    assert carried["teacher_view_box"].shape == (12, 4) and carried["teacher_view_tokens"].shape[1:3] == (4, 4)
    assert (carried["teacher_view_box"] != torch.tensor([0.0, 0.0, 1.0, 1.0])).any()  # some views are crops
    a, b = (
        build_method(cfg).target(torch.zeros(12, 3, 16, 16), (4, 4), need_attn=True, geometry=_geo(x))
        for x in (plain, carried)
    )
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cls_attn, b.cls_attn)  # type: ignore[arg-type]
    torch.testing.assert_close(a.cls_attn.sum(1), torch.ones(12))  # type: ignore[union-attr]
    run = load_config(None, [*over, "trainer.max_steps=2", "method.num_masks=2"])
    assert torch.isfinite(torch.tensor(pretrain(run, tmp_path / "run").final_loss))


def test_cli_crops_option(tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _cli_cache(tiny_teacher_dir, tmp_path / "c", "--crops", "5", "--crop-side", "0.6", capsys=capsys)
    assert report["crops"] == 5
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["crops"][4] == [0.2, 0.2, 0.8, 0.8]
    with pytest.raises(SystemExit):
        main(["teacher", "cache", "--out", str(tmp_path / "d"), "--crops", "4", *_overrides(tiny_teacher_dir)])
    assert "invalid choice: 4" in capsys.readouterr().err
    for extra, match in [
        (["--crop-side", "0.6"], "--crop-side 0.6 sizes the fixed crops, but none are stored: add --crops 5 or 9"),
        (["--pca-fit", "100"], "--pca-fit 100 fits the PCA of --pca, which is unset"),
    ]:
        assert main(["teacher", "cache", "--out", str(tmp_path / "e"), *extra, *_overrides(tiny_teacher_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
        assert not (tmp_path / "e").exists()  # refused before any work


# ------------------------------------------------------------------------------ PCA coordinates (--pca)


def test_pca_cache_stores_coordinates_and_reads_back_the_projection(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """--pca 8 of 48 dims: chunks hold 8 coordinates per token; reading maps them back to 48 dims, equal to the
    full-width cache projected onto the stored basis (up to float16 rounding)."""
    cfg = load_config(None, _overrides(tiny_teacher_dir, "maskdistill"))
    write_cache(cfg, tmp_path / "full", chunk_size=8)
    report = write_cache(cfg, tmp_path / "pca", chunk_size=8, pca=8, pca_fit=12)
    assert report.pca_dim == 8 and report.pca_explained is not None and 0.3 < report.pca_explained <= 1.0
    assert load_file(str(tmp_path / "pca" / "chunk-00000.safetensors"))["tokens"].shape == (8, 4, 4, 8)
    assert json.loads((tmp_path / "pca" / "cache.json").read_text())["pca"] == {"dim": 8, "fit_images": 12}
    basis = load_file(str(tmp_path / "pca" / "pca.safetensors"))
    comps = basis["components"]
    torch.testing.assert_close(comps @ comps.T, torch.eye(8), atol=1e-4, rtol=0)  # orthonormal directions
    index = torch.tensor([0, 9, 19])
    full, glob_full, _ = TeacherCache(tmp_path / "full").read(index)
    got, glob, _ = TeacherCache(tmp_path / "pca").read(index)
    assert got.shape == full.shape == (3, 48, 4, 4) and torch.equal(glob, glob_full)  # global tokens kept whole
    tokens = full.permute(0, 2, 3, 1)
    want = ((tokens - basis["mean"]) @ comps.T) @ comps + basis["mean"]
    torch.testing.assert_close(got.permute(0, 2, 3, 1), want, atol=2e-2, rtol=2e-2)
    err = (got - full).norm() / (full - basis["mean"].view(1, -1, 1, 1)).norm()
    assert float(err) ** 2 <= 1 - report.pca_explained + 0.1  # the variance left out, about


def test_pca_with_crops_and_int8_trains(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(tiny_teacher_dir, "milan"))
    write_cache(cfg, tmp_path / "c", dtype="int8", chunk_size=8, crops=5, crop_side=0.6, pca=16)
    chunk = load_file(str(tmp_path / "c" / "chunk-00000.safetensors"))
    assert chunk["crop_tokens"].shape == (8, 5, 4, 4, 16) and chunk["crop_scale"].shape == (8, 5, 4, 4)
    over = _overrides(tiny_teacher_dir, "milan", f"teacher.cache={tmp_path / 'c'}", "trainer.max_steps=2")
    assert torch.isfinite(torch.tensor(pretrain(load_config(None, over), tmp_path / "run").final_loss))


def test_pca_errors_and_the_shared_basis(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from semmim.teachers.cache_writer import shared_pca

    cfg = load_config(None, _overrides(tiny_teacher_dir, "maskdistill"))
    with pytest.raises(ConfigError, match="--pca keeps 1 to 47 of the teacher's 48 dims, got 48"):
        write_cache(cfg, tmp_path / "x", pca=48)
    write_cache(cfg, tmp_path / "c", chunk_size=8, pca=4)
    with pytest.raises(ConfigError, match="holds a cache of another pca"):
        write_cache(cfg, tmp_path / "c", chunk_size=8, pca=6)

    def refit() -> tuple[dict[str, Tensor], float]:
        raise AssertionError("a basis already in the cache was fitted again")

    basis, _ = shared_pca(tmp_path / "c", refit)  # another rank, or a rerun: the basis on disk
    assert basis["components"].shape == (4, 48)
    (tmp_path / "c" / "pca.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"its basis pca\.safetensors is missing"):
        TeacherCache(tmp_path / "c")


# ------------------------------------------------------------------------------ stored random crops (exact targets)


def _stored_mode_items(cache: Path, over: list[str], n: int) -> tuple[object, list[dict[str, Tensor]], TeacherCache]:
    """The training dataset as the engine sets it up for teacher.cache_crops=stored, and its first ``n`` items."""
    from semmim.data.loader import build_dataset

    cfg = load_config(None, [*over, f"teacher.cache={cache}", "teacher.cache_crops=stored"])
    ds = build_dataset(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=True, seed=0)
    reader = TeacherCache(cache)
    ds.geometry = True  # type: ignore[union-attr]
    ds.extras = reader.item  # type: ignore[union-attr]
    ds.crop_source = reader.stored_crop  # type: ignore[union-attr]
    return cfg, [ds[i] for i in range(n)], reader  # type: ignore[index]


def _check_exact(cfg: object, items: list[dict[str, Tensor]], reader: TeacherCache) -> None:
    """Every view is one of its image's stored crops with its stored flip, and its target (maskdistill: LayerNorm of
    the tokens) is the teacher's output for the view itself, mirrored or not, up to float16 storage."""
    from semmim.methods import build_method
    from semmim.methods.base import build_teacher

    target = build_method(cfg).target  # type: ignore[arg-type]
    teacher = build_teacher(cfg)  # type: ignore[arg-type]
    batch = torch.utils.data.default_collate(items)
    for i, item in enumerate(items):
        c, row = divmod(i, reader.chunk_size)
        chunk = load_file(str(reader.root / f"chunk-{c:05d}.safetensors"))
        match = torch.isclose(chunk["crop_box"][row], item["crop"], atol=1e-6).all(dim=1)
        assert bool(match.any()), (i, item["crop"], chunk["crop_box"][row])
        assert bool(item["flip"]) == bool(chunk["crop_flip"][row][match][0])
        assert torch.equal(item["teacher_view_box"], item["crop"])
    got = target(batch["image"], (4, 4), geometry=_geo(batch)).tokens
    want = _ln(teacher(batch["image"], None).tokens)  # the teacher on the very views the student sees
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert {bool(f) for f in batch["flip"]} == {True, False}


def test_stored_random_crops_give_exact_targets(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    over = _overrides(tiny_teacher_dir, "maskdistill")
    report = write_cache(load_config(None, over), tmp_path / "c", chunk_size=8, random_crops=3)
    assert report.crops == 3
    chunk = load_file(str(tmp_path / "c" / "chunk-00000.safetensors"))
    assert chunk["crop_box"].shape == (8, 3, 4) and chunk["crop_tokens"].shape == (8, 3, 4, 4, 48)
    assert chunk["crop_flip"].dtype == torch.bool and chunk["crop_flip"].shape == (8, 3)
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["random_crops"] == {"count": 3, "scale": [0.2, 1.0], "hflip": True}
    again = write_cache(load_config(None, over), tmp_path / "c2", chunk_size=8, random_crops=3)  # the same draws
    assert again.written == 3 and torch.equal(
        load_file(str(tmp_path / "c2" / "chunk-00000.safetensors"))["crop_box"], chunk["crop_box"]
    )
    cfg, items, reader = _stored_mode_items(tmp_path / "c", over, 12)
    _check_exact(cfg, items, reader)


def test_stored_random_crops_with_tensor_decoding(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        arr = (torch.rand(20 + i, 24, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / "imgs" / f"{i}.png")
    data = [f"data.root={tmp_path / 'imgs'}", "data.name=imagefolder", "data.decode=torchvision", "data.batch_size=4"]
    over = [o for o in _overrides(tiny_teacher_dir, "maskdistill", *data) if not o.startswith("data.limit")]
    write_cache(load_config(None, over), tmp_path / "c", chunk_size=4, random_crops=4)
    cfg, items, reader = _stored_mode_items(tmp_path / "c", over, 10)
    for item in items:  # uint8 views, as the tensor pipeline gives them; the teacher takes [0, 1]
        item["image"] = item["image"].float() / 255 if item["image"].dtype == torch.uint8 else item["image"]
    _check_exact(cfg, items, reader)


def test_stored_crops_train_and_resume_exactly(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    over = _overrides(tiny_teacher_dir, "milan")
    write_cache(load_config(None, over), tmp_path / "c", chunk_size=8, random_crops=2)
    run = [*over, f"teacher.cache={tmp_path / 'c'}", "teacher.cache_crops=stored", "trainer.max_steps=6"]
    cfg = load_config(None, [*run, "trainer.ckpt_every_n_steps=1"])
    pretrain(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        pretrain(cfg, tmp_path / "run", on_step=_crash_at(4))
    pretrain(cfg, tmp_path / "run", resume=True)
    a, b = (load_file(str(d / "encoder.safetensors")) for d in (tmp_path / "ref", tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stored_crop_errors(tiny_teacher_dir: Path, caches: dict[str, Path], tmp_path: Path) -> None:
    over = _overrides(tiny_teacher_dir, "milan")
    for extra, match in [
        (["teacher.cache_crops=stored"], "teacher.cache_crops=stored is read only with teacher.cache=DIR"),
        ([f"teacher.cache={caches['milan']}", "teacher.cache_crops=exact"], "must be nearest or stored, got 'exact'"),
    ]:
        with pytest.raises(ConfigError, match=match) as err:
            load_config(None, [*over, *extra])
        assert "\n" not in str(err.value)
    stored = [f"teacher.cache={caches['milan']}", "teacher.cache_crops=stored"]
    _one_line_error([*over, *stored], "has none: rewrite it with `semmim teacher cache --random-crops K`", tmp_path)
    write_cache(load_config(None, over), tmp_path / "c", chunk_size=8, random_crops=2)
    scale = [f"teacher.cache={tmp_path / 'c'}", "teacher.cache_crops=stored", "data.crop_scale=[0.5,1.0]"]
    _one_line_error([*over, *scale], r"drawn with data.crop_scale=\[0.2, 1.0\], but this run has", tmp_path)
    flips = [f"teacher.cache={tmp_path / 'c'}", "teacher.cache_crops=stored", "data.hflip=false"]
    _one_line_error([*over, *flips], "drawn with data.hflip=true, but this run has data.hflip=false", tmp_path)
    with pytest.raises(ConfigError, match="--crops 5 and --random-crops 2 both choose the stored crops"):
        write_cache(load_config(None, over), tmp_path / "d", crops=5, random_crops=2)
