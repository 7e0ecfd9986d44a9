"""Training throughput, analytic FLOPs and MFU of the semmim methods (MAE, MILAN, MaskDistill, RILS, supmim).

For every method x ViT size the paper recipe (``configs/<method>/vit_base_p16_in1k.yaml``) is built
with the student resized to ViT-Ti/S/B and a randomly initialised teacher of CLIP ViT-B/16's shape
(width 768, depth 12, 12 heads, patch 16, 512-d projection; random weights cost the same as the real
ones). RILS uses the offline MiniLM text tower, locked, with its caption embeddings cached (as in
training with a locked tower). A full training step is timed: forward + backward + AdamW step
(fused AdamW and bf16 autocast on CUDA, fp32 on CPU), on a synthetic batch built once on the device.

Reported per run: images/s, analytic FLOPs per image (formula in ``flops.py`` and in the Markdown),
a cross-check of the formula against ``torch.utils.flop_counter.FlopCounterMode`` on the real method,
MFU against the device's bf16 dense peak and against a large matmul measured in the same process,
the visible-only (MAE) vs dense (mask-token) encoder speed-up, and MAE's scaling with batch size,
image size and model size. Writes ``<device>.json`` and ``<device>.md`` (and ``<device>_profile.txt``
with ``--profile``) into ``--out``.

    python benchmarks/throughput.py                       # CUDA if available: full grid
    python benchmarks/throughput.py --device cpu --quick  # CPU: ViT-Ti/S, small batch, few steps
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flops import FlopBreakdown, StepShape, ViTShape, encoder_step_flops, method_flops, multi_mask
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
METHODS = ("mae", "milan", "maskdistill", "rils", "supmim")
TEACHER_METHODS = ("milan", "maskdistill")
DENSE_CHECK_MODEL = "s"
DENSE_CHECK_THRESHOLD = 2.5
"""On CPU, ViT-S's visible-only encoder (75% masked) must train at least this much faster than the dense one."""


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class ModelPreset:
    """A student size, the teacher it is paired with and (for tiny presets) a smaller decoder.

    Attributes:
        name: short name used on the command line (ti, s, b).
        label: human-readable name (ViT-S/16).
        encoder: the student ViT.
        teacher: the frozen teacher of MILAN/MaskDistill.
        decoder: (embed_dim, depth, num_heads) replacing the recipes' decoders; None keeps them.
        timm_name: timm architecture of the student (only used for export metadata).
    """

    name: str
    label: str
    encoder: ViTShape
    teacher: ViTShape
    decoder: tuple[int, int, int] | None = None
    timm_name: str = "vit_base_patch16_224"


CLIP_B16 = ViTShape(embed_dim=768, depth=12, num_heads=12, patch_size=16, proj_dim=512)
"""CLIP ViT-B/16's image tower: the teacher of the MILAN and MaskDistill recipes."""

PRESETS: dict[str, ModelPreset] = {
    "ti": ModelPreset("ti", "ViT-Ti/16", ViTShape(192, 12, 3), CLIP_B16, timm_name="vit_tiny_patch16_224"),
    "s": ModelPreset("s", "ViT-S/16", ViTShape(384, 12, 6), CLIP_B16, timm_name="vit_small_patch16_224"),
    "b": ModelPreset("b", "ViT-B/16", ViTShape(768, 12, 12), CLIP_B16, timm_name="vit_base_patch16_224"),
    # hidden: for tests and smoke runs (img 32)
    "tiny": ModelPreset(
        "tiny",
        "ViT-tiny/8 (test)",
        ViTShape(64, 2, 2, patch_size=8),
        ViTShape(48, 2, 3, patch_size=8, proj_dim=32),
        decoder=(32, 1, 2),
        timm_name="vit_tiny_patch16_224",
    ),
}

