"""MILAN: masked image pretraining on language-assisted representation.

Hou et al. 2022, "MILAN: Masked Image Pretraining on Language Assisted Representation",
arXiv:2208.06049. The student (an MAE-style visible-only encoder) predicts the frozen CLIP image
encoder's features of *all* tokens through the prompting decoder; semantic-aware masking keeps the
patches the teacher's CLS token attends to visible more often; the loss is 2 - 2*cos over all tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import Config, ConfigError, MethodConfig, ModelConfig
from semmim.methods.base import (
    Method,
    MethodOutput,
    build_decoder,
    build_encoder,
    build_loss,
    build_masker,
    build_target,
    method_output,
    target_explained,
)
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS
from semmim.teachers.base import resample_tokens

DEFAULT_TARGET_NORM = "center"
"""MILAN's target conditioning when ``method.target.norm`` is not set: see benchmarks/results/semantic_transfer."""


@dataclass
class MILANConfig(MethodConfig):
    global_weight: float = 1.0
    """Weight of the global (CLS) token in the loss against each patch token (1 = as in MILAN)."""


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
        global_weight: weight of the global token against each patch token in the loss.
    """

    Options = MILANConfig
    slots = ("masker", "decoder", "target", "loss")
    target_kinds = ("features",)
    masker_scores = True
    multi_mask = True
    reads_teacher_cache = True
    native_grid = True

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            "masker": {"name": "semantic", "mask_ratio": 0.75},
            "decoder": {"name": "prompting"},
            "target": {"name": "teacher_features", "norm": DEFAULT_TARGET_NORM},
            "loss": {"name": "cosine"},
        }

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        opts = cfg.method
        assert isinstance(opts, MILANConfig)
        if opts.global_weight < 0:
            raise ConfigError(f"method.global_weight must be >= 0, got {opts.global_weight}")

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: nn.Module,
        masker: Any,
        target: nn.Module,
        loss: nn.Module,
        mean: list[float],
        std: list[float],
        global_weight: float = 1.0,
    ) -> None:
        super().__init__(encoder, mean, std)
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

    def forward(self, batch: Mapping[str, Any]) -> MethodOutput:
        imgs = self.images_of(batch)
        need_attn = bool(getattr(self.masker, "needs_scores", False))
        teacher_out = self.teacher_targets(batch, imgs, need_attn)  # one teacher pass: targets + attention
        # M masked views per image share the load and the teacher pass: (N * M, ...) from here on
        x, target, scores = self.repeat_views(self.normalize(imgs), teacher_out.tokens, teacher_out.cls_attn)
        assert x is not None and target is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device, scores=scores)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)  # (N * M, 1 + L, D_target)
        if target.shape[1] != pred.shape[1]:  # method.target.grid=native: pool the predictions to the teacher's grid
            own: Any = self.target.native_grid
            assert own is not None
            pooled = resample_tokens(pred[:, 1:], self.grid, own)
            pred = torch.cat([pred[:, :1], pooled], dim=1)
        target = target.to(pred.dtype)
        loss = self.token_loss(pred, target)
        explained = target_explained(lambda p, t, m: self.token_loss(p, t), loss, target, None, global_token=True)
        return method_output(loss, pred=pred, target=target, mask=mask.mask, target_explained=explained)

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> MILAN:
        opts = cfg.method
        assert isinstance(opts, MILANConfig)
        encoder = build_encoder(cfg)
        target = build_target(cfg, teacher)
        return cls(
            encoder=encoder,
            decoder=build_decoder(cfg, encoder, target.out_dim),
            masker=build_masker(cfg),
            target=target,
            loss=build_loss(cfg),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
            global_weight=opts.global_weight,
        )
