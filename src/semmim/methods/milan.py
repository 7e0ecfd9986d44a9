"""MILAN: masked image pretraining on language-assisted representation.

Hou et al. 2022, "MILAN: Masked Image Pretraining on Language Assisted Representation",
arXiv:2208.06049. The student (an MAE-style visible-only encoder) predicts the frozen CLIP image
encoder's features of *all* tokens through the prompting decoder; semantic-aware masking keeps the
patches the teacher's CLS token attends to visible more often; the loss is 2 - 2*cos over all tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import Config, ConfigError
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
from semmim.targets.features import TeacherFeatureTarget
from semmim.teachers.base import resample_tokens

DEFAULT_TARGET_NORM = "center"
"""MILAN's target conditioning when ``teacher.target_norm`` is not set: see benchmarks/results/semantic_transfer."""


@METHODS.register("milan")
class MILAN(Method):
    """Visible-only ViT + prompting decoder + teacher-feature target + cosine loss.

    Args:
        encoder: visible-only ViT.
        decoder: prompting (or MAE) decoder predicting D_teacher per token.
        masker: semantic (teacher CLS attention) or random.
        target: :class:`TeacherFeatureTarget` around a frozen teacher.
        loss: (pred, target, mask) -> scalar; default 2 - 2*cos over all tokens.
        mean, std: student input normalisation.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: nn.Module,
        masker: Any,
        target: TeacherFeatureTarget,
        loss: nn.Module,
        mean: list[float],
        std: list[float],
        global_weight: float = 1.0,
    ) -> None:
        super().__init__(encoder, mean, std)
        if not getattr(masker, "uniform_count", True):
            raise ConfigError(
                f"MILAN's visible-only encoder needs the same visible count per image; {masker!r} varies it. "
                "Use method.masking=semantic or random."
            )
        self.decoder = decoder
        self.masker = masker
        self.target = target
        self.loss_fn = loss
        self.global_weight = float(global_weight)

    def token_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss over all tokens (MILAN), the global token weighted ``global_weight`` against each patch.

        Args:
            pred: (N, 1 + L', D) predictions; target: (N, 1 + L', D) conditioned teacher tokens.
        """
        if self.global_weight == 1.0:
            return self.loss_fn(pred, target, None)
        n_patch = pred.shape[1] - 1
        glob = self.loss_fn(pred[:, :1], target[:, :1], None)
        patches = self.loss_fn(pred[:, 1:], target[:, 1:], None)
        return (self.global_weight * glob + n_patch * patches) / (self.global_weight + n_patch)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        imgs = self.images_of(batch)
        need_attn = bool(getattr(self.masker, "needs_scores", False))
        teacher_out = self.target(imgs, self.grid, need_attn=need_attn)  # one teacher pass: targets + attention
        # M masked views per image share the load and the teacher pass: (N * M, ...) from here on
        x, target, scores = self.repeat_views(self.normalize(imgs), teacher_out.tokens, teacher_out.cls_attn)
        assert x is not None and target is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device, scores=scores)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)  # (N * M, 1 + L, D_target)
        if target.shape[1] != pred.shape[1]:  # teacher.grid=native: pool the predictions to the teacher's grid
            own = self.target.teacher.native_grid
            assert own is not None
            pooled = resample_tokens(pred[:, 1:], self.grid, own)
            pred = torch.cat([pred[:, :1], pooled], dim=1)
        target = target.to(pred.dtype)
        loss = self.token_loss(pred, target)
        explained = target_explained(lambda p, t, m: self.token_loss(p, t), loss, target, None, global_token=True)
        return {"loss": loss, "target_explained": explained, "pred": pred.detach(), "mask": mask.mask}

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None) -> MILAN:
        encoder = build_encoder(cfg)
        target = build_feature_target(cfg, teacher, default_norm=DEFAULT_TARGET_NORM)
        return cls(
            encoder=encoder,
            decoder=build_decoder(cfg, encoder, target.out_dim, default="prompting"),
            masker=build_masker(cfg, default="semantic"),
            target=target,
            loss=build_loss(cfg, default="cosine"),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
            global_weight=cfg.teacher.global_weight,
        )
