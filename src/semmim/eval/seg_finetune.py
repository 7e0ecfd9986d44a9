"""The fine-tuned UperNet segmentation recipe: ``semmim eval seg --mode finetune`` (mmseg-free).

BEiT's ADE20K protocol (Bao et al. 2021, arXiv:2106.08254), which MAE (He et al. 2021, arXiv:2111.06377)
reuses: the whole encoder is trained with a UperNet head for 160k iterations of 16 crops of 512 x 512.

* model: four blocks (depth x 1/3, 1/2, 2/3, 1) -> :class:`~semmim.eval.upernet.ViTPyramid` ->
  :class:`~semmim.eval.upernet.UPerHead`, plus an auxiliary :class:`~semmim.eval.upernet.FCNHead` on
  the stride-16 level; the encoder gets stochastic depth (:func:`set_drop_path`) and is resized to the
  crop (position embeddings resampled, timm's ``set_input_size``);
* loss: cross-entropy ignoring 255 (ADE20K's label 0 with ``reduce_zero_label``), decode + ``aux_weight``
  x auxiliary, each averaged over labelled pixels;
* optimiser: AdamW (0.9, 0.999) on layer-wise decayed groups (:func:`semmim.eval.seg_common.seg_param_groups`),
  poly decay with a linear warmup per iteration (:func:`semmim.engine.optim.poly_lr`);
* data: :mod:`semmim.data.seg_transforms` (rescale 0.5-2.0, cat-max-ratio crop, flip, photometric
  distortion, pad);
* test: single scale, the image rescaled into ``scale``, sliding windows (:func:`slide_inference`), logits
  resized to the original image, mIoU there (:class:`~semmim.eval.seg_common.SegMetric`).

Every number is a :class:`~semmim.eval.config.SegConfig` key whose default is the recipe's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.data.segmentation import IGNORE_INDEX
from semmim.eval.config import SEG_RECIPE_WARMUP, SegConfig

__all__ = ["finetune_seg", "recipe_settings", "set_drop_path", "slide_inference", "slide_windows"]

log = logging.getLogger(__name__)

RECIPE_LR = 1e-4
"""Peak lr of the recipe (``lr: null``; MAE's ADE20K setting for ViT-B)."""

LOG_EVERY = 50
"""Iterations between log lines, and the longest window of the reported start / end training loss."""


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth on a timm ViT's blocks, rising linearly from 0 (first block) to ``rate`` (last).

    Replaces each block's ``drop_path1`` / ``drop_path2`` (timm's ``Block``) by ``timm.layers.DropPath``
    (``nn.Identity`` at rate 0), as ``drop_path_rate`` at construction would.

    Raises:
        ValueError: a block without ``drop_path1`` / ``drop_path2``.
    """
    from timm.layers import DropPath

    blocks: Any = encoder.get_submodule("blocks")
    rates = torch.linspace(0.0, float(rate), len(blocks)).tolist()
    for block, r in zip(blocks, rates, strict=True):
        for name in ("drop_path1", "drop_path2"):
            if not hasattr(block, name):
                raise ValueError(f"cannot set drop_path on {type(block).__name__}: it has no {name} (timm's Block)")
            setattr(block, name, DropPath(r) if r > 0 else nn.Identity())


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The ``(top, bottom, left, right)`` windows covering an ``h x w`` image (mmseg's slide inference).

    A grid of ``ceil((h - crop) / stride) + 1`` rows (same for columns) with the last window moved back
    inside the image; windows are at most ``crop`` wide and cover every pixel when ``stride <= crop``.

    Examples:
        >>> slide_windows(3, 5, 3, 2)
        [(0, 3, 0, 3), (0, 3, 2, 5)]
    """
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, h), min(c * stride + crop, w)
            out.append((max(bottom - crop, 0), bottom, max(right - crop, 0), right))
    return out


