"""RILS: masked visual reconstruction in language semantic space.

Yang et al. 2023, "RILS: Masked Visual Reconstruction in Language Semantic Space", arXiv:2301.06958.
Caption embeddings of the batch act as prototypes: every patch becomes a distribution over the
captions. The unmasked image gives (i) the image embedding for an image-text contrastive loss and
(ii) per-patch target distributions softmax(patch·text / 0.04); the masked image, through an
MAE-style visible-only encoder and a 1-block decoder of encoder width, predicts log-softmax(pred·text
/ 0.1) for the masked patches. loss = InfoNCE + 0.5 * KL(target || prediction), the KL taken over the
masked patches of the samples whose image-to-text retrieval was correct.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.config import Config, ModelConfig
from semmim.losses.contrastive import gather_with_grad, info_nce, patch_text_kl, world_info
from semmim.methods.base import (
    GradCachePass,
    MethodOutput,
    build_decoder,
    build_encoder,
    build_masker,
    method_output,
)
from semmim.methods.clip import CLIPConfig, ImageTextModel, build_text_tower, captions_of
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS


@dataclass
class RILSConfig(CLIPConfig):
    teacher_temperature: float = 0.04
    """Temperature of the unmasked pass's patch-to-caption distribution."""
    student_temperature: float = 0.1
    """Temperature of the masked pass's patch-to-caption distribution."""
    kl_weight: float = 0.5
    """loss = InfoNCE + kl_weight * KL(teacher || student)."""
    gate_correct: bool = True
    """Use only samples whose image-to-text retrieval was correct for the KL term."""


def gather_captions(captions: list[str]) -> list[str]:
    """All ranks' captions in rank order (strings, no gradient)."""
    _, world = world_info()
    if world == 1:
        return captions
    out: list[list[str] | None] = [None] * world
    dist.all_gather_object(out, captions)
    return [c for part in out for c in (part or [])]


def caption_prototypes(all_text: Tensor, all_captions: list[str]) -> Tensor:
    """(P, E) rows of ``all_text`` for the unique caption strings, in order of first appearance."""
    keep: dict[str, int] = {}
    for i, c in enumerate(all_captions):
        keep.setdefault(c, i)
    return all_text[list(keep.values())]


def retrieval_correct(image: Tensor, text: Tensor, captions: list[str], all_captions: list[str]) -> Tensor:
    """(N,) 1.0 where the caption retrieved for image i (over ``text``'s rows) reads as image i's caption.

    Comparing caption strings rather than indices counts a retrieval as correct when another image
    has the identical caption (common with class-name templates).
    """
    sims = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    best = sims.argmax(dim=1)
    # caption strings -> ids on the host, compared on the device (no host-device sync)
    index = {c: k for k, c in enumerate(dict.fromkeys(all_captions))}
    all_ids = torch.tensor([index[c] for c in all_captions]).to(image.device, non_blocking=True)
    own_ids = torch.tensor([index.get(c, -1) for c in captions]).to(image.device, non_blocking=True)
    return (all_ids[best] == own_ids).float()