PEAK_BF16_DENSE: dict[str, float] = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (no sparsity) by device-name fragment, most specific first."""


@dataclass(frozen=True)
class RunProfile:
    """Defaults of a run: ``full`` (CUDA) or ``quick`` (CPU, or ``--quick``)."""

    models: tuple[str, ...]
    batch_size: int
    img_size: int
    batch_sizes: tuple[int, ...]
    img_sizes: tuple[int, ...]
    dense_img_size: int
    steps: int
    warmup: int
    repeats: int


FULL = RunProfile(("ti", "s", "b"), 128, 224, (32, 64, 128, 256), (224, 336, 448), 224, 20, 5, 3)
QUICK = RunProfile(("ti", "s"), 8, 224, (4, 8, 16), (112, 160, 224), 224, 3, 1, 3)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """One timed training configuration."""

    method: str
    model: str
    img_size: int
    batch_size: int
    steps: int
    images_per_s: float | None = None
    step_ms: float | None = None
    train_flops_per_image: int | None = None
    forward_flops_per_image: int | None = None
    achieved_tflops: float | None = None
    mfu_peak: float | None = None
    mfu_matmul: float | None = None
    peak_mem_gib: float | None = None
    flops_by_part: dict[str, float] | None = None
    """Share of the training FLOPs in the teacher, the student encoder and the rest (decoder, heads, losses)."""
    error: str | None = None


@dataclass
class FlopCheck:
    """Analytic FLOPs vs FlopCounterMode on the real method (per image)."""

    method: str
    model: str
    img_size: int
    batch_size: int
    analytic_forward: int
    counted_forward: int
    analytic_train: int
    counted_train: int
    sdpa_backend: str

    @property
    def ratio_forward(self) -> float:
        return self.counted_forward / self.analytic_forward

    @property
    def ratio_train(self) -> float:
        return self.counted_train / self.analytic_train

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio_forward": self.ratio_forward, "ratio_train": self.ratio_train}


@dataclass
class DenseResult:
    """Encoder-only forward + backward: visible-only tokens vs the dense mask-token path."""

    model: str
    img_size: int
    batch_size: int
    mask_ratio: float
    visible_tokens: int
    dense_tokens: int
    visible_images_per_s: float
    dense_images_per_s: float
    speedup: float
    speedups: list[float]
    flops_ratio: float
    """Analytic FLOPs of the dense path / the visible path."""


@dataclass
class Env:
    torch: str
    python: str
    device: str
    device_name: str
    threads: int
    date: str
    git_commit: str | None
    git_dirty: bool | None
    cuda: str | None
    loadavg_at_start: list[float] | None
    platform: str
    sdpa_counted_by_flop_counter: bool


# ---------------------------------------------------------------------------------------------- environment
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository, or (None, None) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
        return commit, bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({os.cpu_count()} logical cores)"


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16_DENSE.items():
        if fragment in name:
            return peak
    return None


def sdpa_counted(device: torch.device) -> bool:
    """Whether FlopCounterMode counts ``F.scaled_dot_product_attention`` with the default backend here.

    In torch 2.x the CUDA kernels (flash, efficient, cuDNN) have FLOP formulas, the CPU flash kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has none and counts 0.
    """
    q = torch.randn(1, 1, 8, 8, device=device)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def collect_env(device: torch.device) -> Env:
    commit, dirty = git_state()
    return Env(
        torch=torch.__version__,
        python=platform.python_version(),
        device=device.type,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        git_commit=commit,
        git_dirty=dirty,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        loadavg_at_start=loadavg(),
        platform=platform.platform(),
        sdpa_counted_by_flop_counter=sdpa_counted(device),
    )


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls.

    On CUDA the device is synchronised only around the timed loop (CUDA events), never per step.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_rate(device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """Measured FLOP/s of a large square matmul (8192^2 bf16 on CUDA, 2048^2 fp32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_steps(lambda: torch.mm(a, b), repeats, 2, device)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / seconds}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- methods
class TeacherFactory:
    """Random-weight teachers exported like semmim runs (``teacher.name=timm teacher.path=DIR``), cached."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[tuple[ViTShape, int], Path] = {}

    def directory(self, shape: ViTShape, img_size: int) -> Path:
        key = (shape, img_size)
        if key not in self._dirs:
            from safetensors.torch import save_file

            from semmim.export import save_encoder
            from semmim.models.vit import ViTEncoder

            enc = ViTEncoder(
                img_size=img_size,
                patch_size=shape.patch_size,
                embed_dim=shape.embed_dim,
                depth=shape.depth,
                num_heads=shape.num_heads,
                mlp_ratio=shape.mlp_ratio,
                timm_name="vit_base_patch16_224",
            )
            out = self.root / f"teacher_{shape.embed_dim}x{shape.depth}_p{shape.patch_size}_{img_size}"
            save_encoder(out / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
            if shape.proj_dim:  # CLIP's proj on every token, picked up by the timm teacher
                weight = torch.randn(shape.proj_dim, shape.embed_dim) * shape.embed_dim**-0.5
                save_file({"weight": weight.contiguous()}, str(out / "image_projection.safetensors"))
            self._dirs[key] = out
        return self._dirs[key]


def recipe_file(method: str) -> Path:
    """The ViT-B/16 paper recipe of ``method``."""
    return REPO / "configs" / method / "vit_base_p16_in1k.yaml"


def recipe_section(method: str, section: str) -> dict[str, Any]:
    """One section of ``method``'s recipe as written (bases merged, no defaults)."""
    from semmim.config import compose

    return dict(compose(recipe_file(method)).get(section) or {})


