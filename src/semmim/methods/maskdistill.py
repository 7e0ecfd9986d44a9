"""MaskDistill: masked distillation of LayerNorm-normalised teacher features (a unified view of MIM).

Peng et al. 2022, "A Unified View of Masked Image Modeling", arXiv:2210.10615. A BEiT-style encoder
sees every patch, the masked ones replaced by a learnable mask token (block-wise masking, 40%); a
linear head regresses the teacher's patch features normalised per token by a LayerNorm without
affine parameters; the loss is smooth-L1 over the masked positions only.

The smooth-L1 threshold defaults to ``beta = 2.0``: the normalised targets have unit variance per
channel, so typical residuals lie in the quadratic zone (|e| < 2) as with MSE, while the linear zone
above keeps rare large residuals early in training from dominating the gradient. Set
``method.smooth_l1_beta`` to change it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from semmim.config import Config
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


@METHODS.register("maskdistill")
class MaskDistill(Method):
    """Mask-token ViT + linear head + LayerNorm-normalised teacher features + smooth-L1 on masked patches.

    Args:
        encoder: ViT built with ``mask_token=True`` (BEiT style; LayerScale recommended).
        head: per-token predictor to the teacher width (a linear layer by default).
        masker: block-wise by default (any masker works: the encoder takes per-sample counts).
        target: :class:`TeacherFeatureTarget` (``ln_target=True`` for MaskDistill).
        loss: (pred, target, mask) -> scalar over masked patches.
        mean, std: student input normalisation.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        head: nn.Module,
        masker: Any,
        target: TeacherFeatureTarget,
        loss: nn.Module,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__(encoder, mean, std)
        if encoder.mask_token is None:
            raise ValueError("MaskDistill needs an encoder built with mask_token=True")
        self.head = head
        self.masker = masker
        self.target = target
        self.loss_fn = loss

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        imgs = self.images_of(batch)
        need_attn = bool(getattr(self.masker, "needs_scores", False))
        teacher_out = self.target(imgs, self.grid, need_attn=need_attn)
        # M masked views per image share the load and the teacher pass: (N * M, ...) from here on
        x, target, scores = self.repeat_views(self.normalize(imgs), teacher_out.tokens, teacher_out.cls_attn)
        assert x is not None and target is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device, scores=scores)
        tokens = self.encoder.forward_masked(x, mask.mask)  # (N * M, 1 + L, D)
        pred = self.head(tokens[:, 1:], mask)  # patch tokens only
        patches = target[:, 1:].to(pred.dtype)
        loss = self.loss_fn(pred, patches, mask.mask)
        explained = target_explained(self.loss_fn, loss, patches, mask.mask, global_token=False)
        return {"loss": loss, "target_explained": explained, "pred": pred.detach(), "mask": mask.mask}

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None) -> MaskDistill:
        encoder = build_encoder(cfg, mask_token=True)
        target = build_feature_target(cfg, teacher, default_norm="ln")
        return cls(
            encoder=encoder,
            head=build_decoder(cfg, encoder, target.out_dim, default="linear"),
            masker=build_masker(cfg, default="block", default_ratio=0.4),
            target=target,
            loss=build_loss(cfg, default="smooth_l1"),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
