"""Supervised training with masked image modeling as an auxiliary task.

"Improve Supervised Representation Learning with Masked Image Modeling", arXiv:2312.00950. A ViT
classifier is trained with labels on the unmasked image; at the same time a shallow transformer
decoder (2 blocks by default) reconstructs the masked patches of a masked view from the same encoder.
The paper reconstructs "image tokens" (discrete codes of a frozen tokenizer, predicted with a
cross-entropy); here the target is selectable: normalised pixels (default, MSE), teacher features
(smooth-L1), or token ids (``ce``) of a k-means ``codebook`` over a teacher's features or of a pretrained
``vq`` tokenizer (BEiT v2's VQ-KD). The total loss is ``CE + mim_weight * MIM``. At inference the model
is a plain ViT classifier: the decoder is dropped, so there is no overhead, and the export loads into
``timm.create_model(..., num_classes=K)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.config import Config, ConfigError, MethodConfig, ModelConfig
from semmim.eval.classify import CLASSIFIER_FILE
from semmim.methods.base import (
    Method,
    MethodOutput,
    build_decoder,
    build_encoder,
    build_loss,
    build_masker,
    build_target,
    masked_token_accuracy,
    method_output,
    target_explained,
)
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS, TARGETS

MIM_LOSSES: dict[str, dict[str, Any]] = {
    "pixels": {"name": "mse"},
    "features": {"name": "smooth_l1"},
    "tokens": {"name": "ce"},
}
"""The default ``method.loss`` for each kind of target."""


@dataclass
class SupMIMConfig(MethodConfig):
    num_classes: int | None = None
    """Classes of the classifier; None = taken from the dataset."""
    mim_weight: float = 1.0
    """Total loss = cross-entropy + mim_weight * MIM loss (0 = supervised only)."""
    label_smoothing: float = 0.1
    """Label smoothing of the classifier's cross-entropy (a token target's ``ce`` loss has its own
    ``method.loss.label_smoothing``)."""
    mixup: float = 0.0
    """Mixup alpha (0 = off), applied on the device with timm's Mixup."""
    cutmix: float = 0.0
    """CutMix alpha (0 = off)."""


