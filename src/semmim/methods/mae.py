"""MAE: reconstruct normalised pixels of masked patches from the visible ones.

He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377.
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
    method_output,
)
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS


@METHODS.register("mae")
class MAE(Method):
    """Visible-only ViT encoder + MAE decoder + (normalised) pixel target + masked MSE.

    Args:
        encoder: visible-only ViT.
        decoder: predicts p*p*C values per patch.
        masker: a uniform-count masker (random).
        target: a pixel target (:class:`semmim.targets.PixelTarget`).
        loss: (pred, target, mask) -> scalar.
        mean, std: student input normalisation.
    """

    slots = ("masker", "decoder", "target", "loss")
    target_kinds = ("pixels",)
    multi_mask = True

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            "masker": {"name": "random", "mask_ratio": 0.75},
            "decoder": {"name": "mae"},
            "target": {"name": "pixels", "norm_pix": True},
            "loss": {"name": "mse"},
        }

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: nn.Module,
        masker: Any,
        target: nn.Module,
        loss: nn.Module,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__(encoder, mean, std)
        self.decoder = decoder
        self.masker = masker
        self.target = target
        self.loss_fn = loss

    def forward(self, batch: Mapping[str, Any]) -> MethodOutput:
        imgs = self.images_of(batch)
        target = self.target(imgs, self.grid).patches  # (N, L, p*p*C)
        # M masked views per loaded image share the load and the target: (N * M, ...) from here on
        x, target = self.repeat_views(self.normalize(imgs), target)
        assert x is not None and target is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]  # drop the CLS prediction
        loss = self.loss_fn(pred, target, mask.mask)
        return method_output(loss, pred=pred, target=target, mask=mask.mask)

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> MAE:
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
        )
