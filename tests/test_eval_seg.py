"""Segmentation evaluation: mIoU, heads, datasets (Fashion-MNIST derived task, ADE20K layout), seg_eval."""

from __future__ import annotations

import copy
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semmim.data.fashion_mnist import find_fashion_mnist
from semmim.data.segmentation import (
    ADE20K_CLASSES,
    ADE20KSeg,
    FashionMNISTSeg,
    build_seg_dataset,
)
from semmim.eval.common import load_encoder
from semmim.eval.config import SegConfig
from semmim.eval.seg import (
    LinearSegHead,
    SegMetric,
    SegModel,
    UPerNet,
    feature_indices,
    miou,
    seg_eval,
    vit_intermediates,
)
from semmim.eval.seg_common import _hook_intermediates

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def _fake_fashion(root: Path, n: int = 12) -> Path:
    """Idx files of ``n`` 28x28 images: a bright rectangle whose position depends on the label."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, y in enumerate(labels):
        top, left = 2 + int(y), 4 + (int(y) % 3) * 4
        images[i, top : top + 12, left : left + 10] = rng.integers(120, 255, size=(12, 10))
        images[i, 0, 0] = 20  # a dark pixel just below the default threshold (0.1 * 255 = 25.5)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def fake_fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_fashion(tmp_path_factory.mktemp("fmnist"))


def _small_vit(img_size: int, patch_size: int, depth: int = 4, dim: int = 32) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=2,
    )


# --------------------------------------------------------------------------------------------------
# (a) mIoU
# --------------------------------------------------------------------------------------------------


def test_miou_hand_computed() -> None:
    # 4 classes; class 3 is absent from target and prediction; one pixel is ignored (255, predicted 0).
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    # counted pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (2,2)
    # class 0: TP 1, FN 1, FP 0 -> 1/2;  class 1: TP 2, FP 1 -> 2/3;  class 2: 1/1;  class 3: absent
    out = miou(pred, target, num_classes=4)
    expected = [50.0, 200.0 / 3.0, 100.0]
    assert out["per_class_iou"][:3] == pytest.approx(expected)
    assert out["per_class_iou"][3] is None
    assert out["present"] == [True, True, True, False]
    assert out["miou"] == pytest.approx(sum(expected) / 3)  # 72.22..., class 3 excluded
    assert out["pixel_acc"] == pytest.approx(80.0)  # 4 of 5 counted pixels


def test_miou_accumulates_over_batches() -> None:
    # per-batch averaging would give a different answer: batch 1 has IoU(0)=1, batch 2 IoU(0)=0
    t1, p1 = torch.tensor([[[0, 0], [1, 1]]]), torch.tensor([[[0, 0], [1, 1]]])
    t2, p2 = torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[1, 1], [1, 1]]])
    metric = SegMetric(num_classes=2)
    metric.update(p1, t1)
    metric.update(p2, t2)
    acc = metric.compute()
    whole = miou(torch.cat([p1, p2]), torch.cat([t1, t2]), num_classes=2)
    # class 0: TP 2, FN 1 -> 2/3; class 1: TP 5, FP 1 -> 5/6
    assert acc["per_class_iou"] == pytest.approx([200 / 3, 500 / 6])
    assert acc["miou"] == pytest.approx(whole["miou"]) == pytest.approx((200 / 3 + 500 / 6) / 2)
    assert acc["pixel_acc"] == pytest.approx(87.5)


def test_miou_all_ignored_is_nan() -> None:
    out = miou(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255), num_classes=3)
    assert math.isnan(out["miou"]) and out["per_class_iou"] == [None, None, None]


# --------------------------------------------------------------------------------------------------
# (b) heads and features
# --------------------------------------------------------------------------------------------------


def test_feature_indices() -> None:
    assert feature_indices(12, 4) == [3, 5, 7, 11]
    assert feature_indices(24, 4) == [7, 11, 15, 23]
    assert feature_indices(2, 4) == [0, 0, 0, 1]
    assert feature_indices(1, 4) == [0, 0, 0, 0]
    assert feature_indices(6, 1) == [5]


def test_hook_fallback_matches_forward_intermediates() -> None:
    enc = _small_vit(16, 4).eval()
    x = torch.randn(2, 3, 16, 16)
    for norm in (False, True):
        a = vit_intermediates(enc, x, [0, 0, 3], norm=norm)
        b = _hook_intermediates(enc, x, [0, 3], norm=norm)
        assert [tuple(f.shape) for f in a] == [(2, 32, 4, 4)] * 3
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[2], b[1])
    # the linear head's input (last block, final norm) is forward_features' patch tokens
    tokens = enc.forward_features(x)[:, 1:]
    torch.testing.assert_close(vit_intermediates(enc, x, [3], norm=True)[0].flatten(2).transpose(1, 2), tokens)


@pytest.mark.parametrize("head_name", ["linear", "upernet"])
def test_heads_on_tiny_encoder(tiny_teacher_dir: Path, head_name: str) -> None:
    enc, _, _ = load_encoder(tiny_teacher_dir)
    head = LinearSegHead(48, 5) if head_name == "linear" else UPerNet(48, 5, channels=16)
    model = SegModel(enc, head, frozen=True).train()
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    out = model(torch.randn(2, 3, 16, 16))  # 4x4 patch grid
    assert out.shape == (2, 5, 16, 16)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize(("img", "patch", "grid_sizes"), [(64, 8, [32, 16, 8, 4]), (8, 8, [4, 2, 1, 1])])
def test_upernet_pyramid_and_grads(img: int, patch: int, grid_sizes: list[int]) -> None:
    enc = _small_vit(img, patch, depth=4)
    head = UPerNet(32, 7, channels=8)
    model = SegModel(enc, head, frozen=False).train()
    assert model.indices == [0, 1, 2, 3]
    x = torch.randn(2, 3, img, img)
    levels = head.pyramid(model.features(x))
    assert [lv.shape[-1] for lv in levels] == grid_sizes  # strides 4, 8, 16, 32 for patch 16 (1x1: no pooling)
    out = model(x)
    assert out.shape == (2, 7, img, img)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert enc.get_submodule("blocks")[0].attn.qkv.weight.grad is not None  # fine-tuning reaches the encoder


def test_linear_head_bigger_grid() -> None:
    enc = _small_vit(64, 8, depth=2)
    model = SegModel(enc, LinearSegHead(32, 3), frozen=True)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


# --------------------------------------------------------------------------------------------------
# (f) known answer: features that determine the mask
# --------------------------------------------------------------------------------------------------


def test_linear_head_learns_trivial_features() -> None:
    torch.manual_seed(0)
    k, d, grid, up = 4, 16, 4, 4
    # regions of 2x2 patches: bilinear upsampling of the logits then only blurs where two regions meet
    labels = torch.randint(0, k, (16, grid // 2, grid // 2)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    codes = torch.randn(k, d) * 3
    feats = codes[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(16, d, grid, grid)  # (N, D, 4, 4)
    masks = labels.repeat_interleave(up, 1).repeat_interleave(up, 2)  # (N, 16, 16), patch-aligned
    head = LinearSegHead(d, k)
    opt = torch.optim.AdamW(head.parameters(), lr=0.05)
    for _ in range(20):
        loss = F.cross_entropy(head([feats], (16, 16)), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = head([feats], (16, 16)).argmax(1)
    assert miou(pred, masks, k)["miou"] > 95.0


# --------------------------------------------------------------------------------------------------
# (c) Fashion-MNIST segmentation
# --------------------------------------------------------------------------------------------------


def test_fashion_mnist_seg_fake(fake_fashion_root: Path) -> None:
    ds = FashionMNISTSeg(fake_fashion_root, "train", img_size=28, in_chans=1, limit=5)
    assert len(ds) == 5 and ds.num_classes == 11 and ds.classes[0] == "background" and len(ds.classes) == 11
    for i in range(len(ds)):
        item = ds[i]
        img, mask = item["image"], item["mask"]
        label = int(ds.base.targets[i])
        assert img.shape == (1, 28, 28) and mask.shape == (28, 28) and mask.dtype == torch.long
        assert set(mask.unique().tolist()) == {0, 1 + label}
        torch.testing.assert_close(mask == 0, img[0] <= 0.1)  # background exactly where the image is dark
        assert mask[0, 0] == 0  # intensity 20/255 < threshold
    small = FashionMNISTSeg(fake_fashion_root, "test", img_size=16, in_chans=3)
    item = small[3]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (16, 16)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert set(item["mask"].unique().tolist()) <= {0, 1 + int(small.base.targets[3])}
    bad = build_seg_dataset("fashion_mnist", fake_fashion_root, "train", 16, 1, limit=2)
    assert isinstance(bad, FashionMNISTSeg) and len(bad) == 2


@pytest.mark.skipif(find_fashion_mnist(None, "test") is None, reason="Fashion-MNIST idx files not installed")
def test_fashion_mnist_seg_real() -> None:
    ds = FashionMNISTSeg(split="test", img_size=32, in_chans=3, limit=4)
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
        values = set(item["mask"].unique().tolist())
        assert 0 in values and values <= {0, 1 + int(ds.base.targets[i])} and len(values) == 2
        gray = item["image"][0]
        assert float(gray[item["mask"] == 0].mean()) < float(gray[item["mask"] > 0].mean())


# --------------------------------------------------------------------------------------------------
# (d) ADE20K layout
# --------------------------------------------------------------------------------------------------


def _fake_ade(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate([(20, 30), (24, 16)]):
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{stem}.jpg"
            )
            labels = np.zeros((h, w), np.uint8)
            labels[:, w // 4 : w // 2], labels[:, w // 2 :], labels[h // 2 :, w // 2 :] = 1, 2, 3
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root


def test_ade20k_fake_layout(tmp_path: Path) -> None:
    root = _fake_ade(tmp_path / "ADEChallengeData2016")
    ds = ADE20KSeg(root, "validation", img_size=12)
    assert len(ds) == 2 and ds.num_classes == 150 == len(ADE20K_CLASSES) and ds.classes[0] == "wall"
    raw = np.array(Image.open(ds.samples[0][1]))
    _, mask = ds.load(0)
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(mask.numpy(), expected)  # 0 -> 255, k -> k - 1
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == (3, 12, 12) and item["mask"].shape == (12, 12)
        assert set(item["mask"].unique().tolist()) <= {255, 0, 1, 2}
    keep = ADE20KSeg(root, "validation", img_size=12, reduce_zero_label=False)
    assert keep.num_classes == 151 and set(keep[0]["mask"].unique().tolist()) <= {0, 1, 2, 3}
    # training: random scale / crop / flip, the same for image and mask, seeded by (seed, epoch, index)
    train = build_seg_dataset("ade20k", root, "train", img_size=12, in_chans=3, train=True, seed=1)
    assert isinstance(train, ADE20KSeg) and train.split == "training" and train.train
    a, b = train[1], train[1]
    assert a["image"].shape == (3, 12, 12) and a["mask"].shape == (12, 12)
    torch.testing.assert_close(a["image"], b["image"])
    assert torch.equal(a["mask"], b["mask"])
    assert set(a["mask"].unique().tolist()) <= {255, 0, 1, 2}
    gray = build_seg_dataset("ade20k", root, "test", img_size=8, in_chans=1)
    assert gray[0]["image"].shape == (1, 8, 8)


def test_ade20k_errors(tmp_path: Path) -> None:
    root = _fake_ade(tmp_path / "ade")
    missing = root / "annotations" / "training" / "ADE_train_00000001.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.png"):
        ADE20KSeg(root, "training")
    with pytest.raises(FileNotFoundError, match="images"):
        ADE20KSeg(tmp_path / "nowhere", "validation")
    bad = root / "images" / "validation" / "ADE_valid_00000000.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = ADE20KSeg(root, "validation", img_size=8)
    with pytest.raises(ValueError, match=r"ADE_valid_00000000\.jpg"):
        ds[0]
    with pytest.raises(ValueError, match="ADEChallengeData2016"):
        build_seg_dataset("ade20k", None, "train")
    with pytest.raises(ValueError, match="unknown segmentation dataset"):
        build_seg_dataset("voc", None, "train")


# --------------------------------------------------------------------------------------------------
# (e) seg_eval end to end
# --------------------------------------------------------------------------------------------------


def test_seg_eval_frozen_end_to_end(tiny_teacher_dir: Path, fake_fashion_root: Path) -> None:
    enc, mean, std = load_encoder(tiny_teacher_dir)
    before = copy.deepcopy(enc.state_dict())
    kwargs = dict(
        data="fashion_mnist",
        root=str(fake_fashion_root),
        epochs=1,
        batch_size=4,
        train_limit=8,
        test_limit=4,
        num_workers=0,
        device="cpu",
        channels=8,
        max_steps=3,
        mean=mean,
        std=std,
    )
    out = seg_eval(enc, SegConfig(head="upernet", **kwargs))
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the frozen encoder did not move
    for key in ("protocol", "head", "miou", "pixel_acc", "per_class_iou", "classes", "steps", "train_loss"):
        assert key in out
    assert out["protocol"] == "seg" and out["head"] == "upernet" and out["steps"] == 2  # 8 images / 4 per batch
    assert out["mode"] == "frozen" and out["channels"] == 8
    assert 0.0 <= out["miou"] <= 100.0 and 0.0 <= out["pixel_acc"] <= 100.0
    assert len(out["per_class_iou"]) == out["num_classes"] == 11 and math.isfinite(out["train_loss"])
    # the same run from the export path is seeded and reproducible
    a = seg_eval(str(tiny_teacher_dir), SegConfig(head="linear", **{**kwargs, "mean": None, "std": None}))
    b = seg_eval(str(tiny_teacher_dir), SegConfig(head="linear", **{**kwargs, "mean": None, "std": None}))
    assert a["miou"] == b["miou"] and a["train_loss"] == b["train_loss"]


def test_seg_eval_frozen_resizes_the_encoder(tiny_teacher_dir: Path, fake_fashion_root: Path) -> None:
    enc, mean, std = load_encoder(tiny_teacher_dir)
    before = copy.deepcopy(enc.state_dict())
    out = seg_eval(
        enc,
        SegConfig(
            root=str(fake_fashion_root),
            head="linear",
            img_size=24,  # not the encoder's 16: position embeddings are resampled to a 6x6 grid
            epochs=1,
            batch_size=4,
            train_limit=4,
            test_limit=2,
            num_workers=0,
            device="cpu",
            mean=mean,
            std=std,
        ),
    )
    assert out["img_size"] == 24 and enc.get_parameter("pos_embed").shape[1] == 1 + 36
    assert out["mode"] == "frozen" and out["lr"] == 1e-3  # lr: null is the frozen head's 1e-3
    assert torch.equal(before["blocks.0.attn.qkv.weight"], enc.state_dict()["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="patch size"):
        cfg = SegConfig(root=str(fake_fashion_root), img_size=25, mean=mean, std=std, device="cpu", num_workers=0)
        seg_eval(enc, cfg)


def test_layerwise_lr_decay_groups(tiny_teacher_dir: Path) -> None:
    from semmim.eval.seg import seg_param_groups

    enc, _, _ = load_encoder(tiny_teacher_dir)  # depth 2
    groups = {g["name"]: g for g in seg_param_groups(SegModel(enc, LinearSegHead(48, 3), frozen=False), 0.05)}
    assert groups["head.3.decay"]["lr_scale"] == 1.0
    assert groups["encoder.3.no_decay"]["lr_scale"] == 1.0  # final norm
    assert groups["encoder.2.decay"]["lr_scale"] == pytest.approx(0.65)  # block 1
    assert groups["encoder.1.decay"]["lr_scale"] == pytest.approx(0.65**2)  # block 0
    assert groups["encoder.0.no_decay"]["lr_scale"] == pytest.approx(0.65**3)  # pos_embed, cls_token
    assert groups["encoder.0.no_decay"]["weight_decay"] == 0.0 and groups["encoder.1.decay"]["weight_decay"] == 0.05
    frozen = seg_param_groups(SegModel(enc, LinearSegHead(48, 3), frozen=True), 0.05)
    assert all(g["name"].startswith("head.") for g in frozen)
