"""End-to-end fine-tuning (semmim.eval.finetune): layer-decay groups, the training loop, the export."""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from semmim.data.datasets import ImageDataset, SeededDataset
from semmim.data.fashion_mnist import find_fashion_mnist
from semmim.data.transforms import pretrain_transform
from semmim.eval import finetune as ft
from semmim.eval.classify import classify_eval, load_classifier
from semmim.eval.config import ClassifyConfig, FinetuneConfig
from semmim.eval.finetune import finetune_eval, layer_decay_groups
from semmim.export import save_encoder
from semmim.models.vit import ViTEncoder

# everything off that is not needed for a plumbing check: keeps a run to a fraction of a second
FAST: dict[str, Any] = {"num_workers": 0, "batch_size": 32, "epochs": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: one intra-op thread is faster than two fighting over a loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# (a) layer-decay parameter groups
# --------------------------------------------------------------------------------------------------


def _tiny_vit(**kw: Any) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5, **kw
    )


def test_layer_decay_groups_match_mae() -> None:
    model = _tiny_vit(global_pool="avg")
    lr, wd = 1e-3, 0.05
    groups = layer_decay_groups(model, lr, wd, layer_decay=0.5)
    by_param = {}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
        assert set(g) >= {"params", "lr", "lr_scale", "weight_decay", "layer_id"}
        for p in g["params"]:
            assert id(p) not in by_param, "a parameter is in two groups"
            by_param[id(p)] = g
    named = dict(model.named_parameters())
    assert set(by_param) == {id(p) for p in named.values() if p.requires_grad}

    def group(name: str) -> dict[str, Any]:
        return by_param[id(named[name])]

    expected = {
        "cls_token": (lr * 0.5**3, 0),
        "pos_embed": (lr * 0.5**3, 0),
        "patch_embed.proj.weight": (lr * 0.5**3, 0),
        "patch_embed.proj.bias": (lr * 0.5**3, 0),
        "blocks.0.attn.qkv.weight": (lr * 0.5**2, 1),
        "blocks.0.norm1.weight": (lr * 0.5**2, 1),
        "blocks.1.mlp.fc2.weight": (lr * 0.5, 2),
        "fc_norm.weight": (lr, 3),
        "head.weight": (lr, 3),
        "head.bias": (lr, 3),
    }
    for name, (want_lr, layer_id) in expected.items():
        assert group(name)["lr"] == pytest.approx(want_lr), name
        assert group(name)["layer_id"] == layer_id, name
    # no weight decay on biases, norms, tokens and the position embedding; decay on matrices
    for name in ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"):
        assert group(name)["weight_decay"] == 0.0, name
    for name in ("fc_norm.weight", "fc_norm.bias", "head.bias"):
        assert group(name)["weight_decay"] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight"):
        assert group(name)["weight_decay"] == wd, name


def test_layer_decay_groups_token_pool_and_frozen() -> None:
    model: Any = _tiny_vit(global_pool="token", reg_tokens=2, class_token=True)
    model.cls_token.requires_grad_(False)
    groups = layer_decay_groups(model, 1.0, 0.1, layer_decay=0.75)
    ids = {id(p): g for g in groups for p in g["params"]}
    assert id(model.cls_token) not in ids  # frozen parameters are left out
    assert ids[id(model.reg_token)]["layer_id"] == 0 and ids[id(model.reg_token)]["weight_decay"] == 0.0
    assert ids[id(model.norm.weight)]["lr"] == pytest.approx(1.0)
    assert ids[id(model.blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(0.75**2)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_groups(model, 1.0, 0.1, layer_decay=0.0)
    with pytest.raises(ValueError, match="blocks"):
        layer_decay_groups(torch.nn.Linear(2, 2), 1.0, 0.1, layer_decay=0.5)


# --------------------------------------------------------------------------------------------------
# (b) end to end on Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """The real Fashion-MNIST when installed (root None), else a small stand-in in the same idx format."""
    if find_fashion_mnist(None, "train") and find_fashion_mnist(None, "test"):
        return None
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 128)):
        labels = rng.integers(0, 10, n)
        images = np.clip(labels[:, None, None] * 25 + rng.integers(0, 40, (n, 28, 28)), 0, 255)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return str(root)