@METHODS.register("rils")
class RILS(ImageTextModel):
    """Contrastive image-text loss + KL between masked and unmasked patch-caption distributions.

    Args: see :class:`semmim.methods.clip.ImageTextModel`, plus
        decoder: 1-block MAE decoder of encoder width predicting E per token.
        masker: uniform-count masker (random 75%).
        student_temperature, teacher_temperature: 0.1 and 0.04 in the paper.
        kl_weight: 0.5 in the paper.
        gate_correct: restrict the KL to samples with correct image-to-text retrieval.
    """

    Options = RILSConfig
    slots = ("masker", "decoder")

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        # "a 1-block decoder of encoder width"
        decoder = {"name": "mae", "depth": 1, "embed_dim": model.embed_dim, "num_heads": model.num_heads}
        return {"masker": {"name": "random", "mask_ratio": 0.75}, "decoder": decoder}

    def __init__(
        self,
        encoder: ViTEncoder,
        text_encoder: nn.Module,
        decoder: nn.Module,
        masker: Any,
        embed_dim: int,
        init_temperature: float,
        locked_text: bool,
        student_temperature: float,
        teacher_temperature: float,
        kl_weight: float,
        gate_correct: bool,
        mean: list[float],
        std: list[float],
        pool: str = "mean",
    ) -> None:
        super().__init__(encoder, text_encoder, embed_dim, init_temperature, locked_text, pool, mean, std)
        self.decoder = decoder
        self.masker = masker
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.kl_weight = kl_weight
        self.gate_correct = gate_correct

    def forward(self, batch: Mapping[str, Any], grad_cache: GradCachePass | None = None) -> MethodOutput:
        if grad_cache is not None:
            return self.grad_cache_forward(batch, grad_cache)
        imgs = self.images_of(batch)
        captions = captions_of(batch, "rils")
        x = self.normalize(imgs)
        full = self.encoder.forward_features(x)  # unmasked pass (N, 1 + L, D)
        image = self.image_proj(self.pool_tokens(full))
        text = self.embed_text(captions, imgs.device)
        contrastive = self.contrastive(image, text)
        # the batch's (all ranks') captions are the prototypes; unique strings, no gradient
        all_captions = gather_captions(captions)
        all_text = gather_with_grad(text).detach()
        prototypes = caption_prototypes(all_text, all_captions)
        gate = retrieval_correct(image, all_text, captions, all_captions) if self.gate_correct else None
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]  # (N, L, E)
        teacher_patches = self.image_proj(full[:, 1:]).detach()
        kl = patch_text_kl(
            pred, teacher_patches, prototypes, mask.mask, self.student_temperature, self.teacher_temperature, gate
        )
        logs = {"info_nce": contrastive, "kl": kl}
        if gate is not None:
            logs["gate_frac"] = gate.mean()
        return method_output(
            contrastive + self.kl_weight * kl, pred=pred, target=teacher_patches, mask=mask.mask, **logs
        )

    # -------------------------------------------------------------- GradCache (see GradCachePass)
    def grad_cache_forward(self, batch: Mapping[str, Any], gc: GradCachePass) -> MethodOutput:
        """Reps of the micro-batch (``image``, ``text``, shared ``log_scale``, and the masked-patch count per
        image ``mask_count``); in pass 2 also its KL term against the effective batch's prototypes and gate.

        The unmasked pass, the text and the mask are drawn in the same order as :meth:`forward` (and in both
        passes), so a pass re-run under the same seed gives the same reps and the same mask.
        """
        imgs = self.images_of(batch)
        captions = captions_of(batch, "rils")
        x = self.normalize(imgs)
        full = self.encoder.forward_features(x)
        reps = {
            "image": self.image_proj(self.pool_tokens(full)),
            "text": self.embed_text(captions, imgs.device),
            "log_scale": self.contrastive.log_scale,
        }
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        reps["mask_count"] = mask.mask.sum(1).float()
        if gc.context is None:
            return MethodOutput(reps=reps)
        ctx, n = gc.context, x.shape[0]
        gate = ctx["gate"][gc.start : gc.start + n] if self.gate_correct else None
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]
        teacher_patches = self.image_proj(full[:, 1:]).detach()
        kl = patch_text_kl(
            pred,
            teacher_patches,
            ctx["prototypes"],
            mask.mask,
            self.student_temperature,
            self.teacher_temperature,
            gate,
            normalizer=ctx["kl_norm"],
        )
        out = method_output(self.kl_weight * kl, kl=kl)
        out["reps"] = reps
        return out

    def batch_loss(
        self, reps: dict[str, Tensor], batches: Sequence[Mapping[str, Any]]
    ) -> tuple[MethodOutput, dict[str, Tensor]]:
        """InfoNCE over the effective batch; its captions (all ranks) as prototypes and its retrieval gate for
        the micro-batches' KL terms, normalised by the gated masked patches of the whole effective batch."""
        image, text = reps["image"], reps["text"]
        captions = [c for b in batches for c in captions_of(b, "rils")]
        contrastive = info_nce(image, text, self.scale_of(reps))
        with torch.no_grad():
            all_captions = gather_captions(captions)
            all_text = gather_with_grad(text.detach())
            prototypes = caption_prototypes(all_text, all_captions)
            weight = reps["mask_count"].detach()
            context = {"prototypes": prototypes}
            logs = {"info_nce": contrastive.detach()}
            if self.gate_correct:
                gate = retrieval_correct(image.detach(), all_text, captions, all_captions)
                context["gate"] = gate
                weight = weight * gate
                logs["gate_frac"] = gate.mean()
            context["kl_norm"] = weight.sum().clamp_min(1.0)
        return method_output(contrastive, **logs), context

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> RILS:
        m = cfg.method
        assert isinstance(m, RILSConfig)
        encoder = build_encoder(cfg)
        return cls(
            encoder=encoder,
            text_encoder=build_text_tower(cfg),
            decoder=build_decoder(cfg, encoder, m.embed_dim),
            masker=build_masker(cfg),
            embed_dim=m.embed_dim,
            init_temperature=m.init_temperature,
            locked_text=cfg.text.locked,
            student_temperature=m.student_temperature,
            teacher_temperature=m.teacher_temperature,
            kl_weight=m.kl_weight,
            gate_correct=m.gate_correct,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
            pool=m.pool or "mean",
        )
