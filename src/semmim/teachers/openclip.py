"""OpenCLIP image towers as frozen teachers (MILAN's default teacher).

MILAN (Hou et al. 2022, arXiv:2208.06049, Sec. 3.1) takes the *last-layer* tokens of the CLIP image
encoder after ``ln_post`` and the projection ``proj`` — the CLS token and every patch token — as the
reconstruction targets. OpenCLIP's own ``VisionTransformer.forward`` only projects the pooled token,
so :class:`OpenCLIPTeacher` runs the tower from its submodules (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer``, ``ln_post``, ``proj``) and projects all tokens.

With ``tokens="last_block"`` the teacher gives instead the raw output of the last transformer block
(before ``ln_post``; 768-d for ViT-B/16), as the public MaskDistill reproductions do (Peng et al. 2022,
arXiv:2210.10615).

Only OpenCLIP's ``VisionTransformer`` tower without attentional pooling is supported; ResNet
(``ModifiedResNet``) and timm towers raise :class:`NotImplementedError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.config import check_loader_kwargs
from semmim.export import load_state_dict_file
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

__all__ = ["OpenCLIPTeacher", "build_open_clip_teacher", "load_open_clip_weights"]


def _visual_tower(model: nn.Module) -> Any:
    return model.visual if hasattr(model, "visual") else model


def _check_supported(visual: Any, name: str) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"open_clip model '{name}': the visual tower is a {type(visual).__name__}; only open_clip's "
            "VisionTransformer towers are supported as teachers (not ModifiedResNet or timm towers)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError(
            f"open_clip model '{name}': towers with attentional pooling (CoCa) are not supported as teachers"
        )


def _preprocess_stats(visual: Any) -> tuple[Sequence[float], Sequence[float]]:
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    return mean, std


class OpenCLIPTeacher(Teacher):
    """A frozen OpenCLIP ``VisionTransformer`` giving projected tokens and the CLS attention.

    Tokens are ``ln_post(x) @ proj`` for every position of the last layer (MILAN, arXiv:2208.06049).
    Token 0 is the model's image embedding: the projected CLS token for ``pool_type='tok'`` (equal to
    ``encode_image``), the mean of the projected patch tokens for ``pool_type='avg'``. With
    ``tokens="last_block"`` they are the last block's raw outputs ``x`` (width W), token 0 its CLS token
    (``pool_type='tok'``) or the mean of its patch tokens.

    Args:
        model: an OpenCLIP ``CLIP`` model (its ``visual`` tower is kept, the text tower dropped) or the
            ``VisionTransformer`` tower itself.
        image_size: input size; default the tower's own. A different size resamples the positional
            embedding on the fly (bicubic).
        mean: input mean; default the model's preprocess config, else OpenAI CLIP's.
        std: input std; default the model's preprocess config, else OpenAI CLIP's.
        name: model description for logs.
        tokens: ``proj`` (``ln_post`` then ``proj``) or ``last_block`` (the last block's raw output).
    """

    visual: Any

    def __init__(
        self,
        model: nn.Module,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "open_clip",
        tokens: str = "proj",
    ) -> None:
        visual = _visual_tower(model)
        _check_supported(visual, name)
        choice = check_clip_tokens(tokens)
        own_mean, own_std = _preprocess_stats(visual)
        proj = getattr(visual, "proj", None)
        width = int(visual.positional_embedding.shape[-1])
        embed_dim = int(proj.shape[1]) if proj is not None and tokens == "proj" else width
        super().__init__(
            embed_dim=embed_dim,
            image_size=to_hw(image_size if image_size is not None else visual.image_size),
            mean=mean if mean is not None else own_mean,
            std=std if std is not None else own_std,
            in_chans=int(visual.conv1.in_channels),
            name=name,
        )
        self.visual = visual
        self.tokens = choice
        self.patch_size = to_hw(visual.conv1.kernel_size)
        self.native_grid = (
            self.image_size[0] // self.patch_size[0],
            self.image_size[1] // self.patch_size[1],
        )
        self.freeze()

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        pos = self.visual.positional_embedding  # (1 + h*w, W)
        old = to_hw(self.visual.grid_size)
        if tuple(grid) == old:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False, antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def _cls_attention(self, block: Any, x: Tensor) -> Tensor:
        """CLS-query attention row of ``block`` for its captured (N, T, W) input; returns (N, T)."""
        h = block.ln_1(x)
        attn: Any = block.attn
        q_norm: Any = None
        k_norm: Any = None
        if isinstance(attn, nn.MultiheadAttention):
            width = attn.embed_dim
            if attn.in_proj_weight is not None:
                w_q, w_k = attn.in_proj_weight[:width], attn.in_proj_weight[width : 2 * width]
            else:
                w_q, w_k = attn.q_proj_weight, attn.k_proj_weight
            b = attn.in_proj_bias
            bq, bk = (None, None) if b is None else (b[:width], b[width : 2 * width])
            return cls_attention_row(h, w_q, bq, w_k, bk, attn.num_heads, attn.head_dim**-0.5)
        # open_clip's own Attention (CustomResidualAttentionBlock)
        width = attn.in_proj_weight.shape[1]
        w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
        b_q, b_k = (None, None) if b_in is None else (b_in[:width], b_in[width : 2 * width])
        if getattr(attn, "logit_scale", None) is not None:  # scaled cosine attention
            scale = float(torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp())
            q_norm, k_norm = (lambda t: F.normalize(t, dim=-1)), (lambda t: F.normalize(t, dim=-1))
        else:
            scale = float(attn.scale)
            q_norm, k_norm = attn.ln_q, attn.ln_k
        return cls_attention_row(
            h,
            w_in[:width],
            b_q,
            w_in[width : 2 * width],
            b_k,
            attn.num_heads,
            scale,
            q_norm=q_norm,
            k_norm=k_norm,
        )

    def extract(self, x: Tensor, need_attn: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Projected (or raw) last-layer tokens (N, 1 + h*w, D) and the CLS attention (N, h*w)."""
        v = self.visual
        feats = v.conv1(x)  # (N, W, h, w)
        grid = (int(feats.shape[-2]), int(feats.shape[-1]))
        feats = feats.flatten(2).transpose(1, 2)  # (N, h*w, W)
        cls = v.class_embedding.to(feats.dtype).expand(feats.shape[0], 1, -1)
        tokens = torch.cat([cls, feats], dim=1) + self._pos_embed(grid).to(feats.dtype)
        tokens = v.patch_dropout(tokens)
        tokens = v.ln_pre(tokens)
        last = v.transformer.resblocks[-1]
        with capture_input(last, enabled=need_attn) as captured:
            tokens = v.transformer(tokens)  # takes and returns (N, T, W) whatever its batch_first
        avg_pool = getattr(v, "pool_type", "tok") == "avg"
        if self.tokens == "last_block":
            out = tokens
            if avg_pool:
                out = torch.cat([out[:, 1:].mean(dim=1, keepdim=True), out[:, 1:]], dim=1)
        else:
            out = v.ln_post(tokens)
            if v.proj is not None:
                out = out @ v.proj
            if avg_pool:
                if getattr(v, "final_ln_after_pool", False):
                    pooled = v.ln_post(tokens[:, 1:].mean(dim=1))
                    pooled = pooled @ v.proj if v.proj is not None else pooled
                else:
                    pooled = out[:, 1:].mean(dim=1)
                out = torch.cat([pooled.unsqueeze(1), out[:, 1:]], dim=1)
        attn = None
        if need_attn:
            blk_in = captured.value
            if blk_in is None:
                raise RuntimeError(f"{self.name}: the last transformer block was not run")
            if not getattr(v.transformer, "batch_first", True):
                blk_in = blk_in.transpose(0, 1)  # (T, N, W) -> (N, T, W)
            attn = self._cls_attention(last, blk_in)[:, 1:]
        return out, attn, grid


def load_open_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint (full CLIP or visual-only state dict) into ``model``'s visual tower.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ValueError: the file is unreadable or its visual weights do not match (message names it and
            lists missing/unexpected keys).
    """
    p = Path(path).expanduser()
    state = load_state_dict_file(p)
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    if any(k.startswith("visual.") for k in cleaned):
        cleaned = {k[len("visual.") :]: v for k, v in cleaned.items() if k.startswith("visual.")}
    visual = _visual_tower(model)
    try:
        missing, unexpected = visual.load_state_dict(cleaned, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{p} does not fit the open_clip visual tower: {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"{p} does not fit the open_clip visual tower: missing keys {list(missing)[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {list(unexpected)[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )


@TEACHERS.register(
    "open_clip", help="OpenCLIP ViT image tower (MILAN): all tokens after ln_post and proj, or the last block's"
)
def build_open_clip_teacher(
    model: str | None = None,
    pretrained: str | bool | None = None,
    path: str | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_cfg: dict[str, Any] | None = None,
    tokens: str = "proj",
    **kwargs: Any,
) -> OpenCLIPTeacher:
    """Build an :class:`OpenCLIPTeacher`.

    Args:
        model: OpenCLIP architecture (``ViT-B-16``, ``hf-hub:...``, ``local-dir:...``).
        pretrained: an OpenCLIP pretrained tag (``openai``, ``laion2b_s34b_b88k``) or a checkpoint file.
        path: a local checkpoint file (full CLIP or visual-only state dict) loaded after creation.
        image_size: teacher input size; default the model's.
        mean: input mean override; default the model's preprocess config.
        std: input std override.
        model_cfg: instead of ``model``, an OpenCLIP model config (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ...) for a custom architecture, built with ``open_clip.model.CLIP``.
        tokens: ``proj`` (every token after ``ln_post`` and ``proj``) or ``last_block`` (the raw output of
            the last transformer block).
        **kwargs: forwarded to ``open_clip.create_model`` (or the ``CLIP`` constructor).

    Returns:
        The frozen teacher.
    """
    import open_clip

    check_loader_kwargs(kwargs, "open_clip teacher kwargs")
    check_clip_tokens(tokens)
    if pretrained is True:
        raise ValueError("open_clip teacher: pretrained must be a tag such as 'openai' or a checkpoint file")
    tag = pretrained if isinstance(pretrained, str) and pretrained else None
    if tag is not None and (looks_like_path(tag) or Path(tag).expanduser().exists()):
        if path is not None:
            raise ValueError(f"open_clip teacher: give the checkpoint once (pretrained={tag!r}, path={path!r})")
        path, tag = tag, None
    if path is not None and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"open_clip teacher checkpoint not found: {Path(path).expanduser()}")

    if model_cfg is not None:
        if tag is not None:
            raise ValueError("open_clip teacher: a pretrained tag needs a model name, not model_cfg")
        from open_clip.model import CLIP

        clip = CLIP(**{**model_cfg, **kwargs})
        label = "open_clip custom"
    elif model is not None:
        clip = open_clip.create_model(model, pretrained=tag, **kwargs)
        label = f"open_clip {model}" + (f" ({tag})" if tag else "")
    else:
        raise ValueError("open_clip teacher: give model= (an OpenCLIP architecture name) or model_cfg=")
    _check_supported(_visual_tower(clip), model or "custom")
    if path is not None:
        load_open_clip_weights(clip, path)
        label += f" from {path}"
    if tokens != "proj":
        label += f" ({tokens} tokens)"
    return OpenCLIPTeacher(clip, image_size=image_size, mean=mean, std=std, name=label, tokens=tokens)
