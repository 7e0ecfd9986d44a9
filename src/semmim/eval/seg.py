"""Semantic segmentation evaluation of an exported ViT encoder: a linear or UPerNet head, mIoU.

Two heads on the encoder's patch tokens:

* :class:`LinearSegHead`: BatchNorm + 1x1 conv on the last block's (final-norm) patch tokens, bilinearly
  upsampled to the image (the linear-probe protocol for dense features).
* :class:`UPerNetLite`: our own UPerNet (Xiao et al. 2018, "Unified Perceptual Parsing for Scene
  Understanding", arXiv:1807.10221) on four blocks turned into a multi-scale pyramid as in the BEiT / MAE
  ADE20K setups (Bao et al. 2021, arXiv:2106.08254; He et al. 2021, arXiv:2111.06377).

:func:`seg_eval` trains the head (frozen encoder by default, or fine-tuned with layer-wise lr decay)
with AdamW + cosine lr and cross-entropy (``ignore_index=255``), then reports mIoU / pixel accuracy
on the test split (:func:`miou`, in %).
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

__all__ = [
    "LinearSegHead",
    "SegMetric",
    "SegModel",
    "UPerNetLite",
    "build_seg_head",
    "feature_indices",
    "miou",
    "seg_eval",
    "seg_param_groups",
    "vit_intermediates",
]

SEG_HEADS = ("linear", "upernet")

_PYRAMID_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)


def feature_indices(depth: int, num: int) -> list[int]:
    """0-based indices of the blocks whose outputs feed a head of ``num`` inputs (always incl. the last).

    One input: the last block. Four inputs: blocks ``round(depth * f) - 1`` for f = 1/3, 1/2, 2/3, 1, which
    gives BEiT / MAE's choice for ViT-B (depth 12: 3, 5, 7, 11) and ViT-L (depth 24: 7, 11, 15, 23);
    other counts are spread evenly. Shallow encoders repeat blocks (depth 2: 0, 0, 0, 1).

    Examples:
        >>> feature_indices(12, 4), feature_indices(24, 4), feature_indices(2, 4), feature_indices(12, 1)
        ([3, 5, 7, 11], [7, 11, 15, 23], [0, 0, 0, 1], [11])
    """
    if depth < 1 or num < 1:
        raise ValueError(f"need depth >= 1 and num >= 1, got depth={depth}, num={num}")
    fractions = _PYRAMID_FRACTIONS if num == 4 else tuple((i + 1) / num for i in range(num))
    return [min(depth - 1, max(0, round(depth * f) - 1)) for f in fractions]


def _patch_grid(encoder: nn.Module, x: Tensor) -> tuple[int, int]:
    ps: Any = encoder.get_submodule("patch_embed").patch_size
    ph, pw = (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
    return x.shape[-2] // ph, x.shape[-1] // pw


def _hook_intermediates(encoder: nn.Module, x: Tensor, indices: list[int], norm: bool) -> list[Tensor]:
    """Block outputs caught with forward hooks during ``forward_features`` (non-timm encoders)."""
    blocks: Any = encoder.get_submodule("blocks")
    caught: dict[int, Tensor] = {}
    handles = []
    for i in indices:

        def hook(_m: nn.Module, _inp: Any, out: Tensor, i: int = i) -> None:
            caught[i] = out

        handles.append(blocks[i].register_forward_hook(hook))
    try:
        encoder.forward_features(x)  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    gh, gw = _patch_grid(encoder, x)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    final_norm: Any = getattr(encoder, "norm", None)
    out = []
    for i in indices:
        tokens = caught[i]
        if norm and final_norm is not None:
            tokens = final_norm(tokens)
        tokens = tokens[:, prefix:]
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"block {i} gives {tokens.shape[1]} patch tokens, expected a {gh}x{gw} grid")
        out.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw))
    return out


def vit_intermediates(encoder: nn.Module, x: Tensor, indices: list[int], norm: bool = False) -> list[Tensor]:
    """Patch-token feature maps of the blocks ``indices`` of a ViT.

    Uses timm's ``forward_intermediates`` when the encoder has it, else forward hooks on ``encoder.blocks``.

    Args:
        encoder: a timm ``VisionTransformer`` (or a module with ``blocks``, ``patch_embed``,
            ``forward_features``).
        x: (N, C, H, W) normalised images.
        indices: 0-based block indices (repeats allowed).
        norm: apply the encoder's final norm to each output.

    Returns:
        One (N, D, H / patch, W / patch) tensor per entry of ``indices``.
    """
    unique = sorted(set(indices))
    fwd = getattr(encoder, "forward_intermediates", None)
    if callable(fwd):
        feats = fwd(x, indices=unique, norm=norm, output_fmt="NCHW", intermediates_only=True)
    else:
        feats = _hook_intermediates(encoder, x, unique, norm)
    by_index = dict(zip(unique, feats, strict=True))
    return [by_index[i] for i in indices]


def _cbr(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _up(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


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
        return _up(self.classifier(self.bn(feats[-1])), size)


class UPerNetLite(nn.Module):
    """UPerNet decoder on a 4-level pyramid built from four ViT blocks.

    Pyramid (as BEiT / MAE for ADE20K): with the patch grid at stride 1, level 0 = 2x deconv + BN + GELU
    + 2x deconv (x4), level 1 = 2x deconv (x2), level 2 = identity, level 3 = 2x2 max-pool (/2); all
    levels keep D channels. On grids smaller than 2x2 the pooling is skipped (level 3 stays at the grid
    size), so tiny inputs still work. Decoder (Xiao et al. 2018): a pyramid pooling module (scales 1, 2, 3,
    6) + 3x3 bottleneck on level 3; 1x1 laterals on levels 0-2; top-down path adding upsampled coarser
    maps; 3x3 FPN convs; all four maps upsampled to level 0, concatenated, fused by a 3x3 conv; dropout;
    1x1 classifier; bilinear upsampling to the image. Every conv is conv + BN + ReLU.

    Args:
        embed_dim: token width D.
        num_classes: K.
        channels: decoder width (512 in the BEiT / MAE setups, 256 by default here).
        pool_scales: PPM output sizes.
        dropout: 2-D dropout before the classifier.
    """

    num_inputs = 4
    use_final_norm = False

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        d = embed_dim
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(d, d, 2, stride=2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, stride=2)
        )
        self.fpn2 = nn.ConvTranspose2d(d, d, 2, stride=2)
        self.fpn4 = nn.MaxPool2d(2)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(d, channels, 1)) for s in pool_scales)
        self.ppm_bottleneck = _cbr(d + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_cbr(d, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(_cbr(channels, channels, 3) for _ in range(3))
        self.fuse = _cbr(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def pyramid(self, feats: list[Tensor]) -> list[Tensor]:
        """Four (N, D, h, w) grids -> [(N, D, 4h, 4w), (N, D, 2h, 2w), (N, D, h, w), (N, D, h/2, w/2)]."""
        if len(feats) != 4:
            raise ValueError(f"UPerNetLite takes 4 feature maps, got {len(feats)}")
        top = feats[3]
        top = self.fpn4(top) if min(top.shape[-2:]) >= 2 else top
        return [self.fpn1(feats[0]), self.fpn2(feats[1]), feats[2], top]

    def forward(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Args: feats: four (N, D, h, w) block outputs; size: (H, W). Returns logits (N, K, H, W)."""
        levels = self.pyramid(feats)
        top = levels[3]
        pooled = [top] + [_up(branch(top), top.shape[-2:]) for branch in self.ppm]
        lat = [conv(levels[i]) for i, conv in enumerate(self.laterals)] + [self.ppm_bottleneck(torch.cat(pooled, 1))]
        for i in range(3, 0, -1):  # top-down path
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(lat[i]) for i, conv in enumerate(self.fpn_convs)] + [lat[3]]
        fused = self.fuse(torch.cat([_up(o, outs[0].shape[-2:]) for o in outs], 1))
        return _up(self.classifier(self.dropout(fused)), size)


