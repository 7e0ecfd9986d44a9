"""What both segmentation protocols share: a ViT's block outputs as feature maps, the encoder + head
model, the mIoU metric, layer-decayed parameter groups and the encoder's preparation.

The frozen quick protocol lives in :mod:`semmim.eval.seg`, the fine-tuned UperNet recipe in
:mod:`semmim.eval.seg_finetune`; both build on these.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from semmim.data.segmentation import IGNORE_INDEX

__all__ = [
    "SegMetric",
    "SegModel",
    "feature_indices",
    "miou",
    "prepare_encoder",
    "seg_param_groups",
    "vit_intermediates",
]

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

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, C, H, W) -> (logits, auxiliary logits or None), each (N, K, H, W)."""
        size = (x.shape[-2], x.shape[-1])
        fwd = getattr(self.head, "forward_train", None)
        if callable(fwd):
            out: tuple[Tensor, Tensor | None] = fwd(self.features(x), size)
            return out
        return self.head(self.features(x), size), None


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


def prepare_encoder(
    spec: str | os.PathLike[str] | nn.Module,
    img_size: int | None,
    seed: int,
    mean: list[float] | None,
    std: list[float] | None,
) -> tuple[nn.Module, list[float], list[float]]:
    """The encoder of a segmentation run (loaded from a spec, or the module given) and its mean / std,
    resized to ``img_size`` when that differs from its own (position embeddings resampled).

    Raises:
        ValueError: a module without ``mean`` / ``std``, a size that is no multiple of the patch size, or an
            encoder that cannot be resized.
    """
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