def test_finetune_end_to_end_fashion_mnist(tiny_teacher_dir: Path, fmnist_root: str | None, tmp_path: Path) -> None:
    enc_file = tiny_teacher_dir / "encoder.safetensors"
    before = _sha(enc_file)
    res = finetune_eval(
        tiny_teacher_dir,
        FinetuneConfig(
            data="fashion_mnist", root=fmnist_root, train_limit=256, test_limit=128, warmup_epochs=1, ema=True, **FAST
        ),
        out=tmp_path / "ft",
    )
    for key in ("protocol", "top1", "top5", "n_train", "n_test", "epochs", "steps", "lr", "top1_ema", "top5_ema"):
        assert key in res, key
    assert res["protocol"] == "finetune"
    assert res["n_train"] == 256 and res["n_test"] == 128 and res["num_classes"] == 10
    assert res["steps"] == 256 // 32 and res["lr"] == pytest.approx(5e-4 * 32 / 256)
    for key in ("top1", "top5", "top1_ema", "top5_ema"):
        assert 0.0 <= res[key] <= 100.0
    assert res["top5"] >= res["top1"]
    assert _sha(enc_file) == before, "fine-tuning modified the pretrained export"
    # the classifier export is a plain timm classifier that `semmim eval classify` scores identically
    net, mean, std = load_classifier(tmp_path / "ft")
    assert isinstance(net.head, torch.nn.Linear) and net.head.out_features == 10
    assert len(mean) == len(std) == 3
    again = classify_eval(
        tmp_path / "ft", ClassifyConfig(data="fashion_mnist", root=fmnist_root, limit=128, num_workers=0, device="cpu")
    )
    assert again["top1"] == pytest.approx(res["top1"]) and again["top5"] == pytest.approx(res["top5"])


# --------------------------------------------------------------------------------------------------
# (c) seeded
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_numbers(tiny_teacher_dir: Path) -> None:
    kw: dict[str, Any] = {"train_limit": 64, "test_limit": 32, "max_steps": 4, "ema": True, "ema_decay": 0.5}
    kw.update(FAST, batch_size=16)  # RandAugment, mixup / cutmix and drop path stay on: all must be seeded
    a = finetune_eval(tiny_teacher_dir, FinetuneConfig(data="synthetic", **kw))
    b = finetune_eval(tiny_teacher_dir, FinetuneConfig(data="synthetic", **kw))
    c = finetune_eval(tiny_teacher_dir, FinetuneConfig(data="synthetic", **{**kw, "seed": 1}))
    assert a["steps"] == 4
    for key in ("top1", "top5", "top1_ema", "train_loss"):
        assert a[key] == b[key], key
    assert a["train_loss"] != c["train_loss"]