@METHODS.register("supmim")
class SupervisedMIM(Method):
    """ViT classifier (cross-entropy, label smoothing, optional mixup/cutmix) + MIM decoder branch.

    Args:
        encoder: ViT shared by both branches (visible-only path for the masked view).
        head: linear classifier on the CLS token, (N, D) -> (N, K).
        decoder: shallow decoder for the masked view (MAE decoder, 2 blocks by default).
        masker: uniform-count masker for the masked view (random 75% by default).
        target: a pixel, teacher-feature or token target (codebook, vq).
        mim_loss: (pred, target, mask) -> scalar over masked patches (``ce`` for token targets).
        mim_weight: weight of the MIM loss (0 trains the classifier alone, same code path otherwise).
        label_smoothing: for the cross-entropy when mixup/cutmix are off.
        mixup: a ``timm.data.Mixup`` applied on the device, or None.
        mean, std: student input normalisation.
    """

    needs_labels = True
    Options = SupMIMConfig
    data_keys = ("num_classes",)
    slots = ("masker", "decoder", "target", "loss")
    target_kinds = ("pixels", "features", "tokens")
    _labels_checked = False

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        target = nodes.get("target")
        name = target if isinstance(target, str) else (target or {}).get("name", "pixels")
        kind = getattr(TARGETS.get(str(name)), "kind", "features") if name is not None and name in TARGETS else "pixels"
        return {
            "masker": {"name": "random", "mask_ratio": 0.75},
            "decoder": {"name": "mae", "depth": 2},
            "target": {"name": "teacher_features", "norm": "ln"}
            if kind == "features"
            else {"name": "pixels", "norm_pix": True},
            "loss": MIM_LOSSES.get(kind, {"name": "mse"}),
        }

    def __init__(
        self,
        encoder: ViTEncoder,
        head: nn.Linear,
        decoder: nn.Module,
        masker: Any,
        target: nn.Module,
        mim_loss: nn.Module,
        mim_weight: float,
        label_smoothing: float,
        mixup: Any,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__(encoder, mean, std)
        self.head = head
        self.decoder = decoder
        self.masker = masker
        self.target = target
        self.mim_loss = mim_loss
        self.mim_weight = float(mim_weight)
        self.label_smoothing = float(label_smoothing)
        self.mixup = mixup

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    def classify(self, images: Tensor) -> Tensor:
        """Inference: (N, C, H, W) in [0, 1] -> logits (N, K); no masking, no decoder."""
        return self.head(self.encoder.forward_features(self.normalize(images))[:, 0])

    def forward(self, batch: Mapping[str, Any]) -> MethodOutput:
        imgs = self.images_of(batch)
        if "label" not in batch:
            raise KeyError("supmim needs labelled batches ('label'); the dataset gave none")
        labels = batch["label"]
        check = labels.device.type == "cpu" or not self._labels_checked  # on a GPU once: the check syncs
        if check and bool((labels < 0).any()):
            raise ValueError(
                "supmim trains a classifier but the batch holds unlabelled images (label -1): use a labelled "
                "dataset (an image folder with one subfolder per class, or fashion_mnist)"
            )
        self._labels_checked = True
        soft = None
        if self.mixup is not None and self.training:
            imgs, soft = self.mixup(imgs.clone(), labels)
        x = self.normalize(imgs)
        logits = self.head(self.encoder.forward_features(x)[:, 0])
        if soft is not None:
            ce = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        if self.mim_weight == 0:
            return method_output(ce, ce=ce, acc=acc)
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]  # (N, L, D), or (N, L, V) logits for a token target
        target = self.target(imgs, self.grid).patches  # (N, L, D) floats or (N, L) ids of the (mixed) images
        if target.is_floating_point():
            target = target.to(pred.dtype)
        mim = self.mim_loss(pred, target, mask.mask)
        logs = {"ce": ce, "acc": acc, "mim": mim}
        kind = getattr(self.target, "kind", "features")
        if kind == "features":
            logs["target_explained"] = target_explained(self.mim_loss, mim, target, mask.mask, global_token=False)
        elif kind == "tokens":
            logs["mim_acc"] = masked_token_accuracy(pred, target, mask.mask)
        return method_output(ce + self.mim_weight * mim, pred=pred, target=target, mask=mask.mask, **logs)

    def export(self, out_dir: Path, extra: dict[str, str]) -> Path:
        """Write encoder.safetensors and classifier.safetensors (timm ViT with its head)."""
        from semmim.export import save_encoder

        path = super().export(out_dir, extra)
        state = self.encoder.timm_state_dict()
        state["head.weight"] = self.head.weight
        state["head.bias"] = self.head.bias
        save_encoder(
            out_dir / CLASSIFIER_FILE,
            state,
            self.encoder.timm_name,
            self.encoder.timm_kwargs(),
            extra={**extra, "num_classes": str(self.num_classes)},
        )
        return path

    # -------------------------------------------------------------- data context (engine hook)
    @classmethod
    def data_context(cls, cfg: Config, dataset: Any) -> dict[str, Any]:
        """Labelled data is needed: ``{"num_classes": method.num_classes or the dataset's class count}``."""
        classes = list(getattr(dataset, "classes", []) or [])
        if not classes:
            raise ConfigError(
                f"method '{cfg.method.name}' trains a classifier and needs labelled images, but the dataset "
                f"'{cfg.data.name}' (root {cfg.data.root}) has no classes: use an image folder with one "
                "subfolder per class (root/<class>/<image>) or data.name=fashion_mnist"
            )
        n = getattr(cfg.method, "num_classes", None)
        if n is not None and n < len(classes):
            raise ConfigError(f"method.num_classes={n} < {len(classes)} classes in the data")
        return {"num_classes": n if n is not None else len(classes)}

    @classmethod
    def from_config(
        cls, cfg: Config, teacher: nn.Module | None = None, num_classes: int | None = None, **context: Any
    ) -> SupervisedMIM:
        m = cfg.method
        assert isinstance(m, SupMIMConfig)
        num_classes = num_classes if num_classes is not None else m.num_classes
        if not num_classes:
            raise ConfigError(
                "supmim needs method.num_classes (set it, or let `semmim pretrain` take it from a labelled dataset)"
            )
        encoder = build_encoder(cfg)
        target = build_target(cfg, teacher)
        head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        mixup = None
        if m.mixup > 0 or m.cutmix > 0:
            from timm.data import Mixup

            mixup = Mixup(
                mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, label_smoothing=m.label_smoothing, num_classes=num_classes
            )
        return cls(
            encoder=encoder,
            head=head,
            decoder=build_decoder(cfg, encoder, target.out_dim),
            masker=build_masker(cfg),
            target=target,
            mim_loss=build_loss(cfg),
            mim_weight=m.mim_weight,
            label_smoothing=m.label_smoothing,
            mixup=mixup,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