def build_seg_head(name: str, embed_dim: int, num_classes: int, channels: int = 256) -> nn.Module:
    """``"linear"`` -> :class:`LinearSegHead`, ``"upernet"`` -> :class:`UPerNetLite`."""
    if name == "linear":
        return LinearSegHead(embed_dim, num_classes)
    if name == "upernet":
        return UPerNetLite(embed_dim, num_classes, channels=channels)
    raise ValueError(f"unknown segmentation head '{name}'; choose one of {', '.join(SEG_HEADS)}")


class SegModel(nn.Module):
    """A ViT encoder and a segmentation head.

    The head declares ``num_inputs`` (blocks it reads, chosen by :func:`feature_indices`) and
    ``use_final_norm``. With ``frozen=True`` the encoder's parameters get ``requires_grad=False``, it stays
    in eval mode whatever ``train()`` says, and it runs under ``torch.no_grad()``.

    Args:
        encoder: a timm ``VisionTransformer`` (see :func:`vit_intermediates`).
        head: a module ``head(feats: list[(N, D, h, w)], size) -> (N, K, H, W)``.
        frozen: freeze the encoder.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, frozen: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.frozen = bool(frozen)
        depth = len(encoder.get_submodule("blocks"))  # type: ignore[arg-type]
        self.indices = feature_indices(depth, int(getattr(head, "num_inputs", 1)))
        self.use_final_norm = bool(getattr(head, "use_final_norm", False))
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def features(self, x: Tensor) -> list[Tensor]:
        """(N, C, H, W) normalised images -> the head's input maps, each (N, D, H / patch, W / patch)."""
        if self.frozen:
            with torch.no_grad():
                return [f.detach() for f in vit_intermediates(self.encoder, x, self.indices, self.use_final_norm)]
        return vit_intermediates(self.encoder, x, self.indices, self.use_final_norm)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> logits (N, K, H, W)."""
        return self.head(self.features(x), (x.shape[-2], x.shape[-1]))


class SegMetric:
    """mIoU, pixel accuracy and per-class IoU accumulated over batches.

    Wraps torchmetrics' ``MulticlassJaccardIndex(average="none", ignore_index=...)``: its confusion matrix
    (state ``confmat``, rows = target, columns = prediction, ignored pixels left out) is accumulated by
    ``update`` and reduced by ``compute``. torchmetrics gives IoU 0 to a class absent from both target and
    prediction (0 / 0); here such classes are reported as ``None`` and excluded from the mean, so mIoU is
    the mean IoU over the classes that appear in the target or the prediction.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu") -> None:
        from torchmetrics.classification import MulticlassJaccardIndex

        self.num_classes = int(num_classes)
        self.metric = MulticlassJaccardIndex(num_classes=num_classes, average="none", ignore_index=ignore_index).to(
            device
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Args: pred: (N, H, W) int class ids; target: (N, H, W) int class ids or ``ignore_index``."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self.metric.update(pred.reshape(-1).long(), target.reshape(-1).long())

    def compute(self) -> dict[str, Any]:
        """Returns ``{"miou", "pixel_acc", "per_class_iou", "present"}``, in % (``per_class_iou[k]`` is
        ``None`` for a class absent from target and prediction)."""
        iou = self.metric.compute().double().cpu()
        confmat: Tensor = self.metric.confmat.double().cpu()  # type: ignore[assignment]
        present = (confmat.sum(0) + confmat.sum(1)) > 0
        total = float(confmat.sum())
        mean = float(iou[present].mean()) * 100.0 if bool(present.any()) else math.nan
        return {
            "miou": mean,
            "pixel_acc": 100.0 * float(confmat.diag().sum()) / total if total > 0 else math.nan,
            "per_class_iou": [100.0 * float(v) if p else None for v, p in zip(iou, present.tolist(), strict=True)],
            "present": present.tolist(),
        }


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """mIoU of one set of predictions (see :class:`SegMetric` for the definition; values in %).

    Args:
        pred: (N, H, W) predicted class ids.
        target: (N, H, W) class ids, ``ignore_index`` for pixels left out.
        num_classes: K.

    Returns:
        ``{"miou": float, "pixel_acc": float, "per_class_iou": [float | None] * K, "present": [bool] * K}``.
    """
    metric = SegMetric(num_classes, ignore_index, device=pred.device)
    metric.update(pred, target)
    return metric.compute()


def seg_param_groups(model: SegModel, weight_decay: float, layer_decay: float = 0.65) -> list[dict[str, Any]]:
    """AdamW groups with an ``lr_scale``: 1 for the head, ``layer_decay ** (depth + 1 - layer)`` for the encoder.

    The encoder's groups are fine-tuning's :func:`semmim.eval.finetune.layer_decay_groups` (BEiT's
    layer-wise lr decay: patch embedding / position / class tokens = 0, block i = i + 1, the final norm
    = depth + 1); the head trains at the full rate. Biases, norms and 1-D parameters get no weight
    decay. Frozen parameters are left out.
    """
    from semmim.engine.optim import layer_decay_groups

    depth = len(model.encoder.get_submodule("blocks"))  # type: ignore[arg-type]
    groups: list[dict[str, Any]] = []
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    for no_decay in (False, True):
        params = [p for p in head_params if (p.ndim <= 1) == no_decay]
        if params:
            groups.append(
                {
                    "params": params,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": 1.0,
                    "name": f"head.{depth + 1}.{'no_decay' if no_decay else 'decay'}",
                }
            )
    if any(p.requires_grad for p in model.encoder.parameters()):
        for g in layer_decay_groups(model.encoder, 1.0, weight_decay, layer_decay):
            kind = "decay" if g["weight_decay"] else "no_decay"
            groups.append(
                {
                    "params": g["params"],
                    "weight_decay": g["weight_decay"],
                    "lr_scale": g["lr_scale"],
                    "name": f"encoder.{g['layer_id']}.{kind}",
                }
            )
    if not groups:
        raise ValueError("the segmentation model has no trainable parameters")
    return groups


def _prepare_encoder(
    spec: str | os.PathLike[str] | nn.Module,
    img_size: int | None,
    seed: int,
    mean: list[float] | None,
    std: list[float] | None,
) -> tuple[nn.Module, list[float], list[float]]:
    from semmim.eval.common import encoder_geometry, load_encoder

    if isinstance(spec, nn.Module):
        if mean is None or std is None:
            raise ValueError("pass mean and std with an nn.Module encoder")
        encoder = spec
    else:
        encoder, m, s = load_encoder(spec, seed=seed)
        mean, std = mean or m, std or s
    native, _ = encoder_geometry(encoder)
    if img_size is not None and img_size != native:
        set_size = getattr(encoder, "set_input_size", None)
        if not callable(set_size):
            raise ValueError(f"the encoder is built for {native}px and cannot be resized to img_size={img_size}")
        ps: Any = encoder.get_submodule("patch_embed").patch_size
        patch = int(ps if isinstance(ps, int) else ps[0])
        if img_size % patch:
            raise ValueError(f"img_size={img_size} is not a multiple of the encoder's patch size {patch}")
        set_size(img_size=(img_size, img_size))  # resamples pos_embed (timm's resample_abs_pos_embed)
    return encoder, mean, std


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
    """Train a segmentation head on an encoder's patch tokens and report mIoU on the test split.

    The encoder is frozen by default (only the head learns); ``finetune=True`` trains it too, with
    layer-wise lr decay ``layer_decay`` (:func:`seg_param_groups`). AdamW, linear warmup (default: 10% of
    the steps, at most 1500) + cosine decay per step, cross-entropy with ``ignore_index=255``; images are
    normalised with the encoder's mean / std. Seeded (head init, shuffling, augmentation).

    Args:
        encoder: a run directory, ``encoder.safetensors``, ``random:<run>``, or a timm ViT module (then
            ``cfg.mean`` and ``cfg.std`` are required; a module is trained in place when fine-tuning, and
            resized in place when ``cfg.img_size`` differs from its own).
        cfg: the protocol's settings (:class:`semmim.eval.config.SegConfig`, each key documented there;
            default: its defaults). ``data`` is "fashion_mnist" (derived 11-class foreground task) or
            "ade20k" (``root`` = ADEChallengeData2016). Another ``img_size`` than the encoder's (a multiple
            of the patch size) resamples the position embeddings (timm's ``set_input_size`` /
            ``resample_abs_pos_embed``, bicubic).

    Returns:
        ``{"protocol": "seg", "head", "data", "finetune", "miou", "pixel_acc", "per_class_iou", "classes",
        "num_classes", "img_size", "steps", "train_loss", "n_train", "n_test"}``; metrics in %, see
        :class:`SegMetric` (mIoU averages over the classes present in target or prediction).
    """
    from torch.utils.data import RandomSampler

    from semmim.data import build_loader
    from semmim.data.segmentation import build_seg_dataset
    from semmim.engine.optim import cosine_lr
    from semmim.eval.common import encoder_geometry

    cfg = check_eval_config(cfg or SegConfig())
    data, root, head, finetune, epochs = cfg.data, cfg.root, cfg.head, cfg.finetune, cfg.epochs
    batch_size, lr, weight_decay, layer_decay = cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.layer_decay
    img_size, train_limit, test_limit, num_workers = cfg.img_size, cfg.train_limit, cfg.test_limit, cfg.num_workers
    seed, device, channels, max_steps = cfg.seed, cfg.device, cfg.channels, cfg.max_steps
    warmup_steps, mean, std = cfg.warmup_steps, cfg.mean, cfg.std
    if head not in SEG_HEADS:
        raise ValueError(f"unknown segmentation head '{head}'; choose one of {', '.join(SEG_HEADS)}")
    if epochs < 1 and not max_steps:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm in the head), got {batch_size}")
    enc, mean, std = _prepare_encoder(encoder, img_size, seed, mean, std)
    size, in_chans = encoder_geometry(enc)
    train_ds = build_seg_dataset(data, root, "train", size, in_chans, train_limit, train=True, seed=seed)
    test_ds = build_seg_dataset(data, root, "test", size, in_chans, test_limit, train=False, seed=seed)
    if len(train_ds) < 2:
        raise ValueError(f"the training split has {len(train_ds)} image(s); BatchNorm in the head needs >= 2")
    num_classes = train_ds.num_classes
    embed_dim = int(getattr(enc, "embed_dim", 0) or getattr(enc, "num_features", 0))
    torch.manual_seed(seed)
    model = SegModel(enc, build_seg_head(head, embed_dim, num_classes, channels), frozen=not finetune).to(dev)
    peak = lr if lr is not None else (1e-4 if finetune else 1e-3)
    groups = seg_param_groups(model, weight_decay, layer_decay)
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
        "head": head,
        "data": data,
        "finetune": bool(finetune),
        "miou": metrics["miou"],
        "pixel_acc": metrics["pixel_acc"],
        "per_class_iou": metrics["per_class_iou"],
        "classes": list(train_ds.classes),
        "num_classes": num_classes,
        "img_size": size,
        "steps": step,
        "epochs": epoch,
        "lr": peak,
        "train_loss": loss_sum / loss_n if loss_n else math.nan,
        "n_train": len(train_ds),
        "n_test": len(test_ds),
    }
