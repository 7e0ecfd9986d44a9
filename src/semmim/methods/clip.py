"""CLIP-style image-text alignment, optionally with a locked text tower (LiT).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv:2103.00020; Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning",
arXiv:2111.07991 (here the *text* tower is the locked one). A ``clip`` run's image tower is a
language-aligned teacher: its run directory holds ``encoder.safetensors`` and
``image_projection.safetensors``, and ``teacher.name=timm teacher.path=RUN_DIR`` gives MILAN and
MaskDistill targets in the joint image-text space (all tokens projected, as CLIP's ``proj``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from semmim.config import Config, ConfigError, MethodConfig
from semmim.losses.contrastive import InfoNCE, info_nce
from semmim.methods.base import GradCachePass, Method, MethodOutput, build_encoder, method_output
from semmim.models.vit import ViTEncoder
from semmim.registry import METHODS, TEXT_ENCODERS

PROJECTION_FILE = "image_projection.safetensors"
CLIP_FILE = "clip.safetensors"


@dataclass
class CLIPConfig(MethodConfig):
    embed_dim: int = 256
    """Width of the joint image-text embedding space."""
    init_temperature: float = 0.07
    """Initial softmax temperature of the contrastive loss (learnable, as in CLIP)."""
    pool: str | None = None
    """Image embedding from the CLS token ("cls") or the mean of patch tokens ("mean"); None = the method's
    default (clip: cls; rils: mean, its global average pooling)."""


def build_text_tower(cfg: Config) -> Any:
    t = cfg.text
    return TEXT_ENCODERS.build(t.name, model=t.model, pretrained=t.pretrained, path=t.path, max_length=t.max_length)


def captions_of(batch: Mapping[str, Any], method: str) -> list[str]:
    captions = batch.get("caption") if isinstance(batch, Mapping) else None
    if captions is None:
        raise KeyError(
            f"method '{method}' needs captions: use data.captions=templates with a labelled dataset, a manifest "
            "(data.name=manifest) or WebDataset shards (data.name=webdataset)"
        )
    return list(captions)


class ImageTextModel(Method):
    """Shared parts of the language-aligned methods: image/text towers, projections, temperature.

    Args:
        encoder: image ViT.
        text_encoder: a :class:`semmim.text.TextEncoder`.
        embed_dim: width E of the joint space.
        init_temperature: initial temperature of the contrastive loss (learnable).
        locked_text: freeze the text tower; its embeddings are then cached per caption.
        text_cache_size: most captions cached (least recently used dropped first; 0 = none).
        pool: image embedding from "cls" or "mean" of the patch tokens.
        mean, std: image input normalisation.
        text_head: a linear map from the text tower's output to the joint space (``text_proj``); False = the
            tower's output is the text embedding (its width must be ``embed_dim``; CLIP's own text transformer
            ends in such a projection).
    """

    needs_captions = True
    needs_text = True
    grad_cache = True
    Options = CLIPConfig

    # -------------------------------------------------------------- data context (engine hook)
    @classmethod
    def data_context(cls, cfg: Config, dataset: Any) -> dict[str, Any]:
        """Captions are needed: a map-style dataset must give them (a stream counts a sample without one as bad)."""
        from torch.utils.data import IterableDataset

        if not isinstance(dataset, IterableDataset) and "caption" not in dataset[0]:
            raise ConfigError(
                f"method '{cfg.method.name}' needs captions, but dataset '{cfg.data.name}' gives none: set "
                "data.captions=templates for a labelled dataset, or use data.name=manifest / webdataset"
            )
        return {}

    def __init__(
        self,
        encoder: ViTEncoder,
        text_encoder: nn.Module,
        embed_dim: int,
        init_temperature: float,
        locked_text: bool,
        pool: str,
        mean: list[float],
        std: list[float],
        text_head: bool = True,
        text_cache_size: int = 100_000,
    ) -> None:
        super().__init__(encoder, mean, std)
        if pool not in ("cls", "mean"):
            raise ConfigError(f"method.pool must be 'cls' or 'mean', got '{pool}'")
        self.pool = pool
        self.text_encoder = text_encoder
        self.locked_text = locked_text
        if locked_text:
            text_encoder.lock()  # type: ignore[operator]
            self.frozen_prefixes = (*Method.frozen_prefixes, "text_encoder.")
        text_dim = int(text_encoder.embed_dim)  # type: ignore[arg-type]
        # both layers are made before either is initialised: the random draws keep their order of old
        self.image_proj = nn.Linear(encoder.embed_dim, embed_dim, bias=False)
        self.text_proj: nn.Module = nn.Linear(text_dim, embed_dim, bias=False) if text_head else nn.Identity()
        nn.init.normal_(self.image_proj.weight, std=encoder.embed_dim**-0.5)
        if isinstance(self.text_proj, nn.Linear):
            nn.init.normal_(self.text_proj.weight, std=text_dim**-0.5)
        elif text_dim != embed_dim:
            raise ConfigError(
                f"method.text_head=none: the text tower gives {text_dim} values per caption, but method.embed_dim="
                f"{embed_dim}; set method.embed_dim={text_dim} or method.text_head=linear"
            )
        self.contrastive = InfoNCE(init_temperature)
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.text_cache_size = int(text_cache_size)

    # ------------------------------------------------------------------ towers
    def text_features(self, captions: Sequence[str], device: torch.device) -> Tensor:
        """(M,) captions -> (M, D_text) text-tower features (cached per caption when locked).

        A cached caption's features depend on that caption alone, not on which captions were new in the same
        step (``encode_each``), so a resumed run, whose cache starts empty, and a caption encoded again after the
        bounded cache dropped it get the same numbers.
        """
        if not self.locked_text:
            return self.text_encoder(list(captions)).float()
        cache = self._text_cache
        missing = list(dict.fromkeys(c for c in captions if c not in cache))
        fresh: dict[str, Tensor] = {}
        if missing:
            feats = self.text_encoder.encode_each(missing)  # type: ignore[operator]
            fresh = {c: f.float().cpu() for c, f in zip(missing, feats, strict=True)}
        out = torch.stack([fresh[c] if c in fresh else cache[c] for c in captions]).to(device)
        if self.text_cache_size:
            for c in dict.fromkeys(captions):
                if c in fresh:
                    cache[c] = fresh[c]
                cache.move_to_end(c)
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return out

    def embed_text(self, captions: Sequence[str], device: torch.device) -> Tensor:
        """(M,) captions -> (M, E) joint-space text embeddings (not normalised)."""
        return self.text_proj(self.text_features(captions, device))

    def pool_tokens(self, tokens: Tensor) -> Tensor:
        """(N, 1 + L, D) -> (N, D)."""
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)

    def embed_image(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, E) joint-space image embeddings (not normalised)."""
        return self.image_proj(self.pool_tokens(self.encoder.forward_features(self.normalize(images))))

    def embed(self, batch: Mapping[str, Any], method: str) -> dict[str, Tensor]:
        """GradCache reps of a batch: ``image`` (N, E), ``text`` (N, E) and the shared ``log_scale`` (0-dim, the
        temperature parameter itself, so that its gradient flows through the forward like every other one)."""
        imgs = self.images_of(batch)
        return {
            "image": self.embed_image(imgs),
            "text": self.embed_text(captions_of(batch, method), imgs.device),
            "log_scale": self.contrastive.log_scale,
        }

    def scale_of(self, reps: Mapping[str, Tensor]) -> Tensor:
        """The contrastive loss's inverse temperature from the reps' ``log_scale`` (as :class:`InfoNCE`)."""
        return reps["log_scale"].exp().clamp(max=self.contrastive.max_scale)

    @torch.no_grad()
    def zero_shot_weights(self, prompts: Sequence[Sequence[str]], device: torch.device) -> Tensor:
        """Per-class prompts -> (K, E) normalised class embeddings (mean over each class's prompts)."""
        weights = []
        for class_prompts in prompts:
            emb = F.normalize(self.embed_text(class_prompts, device), dim=-1).mean(0)
            weights.append(F.normalize(emb, dim=-1))
        return torch.stack(weights)

    # ------------------------------------------------------------------ export
    def export(self, out_dir: Path, extra: dict[str, str]) -> Path:
        """encoder.safetensors + image_projection.safetensors (teacher use) + clip.safetensors (zero-shot)."""
        path = super().export(out_dir, extra)
        save_file({"weight": self.image_proj.weight.detach().cpu().contiguous()}, str(out_dir / PROJECTION_FILE))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / CLIP_FILE), metadata={"format": "pt", "producer": "semmim"})
        return path


