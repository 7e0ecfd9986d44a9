"""Hugging Face ``transformers`` CLIP image encoders as frozen teachers.

Like MILAN (Hou et al. 2022, arXiv:2208.06049) the targets are the last-layer tokens after the final
LayerNorm (``post_layernorm``) and the image projection (``visual_projection``, when the checkpoint has
one), for the CLS token and every patch token. ``transformers`` applies ``post_layernorm`` and the
projection to the CLS token only, so the teacher applies them to all tokens itself. With
``tokens="last_block"`` the targets are the raw ``last_hidden_state`` instead (before ``post_layernorm``;
768-d for ViT-B/16), as in the public MaskDistill reproductions (Peng et al. 2022, arXiv:2210.10615).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from semmim.config import check_loader_kwargs
from semmim.registry import TEACHERS
from semmim.teachers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Teacher,
    capture_input,
    check_clip_tokens,
    cls_attention_row,
    looks_like_path,
    to_hw,
)

__all__ = ["HFCLIPTeacher", "build_hf_clip_teacher", "load_hf_clip"]

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _split_hf_model(model: nn.Module) -> tuple[Any, Any]:
    """``CLIPModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPVisionModel`` -> (vision, projection)."""
    projection = getattr(model, "visual_projection", None)
    vision: Any = model
    # CLIPModel / ...WithProjection hold the tower in ``vision_model``; older CLIPVisionModel versions too
    while not hasattr(vision, "embeddings") and hasattr(vision, "vision_model"):
        vision = vision.vision_model
    for attr in ("embeddings", "encoder", "post_layernorm"):
        if not hasattr(vision, attr):
            raise NotImplementedError(
                f"{type(model).__name__} is not a Hugging Face CLIP vision model (no '{attr}' in its tower)"
            )
    return vision, projection


class HFCLIPTeacher(Teacher):
    """A frozen Hugging Face CLIP vision tower giving projected tokens and the CLS attention.

    Tokens are ``visual_projection(post_layernorm(h))`` for every token ``h`` of the last hidden state
    (no projection for a plain ``CLIPVisionModel``), so token 0 equals ``image_embeds``; with
    ``tokens="last_block"`` they are ``last_hidden_state`` as it is (width ``hidden_size``).

    Args:
        model: a ``CLIPModel``, ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``.
        image_size: input size; default the config's. Other sizes interpolate the position embedding.
        mean: input mean (default OpenAI CLIP's).
        std: input std (default OpenAI CLIP's).
        name: model description for logs.
        tokens: ``proj`` (``post_layernorm`` then the projection) or ``last_block`` (``last_hidden_state``).
    """

    vision: Any
    projection: Any

    def __init__(
        self,
        model: nn.Module,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "hf_clip",
        tokens: str = "proj",
    ) -> None:
        vision, projection = _split_hf_model(model)
        choice = check_clip_tokens(tokens)
        cfg = vision.config
        width = int(cfg.hidden_size)
        projected = isinstance(projection, nn.Linear) and choice == "proj"
        embed_dim = int(projection.out_features) if projected else width
        super().__init__(
            embed_dim=embed_dim,
            image_size=to_hw(image_size if image_size is not None else cfg.image_size),
            mean=mean if mean is not None else OPENAI_CLIP_MEAN,
            std=std if std is not None else OPENAI_CLIP_STD,
            in_chans=int(getattr(cfg, "num_channels", 3)),
            name=name,
        )
        self.vision = vision
        self.projection = projection
        self.tokens = choice
        self.config_image_size = to_hw(cfg.image_size)
        self.patch_size = to_hw(cfg.patch_size)
        self.native_grid = (
            self.image_size[0] // self.patch_size[0],
            self.image_size[1] // self.patch_size[1],
        )
        self.freeze()

    def _cls_attention(self, layer: Any, x: Tensor) -> Tensor:
        """CLS-query attention row of an encoder ``layer`` for its (N, T, W) input; returns (N, T)."""
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        return cls_attention_row(
            h,
            attn.q_proj.weight,
            attn.q_proj.bias,
            attn.k_proj.weight,
            attn.k_proj.bias,
            int(attn.num_heads),
            float(attn.scale),
        )

    def extract(self, x: Tensor, need_attn: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Projected (or raw) last-layer tokens (N, 1 + h*w, D) and the CLS attention (N, h*w)."""
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        interpolate = tuple(x.shape[-2:]) != self.config_image_size
        last = self.vision.encoder.layers[-1]
        with capture_input(last, enabled=need_attn) as captured:
            out = self.vision(pixel_values=x, interpolate_pos_encoding=interpolate)
        tokens = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.tokens == "proj":
            tokens = self.vision.post_layernorm(tokens)
            if self.projection is not None:
                tokens = self.projection(tokens)
        attn = None
        if need_attn:
            if captured.value is None:
                raise RuntimeError(f"{self.name}: the last encoder layer was not run")
            attn = self._cls_attention(last, captured.value)[:, 1:]
        return tokens, attn, grid


def _read_processor_stats(source: str) -> tuple[list[float] | None, list[float] | None]:
    """image_mean / image_std from a saved image processor config (local directory or hub cache).

    Looks at ``preprocessor_config.json`` and at ``processor_config.json`` (where newer ``transformers``
    nest the image processor's settings under ``image_processor``).
    """
    local = Path(source).expanduser()
    for name in PROCESSOR_FILES:
        file: str | None = None
        if local.is_dir():
            file = str(local / name) if (local / name).is_file() else None
        else:
            try:
                from transformers.utils import cached_file

                file = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
            except Exception:
                file = None
        if not file:
            continue
        try:
            cfg = json.loads(Path(file).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg.get("image_processor"), dict):
            cfg = cfg["image_processor"]
        if cfg.get("image_mean") is not None and cfg.get("image_std") is not None:
            return list(cfg["image_mean"]), list(cfg["image_std"])
    return None, None


def load_hf_clip(source: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Load a CLIP image model from a hub name or a local directory, choosing the class from its config.

    ``CLIPConfig`` -> ``CLIPModel``; a vision config whose ``architectures`` name
    ``CLIPVisionModelWithProjection`` -> that class; otherwise ``CLIPVisionModel``.

    Args:
        source: hub name (``openai/clip-vit-base-patch16``) or local directory.
        pretrained: ``False`` builds the architecture with random weights (config only).
        **kwargs: forwarded to ``from_pretrained``; keys that allow unsafe unpickling or remote code
            (``weights_only``, ``trust_remote_code``, ...) raise :class:`semmim.config.ConfigError`.
    """
    check_loader_kwargs(kwargs, "hf_clip teacher kwargs")
    from transformers import (
        AutoConfig,
        CLIPConfig,
        CLIPModel,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    local = Path(source).expanduser()
    if looks_like_path(source) and not local.exists():
        raise FileNotFoundError(f"hf_clip teacher: model directory not found: {local}")
    src = str(local) if local.exists() else source
    if local.exists() and not local.is_dir():
        raise ValueError(f"hf_clip teacher: {local} is a file; give the directory written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except OSError as e:
        raise FileNotFoundError(f"hf_clip teacher: could not load a model config from {src}: {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    cls: Any
    if isinstance(config, CLIPConfig):
        cls = CLIPModel
    elif "CLIPVisionModelWithProjection" in archs:
        cls = CLIPVisionModelWithProjection
    elif getattr(config, "model_type", "") == "clip_vision_model":
        cls = CLIPVisionModel
    else:
        raise NotImplementedError(
            f"hf_clip teacher: {src} holds a '{getattr(config, 'model_type', '?')}' model, not a CLIP one"
        )
    if not pretrained:
        return cls(config)
    return cls.from_pretrained(src, **kwargs)


@TEACHERS.register(
    "hf_clip", help="Hugging Face CLIP image encoder: all tokens after post_layernorm + projection, or the last block's"
)
def build_hf_clip_teacher(
    model: str | None = None,
    pretrained: str | bool | None = None,
    path: str | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tokens: str = "proj",
    **kwargs: Any,
) -> HFCLIPTeacher:
    """Build an :class:`HFCLIPTeacher` from a hub name or a ``save_pretrained`` directory.

    Args:
        model: hub name or local directory.
        pretrained: ``False``/``"false"`` for random weights with the checkpoint's architecture.
        path: a local directory (alternative to ``model``).
        image_size: teacher input size; default the config's.
        mean: input mean; default the saved image processor's, else OpenAI CLIP's.
        std: input std; same defaults.
        tokens: ``proj`` (after ``post_layernorm`` and the projection) or ``last_block`` (``last_hidden_state``).
        **kwargs: forwarded to ``from_pretrained`` (e.g. ``revision``, ``local_files_only``).
    """
    if model is not None and path is not None and model != path:
        raise ValueError(f"hf_clip teacher: give the model once (model={model!r}, path={path!r})")
    source = path if path is not None else model
    if source is None:
        raise ValueError("hf_clip teacher: give model= (a hub name or a local directory)")
    check_clip_tokens(tokens)
    load = not (pretrained is False or (isinstance(pretrained, str) and pretrained.lower() in ("false", "0", "no")))
    net = load_hf_clip(source, pretrained=load, **kwargs)
    own_mean, own_std = _read_processor_stats(source)
    return HFCLIPTeacher(
        net,
        image_size=image_size,
        mean=mean if mean is not None else own_mean,
        std=std if std is not None else own_std,
        name=f"hf_clip {source}" + (f" ({tokens} tokens)" if tokens != "proj" else ""),
        tokens=tokens,
    )
