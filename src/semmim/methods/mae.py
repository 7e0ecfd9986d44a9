"""MAE: reconstruct normalised pixels of masked patches from the visible ones.

He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from semmim.config import Config, ConfigError
from semmim.methods.base import Method, build_decoder, build_encoder, build_loss, build_masker
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS
from semmim.targets.pixels import PixelTarget


@METHODS.register("mae")
class MAE(Method):
    """Visible-only ViT encoder + MAE decoder + (normalised) pixel target + masked MSE.

    Args:
        encoder: visible-only ViT.
        decoder: predicts p*p*C values per patch.
        masker: a uniform-count masker (random).
        target: :class:`PixelTarget`.
        loss: (pred, target, mask) -> scalar.
        mean, std: student input normalisation.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: nn.Module,
        masker: Any,
        target: PixelTarget,
        loss: nn.Module,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__(encoder, mean, std)
        if not getattr(masker, "uniform_count", True):
            raise ConfigError(
                f"MAE's visible-only encoder needs the same visible count per image; {masker!r} varies it. "
                "Use method.masking=random."
            )
        if getattr(masker, "needs_scores", False):
            raise ConfigError("MAE has no teacher to give attention scores: use method.masking=random")
        self.decoder = decoder
        self.masker = masker
        self.target = target
        self.loss_fn = loss

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        imgs = self.images_of(batch)
        (x,) = self.repeat_views(self.normalize(imgs))  # M masked views per loaded image: (N * M, C, H, W)
        assert x is not None
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]  # drop the CLS prediction
        target = self.target(x)
        loss = self.loss_fn(pred, target, mask.mask)
        return {"loss": loss, "pred": pred.detach(), "mask": mask.mask}

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None) -> MAE:
        encoder = build_encoder(cfg)
        p, c = cfg.model.patch_size, cfg.model.in_chans
        return cls(
            encoder=encoder,
            decoder=build_decoder(cfg, encoder, p * p * c, default="mae"),
            masker=build_masker(cfg, default="random"),
            target=PixelTarget(p, norm_pix=cfg.method.norm_pix_loss),
            loss=build_loss(cfg, default="mse"),
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
