"""Semantic segmentation evaluation of an exported ViT encoder: mIoU of a linear or UperNet head.

Two modes (``SegConfig.mode``):

* ``frozen`` (the default, quick): a head on the frozen encoder's patch tokens, a few epochs, AdamW +
  warmup-cosine, images at one fixed size. Heads: :class:`LinearSegHead` (BatchNorm + 1x1 conv on the last
  block's final-norm tokens, bilinearly upsampled: the linear probe for dense features) or
  :class:`~semmim.eval.upernet.UPerNet` on four blocks.
* ``finetune``: BEiT / MAE's fine-tuned UperNet 160k recipe for ADE20K (:mod:`semmim.eval.seg_finetune`).

Both score with :class:`SegMetric` (mIoU / pixel accuracy over a confusion matrix, in %) and
cross-entropy ignoring label 255.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.data.segmentation import IGNORE_INDEX
from semmim.eval.config import SegConfig, check_eval_config
from semmim.eval.seg_common import (
    SegMetric,
    SegModel,
    feature_indices,
    miou,
    prepare_encoder,
    seg_param_groups,
    vit_intermediates,
)
from semmim.eval.upernet import UPerNet, resize_to

__all__ = [
    "LinearSegHead",
    "SegMetric",
    "SegModel",
    "UPerNet",
    "build_seg_head",
    "feature_indices",
    "miou",
    "seg_eval",
    "seg_param_groups",
    "seg_result_name",
    "vit_intermediates",
]

SEG_HEADS = ("linear", "upernet")
"""Heads of the frozen protocol."""

FROZEN_LR = 1e-3
"""Peak lr of the frozen protocol's head (``lr: null``)."""
FROZEN_CHANNELS = 256
"""UperNet width of the frozen protocol (``channels: null``)."""


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv on the last block's patch tokens, bilinearly upsampled to the image.

    Args:
        embed_dim: token width D.
        num_classes: K.
    """

    num_inputs = 1
    use_final_norm = True
    """Reads the final-norm tokens (what ``forward_features`` returns)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Args: feats: [(N, D, h, w)]; size: (H, W). Returns logits (N, K, H, W)."""
        return resize_to(self.classifier(self.bn(feats[-1])), size)


def build_seg_head(name: str, embed_dim: int, num_classes: int, channels: int = 256) -> nn.Module:
    """The frozen protocol's head: ``"linear"`` -> :class:`LinearSegHead`, ``"upernet"`` -> :class:`UPerNet`
    (no auxiliary head)."""
    if name == "linear":
        return LinearSegHead(embed_dim, num_classes)
    if name == "upernet":
        return UPerNet(embed_dim, num_classes, channels=channels)
    raise ValueError(f"unknown segmentation head '{name}'; choose one of {', '.join(SEG_HEADS)}")


def seg_result_name(cfg: SegConfig) -> str:
    """The results folder under ``RUN/eval/``: ``seg_linear`` / ``seg_upernet`` (frozen), ``seg_upernet_finetune``."""
    return "seg_upernet_finetune" if cfg.mode == "finetune" else f"seg_{cfg.head}"


def _set_lr(group: dict[str, Any], lr: float) -> None:
    group["lr"] = lr * float(group.get("lr_scale", 1.0))


@torch.no_grad()
def _evaluate(
    model: SegModel, loader: Any, num_classes: int, m: Tensor, s: Tensor, dev: torch.device
) -> dict[str, Any]:
    model.eval()
    metric = SegMetric(num_classes, device=dev)
    for batch in loader:
        x = (batch["image"].to(dev) - m) / s
        metric.update(model(x).argmax(1), batch["mask"].to(dev))
    return metric.compute()


def seg_eval(encoder: str | os.PathLike[str] | nn.Module, cfg: SegConfig | None = None) -> dict[str, Any]:
    """Train a segmentation head (``mode: frozen``) or fine-tune encoder + UperNet (``mode: finetune``) and
    report mIoU on the test split.

    ``mode: finetune`` is :func:`semmim.eval.seg_finetune.finetune_seg` (BEiT / MAE's UperNet 160k recipe).
    ``mode: frozen``, the quick protocol: the encoder is frozen and only ``head`` learns, with AdamW, linear
    warmup (default: 10% of the steps, at most 1500) + cosine decay per step and cross-entropy with
    ``ignore_index=255``; images come at one size (``img_size``, default the encoder's) and are normalised
    with the encoder's mean / std. Seeded (head init, shuffling, augmentation).

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:<run>``, or a timm ViT module (then
            ``cfg.mean`` and ``cfg.std`` are required; a module is resized in place when the input size
            differs from its own, and trained in place by ``mode: finetune``).
        cfg: the protocol's settings (:class:`semmim.eval.config.SegConfig`, each key documented there;
            default: its defaults). ``data`` is "fashion_mnist" (derived 11-class foreground task) or
            "ade20k" (``root`` = ADEChallengeData2016). Another ``img_size`` than the encoder's (a multiple
            of the patch size) resamples the position embeddings (timm's ``set_input_size`` /
            ``resample_abs_pos_embed``, bicubic).

    Returns:
        ``{"protocol": "seg", "mode", "head", "data", "miou", "pixel_acc", "per_class_iou", "classes",
        "num_classes", "img_size", "steps", "train_loss", "n_train", "n_test", ...}``; metrics in %, see
        :class:`SegMetric` (mIoU averages over the classes present in target or prediction).
    """
    cfg = check_eval_config(cfg or SegConfig())
    if cfg.mode == "finetune":
        from semmim.eval.seg_finetune import finetune_seg

        return finetune_seg(encoder, cfg)
    return _frozen_seg(encoder, cfg)


def _frozen_seg(encoder: str | os.PathLike[str] | nn.Module, cfg: SegConfig) -> dict[str, Any]:
    """The quick protocol of :func:`seg_eval` (``cfg`` already checked)."""
    from torch.utils.data import RandomSampler

    from semmim.data import build_loader
    from semmim.data.segmentation import build_seg_dataset
    from semmim.engine.optim import cosine_lr
    from semmim.eval.common import encoder_geometry

    data, root, head, epochs = cfg.data, cfg.root, cfg.head, cfg.epochs
    batch_size, lr, weight_decay = cfg.batch_size, cfg.lr, cfg.weight_decay
    img_size, train_limit, test_limit, num_workers = cfg.img_size, cfg.train_limit, cfg.test_limit, cfg.num_workers
    seed, device, max_steps = cfg.seed, cfg.device, cfg.max_steps
    channels = cfg.channels if cfg.channels is not None else FROZEN_CHANNELS
    warmup_steps, mean, std = cfg.warmup_steps, cfg.mean, cfg.std
    if head not in SEG_HEADS:
        raise ValueError(f"unknown segmentation head '{head}'; choose one of {', '.join(SEG_HEADS)}")
    if epochs < 1 and not max_steps:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm in the head), got {batch_size}")
    enc, mean, std = prepare_encoder(encoder, img_size, seed, mean, std)
    size, in_chans = encoder_geometry(enc)
    train_ds = build_seg_dataset(data, root, "train", size, in_chans, train_limit, train=True, seed=seed)
    test_ds = build_seg_dataset(data, root, "test", size, in_chans, test_limit, train=False, seed=seed)
    if len(train_ds) < 2:
        raise ValueError(f"the training split has {len(train_ds)} image(s); BatchNorm in the head needs >= 2")
    num_classes = train_ds.num_classes
    embed_dim = int(getattr(enc, "embed_dim", 0) or getattr(enc, "num_features", 0))
    torch.manual_seed(seed)
    model = SegModel(enc, build_seg_head(head, embed_dim, num_classes, channels), frozen=True).to(dev)
    peak = lr if lr is not None else FROZEN_LR
    groups = seg_param_groups(model, weight_decay)
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train_ds))
    train_loader = build_loader(
        train_ds,
        batch_size=bs,
        num_workers=num_workers,
        pin_memory=True,
        sampler=RandomSampler(train_ds, generator=gen),
        drop_last=len(train_ds) % bs == 1,  # a last batch of 1 would break BatchNorm
    )
    test_loader = build_loader(
        test_ds, batch_size=batch_size, num_workers=num_workers, pin_memory=True, sampler=None, drop_last=False
    )
    total = epochs * len(train_loader)
    if max_steps is not None:
        total = min(total, max_steps) if epochs >= 1 else max_steps
    warmup = warmup_steps if warmup_steps is not None else min(1500, total // 10)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    step, epoch, loss_sum, loss_n = 0, 0, 0.0, 0
    model.train()
    while step < total:
        set_epoch = getattr(train_ds, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        for batch in train_loader:
            if step >= total:
                break
            target = batch["mask"].to(dev)
            if not bool((target != IGNORE_INDEX).any()):
                step += 1  # nothing labelled: no loss, but the schedule moves on
                continue
            for g in opt.param_groups:
                _set_lr(g, cosine_lr(step, total, warmup, peak))
            logits = model((batch["image"].to(dev) - m) / s)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite segmentation loss {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            loss_n += 1
            step += 1
        epoch += 1
    metrics = _evaluate(model, test_loader, num_classes, m, s, dev)
    return {
        "protocol": "seg",
        "mode": "frozen",
        "head": head,
        "data": data,
        "miou": metrics["miou"],
        "pixel_acc": metrics["pixel_acc"],
        "per_class_iou": metrics["per_class_iou"],
        "classes": list(train_ds.classes),
        "num_classes": num_classes,
        "img_size": size,
        "steps": step,
        "epochs": epoch,
        "lr": peak,
        "channels": channels if head == "upernet" else None,
        "warmup_steps": warmup,
        "train_loss": loss_sum / loss_n if loss_n else math.nan,
        "n_train": len(train_ds),
        "n_test": len(test_ds),
    }
