"""RILS: masked visual reconstruction in language semantic space.

Yang et al. 2023, "RILS: Masked Visual Reconstruction in Language Semantic Space", arXiv:2301.06958.
Caption embeddings of the batch act as prototypes: every patch becomes a distribution over the
captions. The unmasked image gives (i) the image embedding (mean of its patch tokens through the image
projection) for an image-text contrastive loss and (ii) per-patch target distributions
softmax(proj(patch)·text / 0.04); the masked image, through an MAE-style visible-only encoder and a
1-block decoder of encoder width, predicts log-softmax(proj(pred)·text / 0.1) for the masked patches,
through the same image projection (the official code's ``masked_pred @ image_projection``, so the KL
trains the projection too). loss = InfoNCE + 0.5 * KL(target || prediction), the KL taken over the
masked patches of the samples whose image-to-text retrieval was correct. Patch tokens, predictions and
prototypes are L2-normalised before the dot products; the prototypes and targets carry no gradient.
The paper trains its text transformer (CLIP's, 12 x 512, context 77) jointly from scratch:
``configs/rils/vit_base_p16_in1k.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.config import Config, ConfigError, ModelConfig
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
    kl_projection: str = "shared"
    """shared = the decoder predicts encoder-width tokens that go through the image projection, as the image
    embedding does (official RILS: masked_pred @ image_projection; the KL trains the projection too);
    separate = the decoder predicts joint-space tokens itself (the projection learns from InfoNCE only)."""
    text_head: str = "linear"
    """linear = a linear map from the text tower's output to the joint space (needed for a locked or differently
    sized tower); none = the tower's output is the caption embedding (official RILS: CLIP's text transformer
    ends in its own projection to the joint width, which must equal method.embed_dim)."""
    caption_match: str = "caption"
    """How the batch's captions are told apart, for the retrieval gate and the KL's prototypes. caption =
    identical captions are one caption (one prototype; retrieving any of them is correct); index = each
    sample's caption is its own row (official RILS; duplicates stay separate prototypes and only the own row
    counts). With all captions different (web data) both give the same numbers; index skips gathering the
    caption strings across ranks."""


KL_PROJECTIONS = ("shared", "separate")
TEXT_HEADS = ("linear", "none")
CAPTION_MATCHES = ("caption", "index")


def gather_captions(captions: list[str]) -> list[str]:
    """All ranks' captions in rank order (strings, no gradient)."""
    _, world = world_info()
    if world == 1:
        return captions
    out: list[list[str] | None] = [None] * world
    dist.all_gather_object(out, captions)
    return [c for part in out for c in (part or [])]


def caption_rows(all_captions: list[str]) -> list[int] | None:
    """For each caption, the row of its first occurrence (identical captions share it); None when all differ.

    Examples:
        >>> caption_rows(["a dog", "a cat", "a dog"])
        [0, 1, 0]
        >>> caption_rows(["a dog", "a cat"]) is None
        True
    """
    first: dict[str, int] = {}
    rows = [first.setdefault(c, i) for i, c in enumerate(all_captions)]
    return None if len(first) == len(rows) else rows


def retrieval_correct(image: Tensor, text: Tensor, own: Tensor, same: Tensor | None = None) -> Tensor:
    """(N,) 1.0 where the caption retrieved for image i (the most similar row of ``text``) is image i's caption.

    Args:
        image: (N, E) image embeddings.
        text: (M, E) caption embeddings of the (global) batch.
        own: (N,) long, the row of ``text`` holding image i's caption.
        same: (M,) long, for each row the row that stands for its caption (identical captions share one, see
            :func:`caption_rows`), so retrieving an identical caption counts as correct; None = rows are told
            apart by index alone (official RILS: ``argmax == label``).
    """
    sims = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    best = sims.argmax(dim=1)
    if same is None:
        return (best == own).float()
    return (same[best] == same[own]).float()


