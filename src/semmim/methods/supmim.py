"""Supervised training with masked image modeling as an auxiliary task.

"Improve Supervised Representation Learning with Masked Image Modeling", arXiv:2312.00950. A ViT
classifier is trained with labels on the unmasked image; at the same time a shallow transformer
decoder (2 blocks by default) reconstructs the masked patches of a masked view from the same encoder
(normalised pixels by default, teacher features selectable). The total loss is
``CE + mim_weight * MIM``. At inference the model is a plain ViT classifier: the decoder is dropped,
so there is no overhead, and the export loads into ``timm.create_model(..., num_classes=K)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.config import Config, ConfigError
from semmim.eval.classify import CLASSIFIER_FILE
from semmim.methods.base import (
    Method,
    build_decoder,
    build_encoder,
    build_feature_target,
    build_loss,
    build_masker,
    target_explained,
)
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS
from semmim.targets.pixels import PixelTarget


@METHODS.register("supmim")
class SupervisedMIM(Method):
    """ViT classifier (cross-entropy, label smoothing, optional mixup/cutmix) + MIM decoder branch.

    Args:
        encoder: ViT shared by both branches (visible-only path for the masked view).
        head: linear classifier on the CLS token, (N, D) -> (N, K).
        decoder: shallow decoder for the masked view (MAE decoder, 2 blocks by default).
        masker: uniform-count masker for the masked view (random 75% by default).
        target: :class:`PixelTarget` or :class:`TeacherFeatureTarget`.
        mim_loss: (pred, target, mask) -> scalar over masked patches.
        mim_weight: weight of the MIM loss (0 trains the classifier alone, same code path otherwise).
        label_smoothing: for the cross-entropy when mixup/cutmix are off.
        mixup: a ``timm.data.Mixup`` applied on the device, or None.
        mean, std: student input normalisation.
    """

    needs_labels = True

    _labels_checked = False

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
        if not getattr(masker, "uniform_count", True):
            raise ConfigError(f"supmim's masked view uses the visible-only encoder; {masker!r} varies the count")
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

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
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
        out: dict[str, Tensor] = {"ce": ce.detach(), "acc": (logits.argmax(-1) == labels).float().mean().detach()}
        if self.mim_weight == 0:
            out["loss"] = ce
            return out
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]
        pixels = isinstance(self.target, PixelTarget)
        target = self.target(x) if pixels else self.target(imgs, self.grid).tokens[:, 1:].to(pred.dtype)
        mim = self.mim_loss(pred, target, mask.mask)
        if not pixels:
            out["target_explained"] = target_explained(self.mim_loss, mim, target, mask.mask, global_token=False)
        out.update({"loss": ce + self.mim_weight * mim, "mim": mim.detach(), "mask": mask.mask})
        return out

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
        n = cfg.method.num_classes
        if n is not None and n < len(classes):
            raise ConfigError(f"method.num_classes={n} < {len(classes)} classes in the data")
        return {"num_classes": n if n is not None else len(classes)}

    @classmethod
    def from_config(
        cls, cfg: Config, teacher: nn.Module | None = None, num_classes: int | None = None
    ) -> SupervisedMIM:
        m = cfg.method
        num_classes = num_classes if num_classes is not None else m.num_classes
        if not num_classes:
            raise ConfigError(
                "supmim needs method.num_classes (set it, or let `semmim pretrain` take it from a labelled dataset)"
            )
        encoder = build_encoder(cfg)
        target_name = m.target or "pixels"
        target: nn.Module
        if target_name == "pixels":
            p, c = cfg.model.patch_size, cfg.model.in_chans
            target, out_dim, default_loss = PixelTarget(p, norm_pix=m.norm_pix_loss), p * p * c, "mse"
        elif target_name == "teacher_features":
            feat = build_feature_target(cfg, teacher, default_norm="ln")
            target, out_dim, default_loss = feat, feat.out_dim, "smooth_l1"
        else:
            raise ConfigError(f"method.target='{target_name}' is not one of pixels, teacher_features")
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
            decoder=build_decoder(cfg, encoder, out_dim, default="mae"),
            masker=build_masker(cfg, default="random"),
            target=target,
            mim_loss=build_loss(cfg, default=default_loss),
            mim_weight=m.mim_weight,
            label_smoothing=m.label_smoothing,
            mixup=mixup,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