def slide_inference(
    fn: Callable[[Tensor], Tensor], x: Tensor, num_classes: int, crop: int, stride: int, max_windows: int = 16
) -> Tensor:
    """Logits of a whole image from ``crop`` windows every ``stride`` pixels, averaged where they overlap.

    Windows smaller than ``crop`` (an image side below it) are padded with 0 (the mean colour after
    normalisation) on the bottom / right, and the padding's logits dropped.

    Args:
        fn: (B, C, crop, crop) -> (B, K, crop, crop) logits.
        x: (N, C, H, W) normalised images.
        num_classes: K.
        crop: window size.
        stride: step between windows (<= crop).
        max_windows: windows per call of ``fn`` (times N images).

    Returns:
        (N, K, H, W) float32: each pixel's logits summed over the windows holding it, divided by their count.
    """
    if not 0 < stride <= crop:
        raise ValueError(f"need 0 < stride <= crop, got stride={stride}, crop={crop}")
    n, _, h, w = x.shape
    logits = torch.zeros(n, num_classes, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    windows = slide_windows(h, w, crop, stride)
    for start in range(0, len(windows), max_windows):
        chunk = windows[start : start + max_windows]
        crops = [F.pad(x[:, :, t:b, lf:r], (0, crop - (r - lf), 0, crop - (b - t))) for t, b, lf, r in chunk]
        out = fn(torch.cat(crops)).float()
        for i, (t, b, lf, r) in enumerate(chunk):
            logits[:, :, t:b, lf:r] += out[i * n : (i + 1) * n, :, : b - t, : r - lf]
            count[:, :, t:b, lf:r] += 1
    return logits / count


def recipe_settings(cfg: SegConfig, embed_dim: int, n_train: int) -> dict[str, Any]:
    """The recipe's resolved settings (every ``null`` replaced by its value), as ``metrics.json`` records them."""
    crop = cfg.crop_size
    return {
        "iters": cfg.iters,
        "batch_size": min(cfg.batch_size, n_train),
        "lr": cfg.lr if cfg.lr is not None else RECIPE_LR,
        "layer_decay": cfg.layer_decay,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps if cfg.warmup_steps is not None else SEG_RECIPE_WARMUP,
        "poly_power": cfg.poly_power,
        "min_lr": cfg.min_lr,
        "drop_path": cfg.drop_path,
        "channels": cfg.channels if cfg.channels is not None else embed_dim,
        "aux_weight": cfg.aux_weight,
        "aux_channels": cfg.aux_channels if cfg.aux_weight > 0 else None,
        "crop_size": crop,
        "scale": list(cfg.scale) if cfg.scale is not None else [4 * crop, crop],
        "ratio_range": list(cfg.ratio_range),
        "cat_max_ratio": cfg.cat_max_ratio,
        "flip_prob": cfg.flip_prob,
        "photometric": cfg.photometric,
        "slide_stride": cfg.slide_stride if cfg.slide_stride is not None else max(1, crop * 2 // 3),
        "test": "single-scale sliding window",
    }


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over labelled pixels; 0 (with a graph) when none is labelled."""
    if not bool((target != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _same_size(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Test items grouped by (image size, mask size), in order of first appearance."""
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[dict[str, Any]]] = {}
    for it in items:
        groups.setdefault((tuple(it["image"].shape), tuple(it["mask"].shape)), []).append(it)
    return list(groups.values())


def finetune_seg(encoder: str | os.PathLike[str] | nn.Module, cfg: SegConfig) -> dict[str, Any]:
    """Fine-tune an encoder with UperNet on a segmentation dataset and report single-scale mIoU.

    Called by :func:`semmim.eval.seg.seg_eval` for ``mode: finetune`` (``cfg`` already checked).

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:<run>``, or a timm ViT module (then
            ``cfg.mean`` / ``cfg.std`` are required; it is resized and trained in place).
        cfg: the settings (``mode: finetune``).

    Returns:
        ``{"protocol": "seg", "mode": "finetune", "head": "upernet", "miou", "pixel_acc", "per_class_iou",
        "classes", "num_classes", "steps", "train_loss" / "train_loss_start" (mean loss of the last / first
        min(50, iters / 4) iterations), "feature_blocks", "recipe": :func:`recipe_settings`, ...}``; metrics in %.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from semmim.data import build_loader
    from semmim.data.seg_transforms import SegPipeline, train_transform
    from semmim.data.segmentation import seg_source
    from semmim.engine.optim import poly_lr, set_lr
    from semmim.eval.common import encoder_geometry
    from semmim.eval.seg_common import SegMetric, SegModel, prepare_encoder, seg_param_groups
    from semmim.eval.upernet import UPerNet, resize_to

    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    enc, mean, std = prepare_encoder(encoder, cfg.crop_size, cfg.seed, cfg.mean, cfg.std)
    _, in_chans = encoder_geometry(enc)
    set_drop_path(enc, cfg.drop_path)
    embed_dim = int(getattr(enc, "embed_dim", 0) or getattr(enc, "num_features", 0))
    train_src = seg_source(cfg.data, cfg.root, "train", in_chans, cfg.train_limit)
    test_src = seg_source(cfg.data, cfg.root, "test", in_chans, cfg.test_limit)
    if len(train_src) < 2:
        raise ValueError(f"the training split has {len(train_src)} image(s); BatchNorm in the head needs >= 2")
    rec = recipe_settings(cfg, embed_dim, len(train_src))
    crop, stride, iters, scale = rec["crop_size"], rec["slide_stride"], rec["iters"], rec["scale"]
    augment = train_transform(
        crop, scale, rec["ratio_range"], rec["cat_max_ratio"], rec["flip_prob"], rec["photometric"], fill=mean
    )
    train_ds = SegPipeline(train_src, augment, seed=cfg.seed)
    test_ds = SegPipeline(test_src, scale=scale)
    num_classes = train_src.num_classes

    torch.manual_seed(cfg.seed)
    head = UPerNet(embed_dim, num_classes, channels=rec["channels"], aux_channels=rec["aux_channels"])
    model = SegModel(enc, head, frozen=False).to(dev)
    peak = rec["lr"]
    opt = torch.optim.AdamW(seg_param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=peak, betas=(0.9, 0.999))
    bs = rec["batch_size"]
    loader = build_loader(
        train_ds,
        batch_size=bs,
        num_workers=cfg.num_workers,
        pin_memory=True,
        sampler=RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed)),
        drop_last=len(train_ds) % bs == 1,  # a last batch of 1 would break BatchNorm
    )
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    use_amp = dev.type == "cuda"

    losses: list[float] = []
    step, epoch = 0, 0
    model.train()
    t0 = time.perf_counter()
    while step < iters:
        train_ds.set_epoch(epoch)
        for batch in loader:
            if step >= iters:
                break
            set_lr(opt, poly_lr(step, iters, rec["warmup_steps"], peak, rec["poly_power"], rec["min_lr"]))
            x = (batch["image"].to(dev, non_blocking=True) - m) / s
            target = batch["mask"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, aux = model.forward_train(x)
            loss = _ce(logits.float(), target)
            if aux is not None:
                loss = loss + cfg.aux_weight * _ce(aux.float(), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite segmentation loss {value} at iteration {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
            step += 1
            if step % LOG_EVERY == 0:
                log.info("seg finetune iter %d/%d: loss %.4f", step, iters, sum(losses[-LOG_EVERY:]) / LOG_EVERY)
        epoch += 1
    train_time = time.perf_counter() - t0

    model.eval()
    metric = SegMetric(num_classes, device=dev)
    test_loader = DataLoader(test_ds, batch_size=bs, num_workers=cfg.num_workers, collate_fn=list)
    t1 = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
        for items in test_loader:
            for group in _same_size(items):  # ADE20K's images differ in size: one slide per size
                x = (torch.stack([it["image"] for it in group]).to(dev) - m) / s
                mask = torch.stack([it["mask"] for it in group]).to(dev)
                logits = slide_inference(model, x, num_classes, crop, stride)
                metric.update(resize_to(logits, mask.shape[-2:]).argmax(1), mask)
    scores = metric.compute()
    window = max(1, min(LOG_EVERY, len(losses) // 4))
    return {
        "protocol": "seg",
        "mode": "finetune",
        "head": "upernet",
        "data": cfg.data,
        "miou": scores["miou"],
        "pixel_acc": scores["pixel_acc"],
        "per_class_iou": scores["per_class_iou"],
        "classes": list(train_src.classes),
        "num_classes": num_classes,
        "steps": step,
        "epochs": epoch,
        "train_loss": sum(losses[-window:]) / window if losses else math.nan,
        "train_loss_start": sum(losses[:window]) / window if losses else math.nan,
        "feature_blocks": list(model.indices),
        "n_train": len(train_ds),
        "n_test": len(test_ds),
        "train_time_s": train_time,
        "eval_time_s": time.perf_counter() - t1,
        "recipe": rec,
    }