def teacher_shape(method: str, preset: ModelPreset) -> ViTShape:
    """The preset's CLIP teacher, without its projection when the recipe regresses the last block's raw tokens."""
    if recipe_section(method, "teacher").get("tokens") == "last_block":
        return replace(preset.teacher, proj_dim=None)
    return preset.teacher


def recipe_overrides(
    method: str, preset: ModelPreset, img_size: int, teacher_dir: Path | None, num_masks: int = 1
) -> list[str]:
    """``key=value`` overrides that turn the ViT-B/16 paper recipe into this benchmark's configuration."""
    e = preset.encoder
    beit = recipe_section(method, "model").get("rel_pos_bias", "none") != "none"  # exports to timm's BEiT
    out = [
        f"model.img_size={img_size}",
        f"model.patch_size={e.patch_size}",
        f"model.embed_dim={e.embed_dim}",
        f"model.depth={e.depth}",
        f"model.num_heads={e.num_heads}",
        f"model.mlp_ratio={e.mlp_ratio}",
        f"model.timm_name={'beit_base_patch16_224' if beit else preset.timm_name}",
        "data.name=synthetic",
    ]
    # RILS's decoder has the encoder's width; MaskDistill's linear head and CLIP take no decoder shape
    if preset.decoder is not None and method not in ("rils", "maskdistill", "clip"):
        dim, depth, heads = preset.decoder
        out += [f"decoder.embed_dim={dim}", f"decoder.depth={depth}", f"decoder.num_heads={heads}"]
    if method in TEACHER_METHODS:
        assert teacher_dir is not None
        out += ["teacher.name=timm", f"teacher.path={teacher_dir}", "teacher.model=null", "teacher.pretrained=null"]
        out += ["teacher.tokens=null"]  # the timm stand-in is built with the tokens' shape (teacher_shape)
    if method == "rils":
        out += ["text.name=minilm", "text.model=null", "text.locked=true", "method.text_head=linear"]
    if method == "supmim":
        out += ["method.num_classes=1000"]
    if num_masks > 1 and multi_mask(method):
        out += [f"method.num_masks={num_masks}"]
    return out


def build_config(method: str, preset: ModelPreset, img_size: int, teachers: TeacherFactory, num_masks: int = 1) -> Any:
    from semmim.config import load_config

    teacher_dir = teachers.directory(teacher_shape(method, preset), img_size) if method in TEACHER_METHODS else None
    return load_config(recipe_file(method), recipe_overrides(method, preset, img_size, teacher_dir, num_masks))


def step_shape(method: str, cfg: Any, preset: ModelPreset, batch_size: int, text_dim: int = 384) -> StepShape:
    """The analytic description of ``method``'s training step built from ``cfg``."""
    m = cfg.model
    default_ratio = 0.4 if method == "maskdistill" else 0.75
    return StepShape(
        method=method,
        encoder=ViTShape(m.embed_dim, m.depth, m.num_heads, m.patch_size, m.mlp_ratio),
        img_size=m.img_size,
        in_chans=m.in_chans,
        mask_ratio=cfg.method.masker["mask_ratio"] if cfg.method.masker else default_ratio,
        decoder_dim=cfg.decoder["embed_dim"] if cfg.decoder and "embed_dim" in cfg.decoder else 0,
        decoder_depth=cfg.decoder["depth"] if cfg.decoder and "depth" in cfg.decoder else 0,
        teacher=teacher_shape(method, preset) if method in TEACHER_METHODS else None,
        text_dim=text_dim,
        embed_dim=getattr(cfg.method, "embed_dim", 0),
        captions=batch_size,
        kl_projection=getattr(cfg.method, "kl_projection", "shared"),
        text_head=getattr(cfg.method, "text_head", "linear") == "linear",
        num_classes=getattr(cfg.method, "num_classes", None) or 1000,
        num_masks=int(cfg.method.num_masks),
    )


def make_batch(batch_size: int, img_size: int, device: torch.device, in_chans: int = 3) -> dict[str, Any]:
    """A synthetic batch on the device: images in [0, 1], labels and one distinct caption per image."""
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(batch_size, in_chans, img_size, img_size, generator=gen).to(device),
        "label": torch.randint(0, 1000, (batch_size,), generator=gen).to(device),
        "caption": [f"a photo of object number {i}" for i in range(batch_size)],
    }