@METHODS.register("rils")
class RILS(ImageTextModel):
    """Contrastive image-text loss + KL between masked and unmasked patch-caption distributions.

    Args: see :class:`semmim.methods.clip.ImageTextModel`, plus
        decoder: 1-block MAE decoder of encoder width, predicting D per token (``kl_projection="shared"``,
            projected to E by ``image_proj``) or E (``"separate"``).
        masker: uniform-count masker (random 75%).
        student_temperature, teacher_temperature: 0.1 and 0.04 in the paper.
        kl_weight: 0.5 in the paper.
        gate_correct: restrict the KL to samples with correct image-to-text retrieval.
        kl_projection: "shared" (official) or "separate", see :class:`RILSConfig`.
        text_head: a linear map after the text tower (True), or none (official with CLIP's text transformer).
        caption_match: "caption" or "index" (official), see :class:`RILSConfig`.
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
        kl_projection: str = "shared",
        caption_match: str = "caption",
        text_head: bool = True,
        text_cache_size: int = 100_000,
    ) -> None:
        super().__init__(
            encoder,
            text_encoder,
            embed_dim,
            init_temperature,
            locked_text,
            pool,
            mean,
            std,
            text_head=text_head,
            text_cache_size=text_cache_size,
        )
        _check_choice("method.kl_projection", kl_projection, KL_PROJECTIONS)
        _check_choice("method.caption_match", caption_match, CAPTION_MATCHES)
        self.decoder = decoder
        self.masker = masker
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.kl_weight = kl_weight
        self.gate_correct = gate_correct
        self.kl_projection = kl_projection
        self.caption_match = caption_match

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        m = cfg.method
        assert isinstance(m, RILSConfig)
        _check_choice("method.kl_projection", m.kl_projection, KL_PROJECTIONS)
        _check_choice("method.caption_match", m.caption_match, CAPTION_MATCHES)
        _check_choice("method.text_head", m.text_head, TEXT_HEADS)
        model = cfg.text.model or ""
        if m.text_head == "none" and cfg.text.name == "open_clip" and model and not model.startswith("hf-hub:"):
            width = _open_clip_embed_dim(model)
            if width is not None and width != m.embed_dim:
                raise ConfigError(
                    f"method.text_head=none: the open_clip tower '{cfg.text.model}' gives {width} values per caption, "
                    f"but method.embed_dim={m.embed_dim}; set method.embed_dim={width} or method.text_head=linear"
                )

    # ------------------------------------------------------------------ pieces of the loss
    def predict(self, x: Tensor, mask: Any) -> Tensor:
        """The masked pass: normalised images (N, C, H, W) and their mask -> (N, L, E) joint-space predictions."""
        latent = self.encoder.forward_visible(x, mask.ids_keep)
        pred = self.decoder(latent, mask)[:, 1:]
        return self.image_proj(pred) if self.kl_projection == "shared" else pred

    def prototypes_and_gate(self, image: Tensor, text: Tensor, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """The KL's caption prototypes over all ranks, (P, E) without gradient, and the retrieval gate of this
        rank's rows, (N,) or None without ``gate_correct``.

        Args:
            image: (N, E) image embeddings of this rank.
            text: (N, E) their captions' embeddings.
            captions: the N caption strings.
        """
        all_text = gather_with_grad(text.detach())
        rows = None if self.caption_match == "index" else caption_rows(gather_captions(captions))
        # with duplicates: one prototype per distinct caption, in order of first appearance
        prototypes = all_text if rows is None else all_text[sorted(set(rows))]
        if not self.gate_correct:
            return prototypes, None
        rank, _ = world_info()
        n = image.shape[0]
        own = torch.arange(n, device=image.device) + rank * n
        same = None if rows is None else torch.tensor(rows).to(image.device, non_blocking=True)
        return prototypes, retrieval_correct(image.detach(), all_text, own, same)

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
        prototypes, gate = self.prototypes_and_gate(image, text, captions)  # the batch's (all ranks') captions
        mask = self.masker(x.shape[0], self.grid, device=x.device)
        pred = self.predict(x, mask)  # (N, L, E)
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
        pred = self.predict(x, mask)
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
            prototypes, gate = self.prototypes_and_gate(image, text, captions)
            weight = reps["mask_count"].detach()
            context = {"prototypes": prototypes}
            logs = {"info_nce": contrastive.detach()}
            if gate is not None:
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
            decoder=build_decoder(cfg, encoder, encoder.embed_dim if m.kl_projection == "shared" else m.embed_dim),
            masker=build_masker(cfg),
            embed_dim=m.embed_dim,
            init_temperature=m.init_temperature,
            locked_text=cfg.text.locked,
            text_cache_size=cfg.text.cache_size,
            student_temperature=m.student_temperature,
            teacher_temperature=m.teacher_temperature,
            kl_weight=m.kl_weight,
            gate_correct=m.gate_correct,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
            pool=m.pool or "mean",
            kl_projection=m.kl_projection,
            caption_match=m.caption_match,
            text_head=m.text_head == "linear",
        )


def _open_clip_embed_dim(model: str) -> int | None:
    """The text embedding width of an OpenCLIP architecture from its config (None when it cannot be read)."""
    import open_clip

    try:
        cfg = open_clip.get_model_config(model)
    except (OSError, ValueError):
        return None
    return int(cfg["embed_dim"]) if isinstance(cfg, dict) and "embed_dim" in cfg else None


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
