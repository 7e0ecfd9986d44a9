"""MaskDistill: masked distillation of LayerNorm-normalised teacher features (a unified view of MIM).

Peng et al. 2022, "A Unified View of Masked Image Modeling", arXiv:2210.10615. A BEiT-style encoder
sees every patch, the masked ones replaced by a learnable mask token (block-wise masking, 40%); a
linear head regresses the teacher's patch features normalised per token by a LayerNorm without
affine parameters; the loss is smooth-L1 over the masked positions only.

The smooth-L1 threshold defaults to ``beta = 2.0``: the normalised targets have unit variance per
channel, so typical residuals lie in the quadratic zone (|e| < 2) as with MSE, while the linear zone
above keeps rare large residuals early in training from dominating the gradient. Set
``method.loss.beta`` to change it.

With a token target (``method.target=vq`` with BEiT v2's VQ-KD tokenizer, or a k-means ``codebook`` over the
teacher's features) and ``method.loss=ce`` (the default for token targets) the same model is BEiT v2's
masked image modeling (Peng et al. 2022, arXiv:2208.06366; without its extra CLS-pretraining head): the
linear head predicts one logit per code at every masked position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from semmim.config import Config, ModelConfig
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


@METHODS.register("maskdistill")
class MaskDistill(Method):
    """Mask-token ViT + linear head + LayerNorm-normalised teacher features + smooth-L1 on masked patches.

    Args:
        encoder: ViT built with ``mask_token=True`` (BEiT style; LayerScale recommended).
        head: per-token predictor to the teacher width (a linear layer by default).
        masker: block-wise by default (any masker works: the encoder takes per-sample counts).
        target: teacher-feature target (``norm=ln`` for MaskDistill), or a token target (BEiT v2).
        loss: (pred, target, mask) -> scalar over masked patches (``ce`` for token targets).
        mean, std: student input normalisation.
    """

    slots = ("masker", "decoder", "target", "loss")
    encoder_kind = "mask_token"
    target_kinds = ("features", "tokens")
    masker_scores = True
    multi_mask = True
    reads_teacher_cache = True

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        target = nodes.get("target")
        name = target if isinstance(target, str) else (target or {}).get("name")
        tokens = name is not None and name in TARGETS and getattr(TARGETS.get(str(name)), "kind", None) == "tokens"
        return {
            "masker": {"name": "block", "mask_ratio": 0.4},
            "decoder": {"name": "linear"},
            "target": {"name": "teacher_features", "norm": "ln"},
            "loss": {"name": "ce"} if tokens else {"name": "smooth_l1", "beta": 2.0},
        }

    def __init__(
        self,
        encoder: ViTEncoder,
        head: nn.Module,
        masker: Any,
        target: nn.Module,
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

    def forward(self, batch: Mapping[str, Any]) -> MethodOutput:
        imgs = self.images_of(batch)
        need_attn = bool(getattr(self.masker, "needs_scores", False))
        teacher_out = self.teacher_targets(batch, imgs, need_attn)
        # M masked views per image share the load and the teacher pass: (N * M, ...) from here on
        x, target, scores = self.repeat_views(self.normalize(imgs), teacher_out.patches, teacher_out.cls_attn)
        assert x is not None and target is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device, scores=scores)
        tokens = self.encoder.forward_masked(x, mask.mask)  # (N * M, 1 + L, D)
        pred = self.head(tokens[:, 1:], mask)  # patch tokens only
        if not target.is_floating_point():  # (N, L) code ids: logits over the vocabulary
            loss = self.loss_fn(pred, target, mask.mask)
            acc = masked_token_accuracy(pred, target, mask.mask)
            return method_output(loss, pred=pred, target=target, mask=mask.mask, mim_acc=acc)
        patches = target.to(pred.dtype)
        loss = self.loss_fn(pred, patches, mask.mask)
        explained = target_explained(self.loss_fn, loss, patches, mask.mask, global_token=False)
        return method_output(loss, pred=pred, target=patches, mask=mask.mask, target_explained=explained)

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> MaskDistill:
        encoder = build_encoder(cfg, mask_token=True)
        target = build_target(cfg, teacher)
        return cls(
            encoder=encoder,
            head=build_decoder(cfg, encoder, target.out_dim),
            masker=build_masker(cfg),
            target=target,
            loss=build_loss(cfg),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