def test_random_init_and_train_indices(tiny_teacher_dir: Path) -> None:
    idx = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]
    res = finetune_eval(
        f"random:{tiny_teacher_dir}",
        FinetuneConfig(
            data="synthetic", train_limit=64, test_limit=16, rand_augment=None, **{**FAST, "epochs": 2, "batch_size": 4}
        ),
        train_indices=idx,
    )
    assert res["n_train"] == len(idx)
    assert res["batch_size"] == 4 and res["steps"] == 2 * (len(idx) // 4)
    small = finetune_eval(
        tiny_teacher_dir,
        FinetuneConfig(data="synthetic", train_limit=64, test_limit=16, mixup=0, cutmix=0, **FAST),
        train_indices=[0, 1, 2],
    )
    assert small["n_train"] == 3 and small["batch_size"] == 3 and small["steps"] == 1
    with pytest.raises(IndexError, match="out of range"):
        finetune_eval(
            tiny_teacher_dir, FinetuneConfig(data="synthetic", train_limit=8, test_limit=8, **FAST), train_indices=[8]
        )


# --------------------------------------------------------------------------------------------------
# (d) a known answer: the class is the image's brightness
# --------------------------------------------------------------------------------------------------


class Brightness(ImageDataset):
    """Images whose mean grey level encodes one of 4 classes, plus noise."""

    name = "brightness"

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 4, size)
        noise = rng.integers(-20, 21, (size, 16, 16, 3))
        self.images = np.clip(self.labels[:, None, None, None] * 64 + 32 + noise, 0, 255).astype(np.uint8)
        self.classes = ["dark", "dim", "bright", "white"]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def test_learns_brightness(tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_split(data: str, root: str | None, split: str, **kw: Any) -> SeededDataset:
        return SeededDataset(Brightness(192 if split == "train" else 128, seed=0 if split == "train" else 1))

    monkeypatch.setattr(ft, "labelled_split", fake_split)
    res = finetune_eval(
        tiny_teacher_dir,
        FinetuneConfig(
            data="brightness",
            epochs=8,
            batch_size=32,
            base_lr=2e-2,
            warmup_epochs=1,
            mixup=0,
            cutmix=0,
            label_smoothing=0,
            rand_augment=None,
            drop_path=0,
            num_workers=0,
            device="cpu",
        ),
    )
    assert res["n_train"] == 192 and res["n_test"] == 128
    assert res["top1"] > 90.0, res


# --------------------------------------------------------------------------------------------------
# random erasing (timm RandomErasing after normalisation, before mixup)
# --------------------------------------------------------------------------------------------------


def _erased_box(changed: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the one box of ``changed`` (H, W), asserting it is a full rectangle."""
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert bool(box.all()), "the erased pixels form one rectangle"
    return h, w


def test_random_erasing_replaces_a_box_of_normalised_pixels() -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalised = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(ft.train_inputs(mean, std, 0.0, "cpu")(images), normalised)  # off: normalisation only
    random.seed(0)
    torch.manual_seed(0)
    erased = ft.train_inputs(mean, std, 1.0, "cpu")(images.clone())
    for i in range(8):  # probability 1: every image has one box of fresh N(0, 1) pixels, all channels
        changed = (erased[i] != normalised[i]).any(0)
        h, w = _erased_box(changed)
        assert 0.02 * 32 * 32 <= h * w <= 32 * 32 / 3 + 32  # timm's area range, up to rounding
        assert torch.equal(erased[i][:, ~changed], normalised[i][:, ~changed])
    random.seed(0)
    torch.manual_seed(0)
    assert torch.equal(ft.train_inputs(mean, std, 1.0, "cpu")(images.clone()), erased)  # seeded
    random.seed(1)
    quarter = ft.train_inputs(mean, std, 0.25, "cpu")(images.repeat(8, 1, 1, 1))
    hits = int((quarter != normalised.repeat(8, 1, 1, 1)).flatten(1).any(1).sum())
    assert 4 <= hits <= 30  # about a quarter of 64 images


def test_finetune_erases_its_training_inputs(tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    real = ft.train_inputs

    def spy(mean: Any, std: Any, reprob: float, device: Any) -> Any:
        prepare = real(mean, std, reprob, device)
        plain = real(mean, std, 0.0, device)

        def run(images: torch.Tensor) -> torch.Tensor:
            x = prepare(images.clone())
            seen.append((reprob, x, plain(images)))
            return x

        return run

    monkeypatch.setattr(ft, "train_inputs", spy)
    kw: dict[str, Any] = {**FAST, "batch_size": 8, "mixup": 0, "cutmix": 0, "rand_augment": None, "max_steps": 2}
    cfg = FinetuneConfig(data="synthetic", train_limit=16, test_limit=8, reprob=1.0, **kw)
    res = finetune_eval(tiny_teacher_dir, cfg)
    assert res["reprob"] == 1.0 and res["recipe"] == "default" and res["steps"] == 2
    assert len(seen) == 2 and all(p == 1.0 for p, _, _ in seen)
    for _, x, plain in seen:  # every training image of every step was erased somewhere
        assert bool((x != plain).flatten(1).any(1).all())


# --------------------------------------------------------------------------------------------------
# grey images, failures
# --------------------------------------------------------------------------------------------------


def test_rand_augment_on_grey_images_and_new_pillow(tmp_path: Path) -> None:
    t = pretrain_transform(16, (0.08, 1.0), rand_augment="rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    rgb = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "RGB")
    np.random.seed(0)
    for _ in range(100):  # every op, the geometric ones with an RGB fill colour and posterize to 0 bits included
        assert t(grey).shape == (1, 16, 16)
        assert t(rgb).shape == (3, 16, 16)
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=1, num_heads=2)
    save_encoder(
        tmp_path / "encoder.safetensors",
        enc.timm_state_dict(),
        enc.timm_name,
        enc.timm_kwargs(),
        extra={"mean": "[0.5]", "std": "[0.25]"},
    )
    res = finetune_eval(
        tmp_path,
        FinetuneConfig(
            data="synthetic",
            train_limit=32,
            test_limit=8,
            max_steps=2,
            global_pool="token",
            **{**FAST, "batch_size": 8},
        ),
    )
    assert res["steps"] == 2 and 0.0 <= res["top1"] <= 100.0


def test_nan_loss_names_the_step(tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_split(data: str, root: str | None, split: str, **kw: Any) -> SeededDataset:
        nan_image = (lambda img: torch.full((3, 16, 16), float("nan"))) if split == "train" else None
        return SeededDataset(Brightness(16, seed=0), transform=nan_image)

    monkeypatch.setattr(ft, "labelled_split", nan_split)
    with pytest.raises(RuntimeError, match=r"loss is nan at epoch 0, step 0"):
        finetune_eval(tiny_teacher_dir, FinetuneConfig(data="nan", **{**FAST, "batch_size": 8}))


def test_mismatched_export_is_a_clear_error(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from semmim.export import read_timm_config

    state = load_file(str(tiny_teacher_dir / "encoder.safetensors"))
    name, kwargs = read_timm_config(tiny_teacher_dir)
    state.pop("blocks.1.mlp.fc1.weight")
    state["extra.weight"] = torch.zeros(2)
    save_encoder(tmp_path / "encoder.safetensors", state, name, kwargs)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*extra\.weight"):
        finetune_eval(tmp_path, FinetuneConfig(data="synthetic", train_limit=8, test_limit=8, **FAST))