def i2t_accuracy(image: Tensor, text: Tensor, captions: Sequence[str]) -> Tensor:
    """Share of the images whose most similar caption (over these rows) reads as their own, on the device."""
    with torch.no_grad():
        sims = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        hit = [captions[j] == captions[i] for i, j in enumerate(sims.argmax(1).tolist())]
        return torch.tensor(sum(hit) / len(hit), device=image.device)


@METHODS.register("clip")
class CLIP(ImageTextModel):
    """Symmetric InfoNCE between pooled image tokens and caption embeddings (learnable temperature)."""

    def forward(self, batch: Mapping[str, Any], grad_cache: GradCachePass | None = None) -> MethodOutput:
        if grad_cache is not None:  # the loss comes from batch_loss over the effective batch
            return MethodOutput(reps=self.embed(batch, "clip"))
        imgs = self.images_of(batch)
        captions = captions_of(batch, "clip")
        image = self.embed_image(imgs)
        text = self.embed_text(captions, imgs.device)
        loss = self.contrastive(image, text)
        return method_output(
            loss, i2t_acc=i2t_accuracy(image, text, captions), temperature=1.0 / self.contrastive.scale.detach()
        )

    def batch_loss(
        self, reps: dict[str, Tensor], batches: Sequence[Mapping[str, Any]]
    ) -> tuple[MethodOutput, dict[str, Tensor]]:
        """InfoNCE over the effective batch (GradCache; see :class:`semmim.methods.base.GradCachePass`)."""
        captions = [c for b in batches for c in captions_of(b, "clip")]
        scale = self.scale_of(reps)
        loss = info_nce(reps["image"], reps["text"], scale)
        acc = i2t_accuracy(reps["image"], reps["text"], captions)
        return method_output(loss, i2t_acc=acc, temperature=1.0 / scale.detach()), {}

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> CLIP:
        m = cfg.method
        assert isinstance(m, CLIPConfig)
        return cls(
            encoder=build_encoder(cfg),
            text_encoder=build_text_tower(cfg),
            embed_dim=m.embed_dim,
            init_temperature=m.init_temperature,
            locked_text=cfg.text.locked,
            text_cache_size=cfg.text.cache_size,
            pool=m.pool or "cls",
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        )