def slice_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


class TrainStep:
    """One optimisation step of a method: forward (autocast on CUDA) + backward + AdamW."""

    def __init__(self, method: nn.Module, device: torch.device, compile: bool = False) -> None:
        self.method = method
        self.device = device
        self.forward = torch.compile(method) if compile else method
        params = [p for p in method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=device.type == "cuda"
        )

    def __call__(self, batch: dict[str, Any]) -> None:
        with autocast(self.device):
            loss = self.forward(batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def countable_attention(device: torch.device) -> Iterator[str]:
    """Run SDPA on a backend FlopCounterMode can count (the math backend where the default counts 0)."""
    if sdpa_counted(device):
        yield "default"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield "math"


def count_flops(method: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[int, int, str]:
    """(forward, forward + backward, SDPA backend) FLOPs of one step of ``method`` counted by FlopCounterMode."""
    with countable_attention(device) as backend:
        with FlopCounterMode(display=False) as fwd, autocast(device):
            loss = method(batch)["loss"]
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    method.zero_grad(set_to_none=True)
    forward = fwd.get_total_flops()
    return forward, forward + bwd.get_total_flops(), backend


def flop_check(
    name: str, preset: ModelPreset, cfg: Any, method: nn.Module, batch: dict[str, Any], device: torch.device
) -> FlopCheck:
    n = batch["image"].shape[0]
    analytic = method_flops(step_shape(name, cfg, preset, n, text_dim_of(method)))
    forward, train, backend = count_flops(method, batch, device)
    return FlopCheck(
        method=name,
        model=preset.name,
        img_size=cfg.model.img_size,
        batch_size=n,
        analytic_forward=analytic.forward,
        counted_forward=forward // n,
        analytic_train=analytic.train,
        counted_train=train // n,
        sdpa_backend=backend,
    )


def text_dim_of(method: nn.Module) -> int:
    text = getattr(method, "text_encoder", None)
    return int(getattr(text, "embed_dim", 384))


def flops_by_part(breakdown: FlopBreakdown) -> dict[str, float]:
    """Fractions of the training FLOPs in the teacher, the student encoder and the rest."""
    parts = {"teacher": 0, "encoder": 0, "decoder_heads": 0}
    for term in breakdown.terms:
        part = term.name.split(".")[0]
        parts[part if part in parts else "decoder_heads"] += term.train
    return {k: v / breakdown.train for k, v in parts.items()}


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_s / peak


@dataclass
class Context:
    """What every measurement needs: device, step counts, peaks and the teacher factory."""

    device: torch.device
    steps: int
    warmup: int
    compile: bool
    num_masks: int
    teachers: TeacherFactory
    peak: float | None
    matmul: float
    skipped: dict[str, str] = field(default_factory=dict)


def build_method(name: str, preset: ModelPreset, img_size: int, ctx: Context) -> tuple[nn.Module, Any]:
    from semmim.methods import build_method as semmim_build_method

    torch.manual_seed(0)
    cfg = build_config(name, preset, img_size, ctx.teachers, ctx.num_masks)
    method = semmim_build_method(cfg).to(ctx.device)
    method.train()
    return method, cfg


def run_train(
    name: str, preset: ModelPreset, img_size: int, batch_size: int, ctx: Context, flop_batch: int | None = None
) -> tuple[TrainResult, FlopCheck | None]:
    """Time ``name`` on ``preset`` and (with ``flop_batch``) cross-check its FLOPs with FlopCounterMode."""
    result = TrainResult(name, preset.name, img_size, batch_size, ctx.steps)
    check = None
    method: nn.Module | None = None
    try:
        method, cfg = build_method(name, preset, img_size, ctx)
        batch = make_batch(batch_size, img_size, ctx.device, cfg.model.in_chans)
        analytic = method_flops(step_shape(name, cfg, preset, batch_size, text_dim_of(method)))
        step = TrainStep(method, ctx.device, ctx.compile)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        seconds = time_steps(lambda: step(batch), ctx.steps, ctx.warmup, ctx.device)
        ips = batch_size / seconds
        achieved = analytic.train * ips
        result.images_per_s = ips
        result.step_ms = seconds * 1e3
        result.train_flops_per_image = analytic.train
        result.forward_flops_per_image = analytic.forward
        result.flops_by_part = flops_by_part(analytic)
        result.achieved_tflops = achieved / 1e12
        result.mfu_peak = mfu(achieved, ctx.peak)
        result.mfu_matmul = mfu(achieved, ctx.matmul)
        if ctx.device.type == "cuda":
            result.peak_mem_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        if flop_batch:
            check = flop_check(name, preset, cfg, method, slice_batch(batch, min(flop_batch, batch_size)), ctx.device)
    except torch.OutOfMemoryError:
        result.error = "out of memory"
    except (ImportError, OSError) as e:  # e.g. the offline text tower is missing
        result.error = f"{type(e).__name__}: {e}"
        ctx.skipped[name] = result.error
    finally:
        del method
        free_memory(ctx.device)
    return result, check


# ---------------------------------------------------------------------------------------------- visible vs dense
def visible_vs_dense(
    preset: ModelPreset, img_size: int, batch_size: int, ctx: Context, repeats: int, mask_ratio: float = 0.75
) -> DenseResult:
    """Encoder forward + backward on the visible tokens (``forward_visible``) vs all tokens with mask tokens.

    The two paths are timed in alternating rounds (``repeats`` of each) so background load hits both
    alike; the speed-up is the median of the per-round ratios.
    """
    from semmim.masking import random_masking
    from semmim.models.vit import ViTEncoder

    e = preset.encoder
    torch.manual_seed(0)
    enc = ViTEncoder(
        img_size=img_size,
        patch_size=e.patch_size,
        embed_dim=e.embed_dim,
        depth=e.depth,
        num_heads=e.num_heads,
        mlp_ratio=e.mlp_ratio,
        mask_token=True,
    ).to(ctx.device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=ctx.device)
    mask = random_masking(batch_size, enc.num_patches, mask_ratio, ctx.device)
    ids_keep, _, _ = mask.require_ids("the visible-only encoder")

    def step(dense: bool) -> Callable[[], None]:
        def run() -> None:
            with autocast(ctx.device):
                out = enc.forward_masked(x, mask.mask) if dense else enc.forward_visible(x, ids_keep)
            out.float().mean().backward()
            enc.zero_grad(set_to_none=True)

        return run

    visible, dense = step(False), step(True)
    t_vis, t_dense = [], []
    for r in range(repeats):
        t_vis.append(time_steps(visible, ctx.steps, ctx.warmup if r == 0 else 0, ctx.device))
        t_dense.append(time_steps(dense, ctx.steps, ctx.warmup if r == 0 else 0, ctx.device))
    speedups = [d / v for v, d in zip(t_vis, t_dense, strict=True)]
    n_vis, n_all = 1 + ids_keep.shape[1], 1 + enc.num_patches
    flops_vis = encoder_step_flops(e, img_size, n_vis).train
    flops_dense = encoder_step_flops(e, img_size, n_all).train
    return DenseResult(
        model=preset.name,
        img_size=img_size,
        batch_size=batch_size,
        mask_ratio=mask_ratio,
        visible_tokens=n_vis,
        dense_tokens=n_all,
        visible_images_per_s=batch_size / statistics.median(t_vis),
        dense_images_per_s=batch_size / statistics.median(t_dense),
        speedup=statistics.median(speedups),
        speedups=speedups,
        flops_ratio=flops_dense / flops_vis,
    )


def dense_check(results: Sequence[DenseResult], device: torch.device) -> dict[str, Any] | None:
    """The CPU acceptance check: ViT-S, 75% masked, visible-only >= 2.5x faster than dense."""
    if device.type != "cpu":
        return None
    for r in results:
        if r.model == DENSE_CHECK_MODEL and r.mask_ratio == 0.75:
            passed = r.speedup >= DENSE_CHECK_THRESHOLD
            return {
                "model": r.model,
                "img_size": r.img_size,
                "mask_ratio": r.mask_ratio,
                "speedup": r.speedup,
                "threshold": DENSE_CHECK_THRESHOLD,
                "passed": passed,
                "line": f"{'PASS' if passed else 'FAIL'}: ViT-S visible-only vs dense speed-up "
                f"{r.speedup:.2f}x (need >= {DENSE_CHECK_THRESHOLD}x) at img {r.img_size}, 75% masked, CPU",
            }
    return None


# ---------------------------------------------------------------------------------------------- profile
def profile_step(name: str, preset: ModelPreset, img_size: int, batch_size: int, ctx: Context, out: Path) -> Path:
    """A torch.profiler table of the top 15 ops by self device time (self CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    method, cfg = build_method(name, preset, img_size, ctx)
    batch = make_batch(batch_size, img_size, ctx.device, cfg.model.in_chans)
    step = TrainStep(method, ctx.device, ctx.compile)
    for _ in range(max(1, ctx.warmup)):
        step(batch)
    synchronize(ctx.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    n = max(1, min(ctx.steps, 3))
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(batch)
        synchronize(ctx.device)
    sort_by = "self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
    path = out / f"{ctx.device.type}_profile.txt"
    header = f"{name} {preset.label} img {img_size} batch {batch_size}, {n} training steps, sorted by {sort_by}\n"
    path.write_text(header + table + "\n")
    del method, step
    free_memory(ctx.device)
    return path


# ---------------------------------------------------------------------------------------------- reports
FORMULA_MD = """\
FLOPs are analytic, per image, **1 multiply-add = 2 FLOPs**, matrix products only (linear layers,
patch-embedding convolution, QK^T and AV); norms, softmax, GELU, losses and the optimizer are left out.

* ViT block, T tokens, width D, MLP ratio 4: `F_block = 2*T*(12*D^2) + 2*2*T^2*D = 24*T*D^2 + 4*T^2*D`
  (QKV + proj 4*D^2, MLP 8*D^2 multiply-adds per token; QK^T and AV T^2*D each).
* MILAN prompting block, Q = L_m mask-token queries, keys/values all T = 1 + L tokens:
  `F_prompt = 2*(Q*D^2 [q] + 2*T*D^2 [kv] + Q*D^2 [proj] + 8*Q*D^2 [MLP]) + 4*Q*T*D = 4*D^2*(T + 5*Q) + 4*Q*T*D`.
* Patch embedding `2*L*(p*p*C)*D`; linear map of n tokens a -> b `2*n*a*b` (decoder embed, pred, heads, proj).
* Training = 3x forward for trainable parts (backward = grad input + grad weight), 2x for the patch
  embedding and RILS's text projection (inputs need no gradient), 1x for the frozen teacher and detached branches.
* Student tokens: T_v = 1 + L_visible (75% masked) for the visible-only paths of MAE, MILAN, RILS and
  supmim; T = 1 + L for MaskDistill's mask-token path and the unmasked passes of RILS and supmim; decoders
  run on 1 + L tokens. Teacher: CLIP ViT-B/16 shape (768 x 12, 512-d projection of every token), random
  weights, at the student's resolution; MILAN adds the CLS-attention row of its last block.
* Per-method totals and terms: `benchmarks/flops.py`.
"""


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def train_table(rows: Sequence[TrainResult], cuda: bool) -> list[str]:
    head = "| method | model | img | batch | img/s | ms/step | GFLOPs/img (train) | TFLOP/s | MFU peak | MFU matmul |"
    sep = "|---" * 10 + "|"
    if cuda:
        head, sep = head + " peak mem GiB |", sep + "---|"
    lines = [head, sep]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.model} | {r.img_size} | {r.batch_size} | {r.error} |")
            continue
        gflops = None if r.train_flops_per_image is None else r.train_flops_per_image / 1e9
        line = (
            f"| {r.method} | {r.model} | {r.img_size} | {r.batch_size} | {fmt(r.images_per_s)} "
            f"| {fmt(r.step_ms, '.0f')} | {fmt(gflops, '.2f')} | {fmt(r.achieved_tflops, '.3f')} "
            f"| {pct(r.mfu_peak)} | {pct(r.mfu_matmul)} |"
        )
        if cuda:
            line += f" {fmt(r.peak_mem_gib, '.1f')} |"
        lines.append(line)
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> None:
    env = report["env"]
    cuda = env["device"] == "cuda"
    mm = report["matmul"]
    peak = "none (CPU)" if not cuda else fmt(report["peak_flops"] and report["peak_flops"] / 1e12, ".0f") + " TFLOP/s"
    lines = [
        f"# Training throughput on {env['device_name']}",
        "",
        f"torch {env['torch']}, {env['threads']} threads, {env['date']}, commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''}; load average at start {env['loadavg_at_start']}, "
        f"at end {report['loadavg_at_end']}; {report['elapsed_s']:.0f} s in all.",
        f"Precision: {'bf16 autocast, fused AdamW' if cuda else 'fp32, AdamW'}; synthetic batch on the device; "
        f"{report['config']['steps']} timed steps after {report['config']['warmup']} warm-up steps; "
        f"{report['config']['num_masks']} mask(s) per image (img/s counts loaded images).",
        f"Peak (bf16 dense): {peak}; measured {mm['n']}x{mm['n']} {mm['dtype']} matmul: "
        f"{mm['flops_per_s'] / 1e12:.3f} TFLOP/s.",
        "",
        "## Training step (forward + backward + AdamW)",
        "",
        *train_table([TrainResult(**r) for r in report["train"]], cuda),
        "",
        "MFU (peak) = analytic FLOPs/image x images/s / bf16 dense peak; "
        "MFU (matmul) = the same / the measured matmul rate.",
        "",
        "## FLOPs formula",
        "",
        FORMULA_MD,
        "Share of the training FLOPs (analytic):",
        "",
        "| method | model | GFLOPs/img train | GFLOPs/img fwd | teacher | student encoder | decoder + heads |",
        "|---" * 7 + "|",
        *[
            f"| {r['method']} | {r['model']} | {r['train_flops_per_image'] / 1e9:.2f} "
            f"| {r['forward_flops_per_image'] / 1e9:.2f} | {pct(r['flops_by_part']['teacher'])} "
            f"| {pct(r['flops_by_part']['encoder'])} | {pct(r['flops_by_part']['decoder_heads'])} |"
            for r in report["train"]
            if r["flops_by_part"]
        ],
        "",
        "## Cross-check with torch.utils.flop_counter.FlopCounterMode",
        "",
        f"SDPA counted by FlopCounterMode with the default backend on this device: "
        f"{env['sdpa_counted_by_flop_counter']} (when not, the count runs SDPA on the math backend).",
        "",
        "| method | model | img | batch | GFLOPs fwd (analytic) | counted/analytic fwd | GFLOPs train "
        "| counted/analytic train | SDPA |",
        "|---" * 9 + "|",
    ]
    for c in report["flop_check"]:
        lines.append(
            f"| {c['method']} | {c['model']} | {c['img_size']} | {c['batch_size']} "
            f"| {c['analytic_forward'] / 1e9:.3f} | {c['ratio_forward']:.3f} | {c['analytic_train'] / 1e9:.3f} "
            f"| {c['ratio_train']:.3f} | {c['sdpa_backend']} |"
        )
    lines += [
        "",
        "## Visible-only (MAE) vs dense (mask-token) encoder, forward + backward",
        "",
        "| model | img | batch | mask | tokens visible/dense | visible img/s | dense img/s | speed-up | FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in report["visible_vs_dense"]:
        lines.append(
            f"| {d['model']} | {d['img_size']} | {d['batch_size']} | {d['mask_ratio']:.2f} | "
            f"{d['visible_tokens']}/{d['dense_tokens']} | {d['visible_images_per_s']:.1f} | "
            f"{d['dense_images_per_s']:.1f} | {d['speedup']:.2f}x | {d['flops_ratio']:.2f}x |"
        )
    check = report.get("visible_vs_dense_check")
    if check:
        lines += ["", f"**{check['line']}**"]
    for key, title in (("batch_size", "batch size"), ("img_size", "image size"), ("model", "model size")):
        rows = report["scaling"].get(key) or []
        if rows:
            lines += ["", f"## Scaling with {title}", "", *train_table([TrainResult(**r) for r in rows], cuda)]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"* {k}: {v}" for k, v in report["skipped"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"* {n}" for n in report["notes"]]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--models", nargs="+", choices=list(PRESETS), help="ViT sizes: ti s b (default ti s b; quick ti s)")
    p.add_argument("--batch-size", type=int, help="batch of the method table (default 128; quick 8)")
    p.add_argument("--img-size", type=int, help="image size of the method table (default 224)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="MAE batch sizes (default 32 64 128 256; quick 4 8 16)")
    p.add_argument("--img-sizes", type=int, nargs="+", help="MAE image sizes (default 224 336 448; quick 112 160 224)")
    p.add_argument("--scaling-model", choices=list(PRESETS), help="model of the scaling runs (default: last model)")
    p.add_argument("--scaling-methods", nargs="*", choices=METHODS, default=["mae"])
    p.add_argument("--dense-img-size", type=int, help="image size of the visible-vs-dense study (default 224)")
    p.add_argument("--repeats", type=int, help="alternating rounds of the visible-vs-dense study (default 3)")
    p.add_argument("--flop-batch", type=int, default=2, help="batch of the FlopCounterMode cross-check (0 = off)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 5; quick 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the method")
    p.add_argument(
        "--num-masks", type=int, default=1, help="masked views per image for mae/milan/maskdistill (default 1: papers)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="small CPU-sized run (the default on CPU)")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler top-15 table")
    p.add_argument("--profile-method", choices=METHODS, default="mae")
    p.add_argument("--profile-model", choices=list(PRESETS), help="default: last model")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick or args.device == "cpu" else FULL
    for key in ("models", "batch_size", "img_size", "batch_sizes", "img_sizes", "dense_img_size", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(defaults, key))
    args.repeats = args.repeats or defaults.repeats
    args.scaling_model = args.scaling_model or args.models[-1]
    args.profile_model = args.profile_model or args.models[-1]
    return args


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (background load makes CPU timings noisy)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def log(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the report (also written as JSON and Markdown)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    env = collect_env(device)
    matmul = matmul_rate(device)
    log(f"{env.device_name}: matmul {matmul['n']}^2 {matmul['dtype']} {matmul['flops_per_s'] / 1e12:.3f} TFLOP/s")
    with tempfile.TemporaryDirectory(prefix="semmim_bench_") as tmp:
        ctx = Context(
            device=device,
            steps=args.steps,
            warmup=args.warmup,
            compile=args.compile,
            num_masks=args.num_masks,
            teachers=TeacherFactory(Path(tmp)),
            peak=peak_bf16_flops(device),
            matmul=matmul["flops_per_s"],
        )
        train: list[TrainResult] = []
        checks: list[FlopCheck] = []
        for model in args.models:
            for name in args.methods:
                if name in ctx.skipped:
                    continue
                r, c = run_train(name, PRESETS[model], args.img_size, args.batch_size, ctx, args.flop_batch)
                train.append(r)
                if c is not None:
                    checks.append(c)
                msg = f"train {name} {model} img {args.img_size} batch {args.batch_size}: {fmt(r.images_per_s)} img/s"
                if r.error:
                    msg += f" ({r.error})"
                if c is not None:
                    msg += f"; FLOPs counted/analytic fwd {c.ratio_forward:.3f}, train {c.ratio_train:.3f}"
                log(msg)

        dense: list[DenseResult] = []
        for model in args.models:
            d = visible_vs_dense(PRESETS[model], args.dense_img_size, args.batch_size, ctx, args.repeats)
            dense.append(d)
            rounds = ", ".join(f"{s:.2f}" for s in d.speedups)
            log(
                f"visible vs dense {model}: {d.visible_images_per_s:.1f} vs {d.dense_images_per_s:.1f} img/s, "
                f"speed-up {d.speedup:.2f}x (rounds {rounds}), FLOPs ratio {d.flops_ratio:.2f}x"
            )
        check = dense_check(dense, device)
        if check:
            log(check["line"])

        scaling: dict[str, list[TrainResult]] = {"batch_size": [], "img_size": [], "model": []}
        preset = PRESETS[args.scaling_model]
        for name in args.scaling_methods:
            if name in ctx.skipped:
                continue
            for bs in args.batch_sizes:
                r, _ = run_train(name, preset, args.img_size, bs, ctx)
                scaling["batch_size"].append(r)
                log(f"scaling {name} {preset.name} batch {bs}: {fmt(r.images_per_s)} img/s")
            for img in args.img_sizes:
                r, _ = run_train(name, preset, img, args.batch_size, ctx)
                scaling["img_size"].append(r)
                log(f"scaling {name} {preset.name} img {img}: {fmt(r.images_per_s)} img/s")
            scaling["model"] += [r for r in train if r.method == name]

        profile_path = None
        if args.profile:
            profile_path = profile_step(
                args.profile_method, PRESETS[args.profile_model], args.img_size, args.batch_size, ctx, args.out
            )
            log(f"profile: {profile_path}")

    notes = []
    if not env.sdpa_counted_by_flop_counter:
        notes.append(
            "FlopCounterMode counts 0 FLOPs for SDPA with this device's default kernel "
            "(aten._scaled_dot_product_flash_attention_for_cpu has no FLOP formula); the cross-check runs "
            "attention on the math backend, whose matmuls it counts."
        )
    if device.type == "cpu":
        notes.append("CPU: no bf16 peak is defined, MFU is reported against the measured fp32 matmul rate only.")
    report: dict[str, Any] = {
        "env": asdict(env),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "flops_convention": "1 multiply-add = 2 FLOPs; matrix products only; training = 3x forward for trainable "
        "parts, 2x for the patch embedding / text projection, 1x for the frozen teacher; per image",
        "peak_flops": ctx.peak,
        "matmul": matmul,
        "train": [asdict(r) for r in train],
        "flop_check": [c.as_dict() for c in checks],
        "visible_vs_dense": [asdict(d) for d in dense],
        "visible_vs_dense_check": check,
        "scaling": {k: [asdict(r) for r in v] for k, v in scaling.items()},
        "skipped": ctx.skipped,
        "profile": str(profile_path) if profile_path else None,
        "notes": notes,
        "loadavg_at_end": loadavg(),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    json_path = args.out / f"{device.type}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / f"{device.type}.md")
    log(f"wrote {json_path} and {args.out / f'{device.type}.md'}")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
