"""timm models (ViTs and CNNs) as frozen teachers, including encoders exported by semmim.

For ViT-like models the targets are ``forward_features(x)`` (after the final norm): the class token
(or, without one, the mean of the patch tokens) followed by the patch tokens, with any other prefix
tokens (registers, distillation token) dropped. The CLS attention for MILAN's semantic-aware masking
(Hou et al. 2022, arXiv:2208.06049, Sec. 3.3) is the CLS query row of the last block's attention,
restricted to the patch keys and renormalised. For CNNs the targets are the mean of the last feature
map followed by its flattened positions; there is no CLS attention.

A model trained with semmim and exported with :mod:`semmim.export` can serve as the teacher of a
later run (e.g. a MaskDistill-style second stage): pass its run directory or ``encoder.safetensors``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import check_loader_kwargs
from semmim.export import load_state_dict_file, load_timm_model, read_metadata, resolve_encoder_file
from semmim.registry import TEACHERS
from semmim.teachers.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    capture_input,
    cls_attention_row,
    infer_grid,
    looks_like_path,
    to_hw,
)

__all__ = ["TimmTeacher", "build_timm_teacher", "load_timm_weights"]

_HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "head.fc.")


def _first_conv_in_chans(model: nn.Module, default: int = 3) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return default


def _native_image_size(model: nn.Module) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return to_hw(size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return to_hw(cfg.get("input_size", (3, 224, 224)))


def _attn_unsupported_reason(model: nn.Module) -> str | None:
    """Why the CLS attention cannot be computed for this model (``None`` if it can)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return "it has no 'blocks'"
    blk = blocks[-1]
    attn = getattr(blk, "attn", None)
    if not hasattr(blk, "norm1") or attn is None:
        return f"its last block ({type(blk).__name__}) has no 'norm1'/'attn'"
    if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
        return f"its attention ({type(attn).__name__}) has no fused 'qkv' projection"
    if getattr(model, "rope", None) is not None or getattr(attn, "rope", None) is not None:
        return "it uses rotary position embeddings"
    for extra in ("rel_pos", "relative_position_bias_table", "rel_pos_h"):
        if getattr(attn, extra, None) is not None:
            return f"its attention ({type(attn).__name__}) adds a relative position bias ('{extra}')"
    return None


class TimmTeacher(Teacher):
    """A frozen timm model giving per-token features (and the CLS attention for ViTs).

    Args:
        model: a timm model (``num_classes=0`` is not required; only ``forward_features`` is used).
        image_size: input size; default the model's (``patch_embed.img_size`` or its pretrained config).
            ViTs with ``set_input_size`` are resized to it (position embedding resampled).
        mean: input mean; default ``model.pretrained_cfg['mean']``, else ImageNet's.
        std: input std; default ``model.pretrained_cfg['std']``, else ImageNet's.
        name: model description for logs.
    """

    model: Any

    def __init__(
        self,
        model: nn.Module,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        native = _native_image_size(model)
        size = to_hw(image_size) if image_size is not None else native
        if size != native and getattr(model, "patch_embed", None) is not None and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)  # type: ignore[operator]
        super().__init__(
            embed_dim=int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0)),
            image_size=size,
            mean=mean if mean is not None else cfg.get("mean", IMAGENET_MEAN),
            std=std if std is not None else cfg.get("std", IMAGENET_STD),
            in_chans=_first_conv_in_chans(model),
            name=name or f"timm {cfg.get('architecture', type(model).__name__)}",
        )
        self.model = model
        self.is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1 if self.is_vit else 0))
        has_cls = getattr(model, "has_class_token", None)
        self.has_class_token = bool(getattr(model, "cls_token", None) is not None if has_cls is None else has_cls)
        self.attn_unsupported = _attn_unsupported_reason(model) if self.is_vit else "it is not a ViT"
        self.token_proj: nn.Linear | None = None
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None:
            self.native_grid = to_hw(grid)
        else:
            info = getattr(model, "feature_info", None)
            try:
                red = int(info[-1]["reduction"])  # type: ignore[index]
                self.native_grid = (-(-size[0] // red), -(-size[1] // red))
            except (TypeError, KeyError, IndexError):
                self.native_grid = None
        self.freeze()

    def _vit_grid(self, x: Tensor, num_patches: int) -> tuple[int, int]:
        patch_embed = self.model.patch_embed
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if hasattr(patch_embed, "dynamic_feat_size") and getattr(patch_embed, "patch_size", None) is not None:
            grid = tuple(int(g) for g in patch_embed.dynamic_feat_size(hw))
            if grid[0] * grid[1] == num_patches:
                return (grid[0], grid[1])
        return infer_grid(num_patches, hw)

    def _cls_attention(self, x: Tensor) -> Tensor:
        """CLS-query attention of the last block for its (N, T, D) input, over the patch keys: (N, L)."""
        blk = self.model.blocks[-1]
        attn = blk.attn
        h = blk.norm1(x)
        weight = attn.qkv.weight
        dim = weight.shape[0] // 3
        bias = attn.qkv.bias
        if bias is None and getattr(attn, "q_bias", None) is not None:  # BEiT/EVA-style separate biases
            k_bias = getattr(attn, "k_bias", None)
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias) if k_bias is None else k_bias])
        b_q, b_k = (None, None) if bias is None else (bias[:dim], bias[dim : 2 * dim])
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        head_dim = int(getattr(attn, "head_dim", dim // attn.num_heads))
        scale = float(getattr(attn, "scale", head_dim**-0.5))
        row = cls_attention_row(
            h, weight[:dim], b_q, weight[dim : 2 * dim], b_k, int(attn.num_heads), scale, q_norm, k_norm
        )
        row = row[:, self.num_prefix_tokens :]  # softmax was over all keys; keep the patch columns
        return row / row.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def extract(self, x: Tensor, need_attn: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Global token + patch tokens (N, 1 + h*w, D) and, for ViTs with a class token, the CLS attention."""
        want_attn = need_attn and self.is_vit and self.has_class_token
        if want_attn and self.attn_unsupported is not None:
            raise NotImplementedError(f"{self.name}: cannot compute the CLS attention because {self.attn_unsupported}")
        block = self.model.blocks[-1] if want_attn else self.model
        with capture_input(block, enabled=want_attn) as captured:
            feats = self.model.forward_features(x)
        if isinstance(feats, (list, tuple)):
            feats = feats[-1]
        if feats.dim() == 4:  # CNN feature map
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            grid = (int(feats.shape[-2]), int(feats.shape[-1]))
            patches = feats.flatten(2).transpose(1, 2)
            return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1), None, grid
        if feats.dim() != 3:
            raise RuntimeError(f"{self.name}: forward_features returned shape {tuple(feats.shape)}")
        patches = feats[:, self.num_prefix_tokens :]
        glob = feats[:, :1] if self.has_class_token else patches.mean(dim=1, keepdim=True)
        grid = self._vit_grid(x, patches.shape[1])
        attn = None
        if want_attn:
            if captured.value is None:
                raise RuntimeError(f"{self.name}: the last block was not run")
            attn = self._cls_attention(captured.value)
        tokens = torch.cat([glob, patches], dim=1)
        if self.token_proj is not None:
            tokens = self.token_proj(tokens)
        return tokens, attn, grid

    def set_projection(self, weight: Tensor) -> None:
        """Project every token with ``weight`` (E, D), e.g. a semmim ``clip`` run's image projection, so
        the targets live in the language-aligned space (as CLIP's ``proj`` for MILAN)."""
        if weight.dim() != 2 or weight.shape[1] != self.embed_dim:
            raise ValueError(f"projection of shape {tuple(weight.shape)} does not take {self.embed_dim}-d tokens")
        proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        proj.weight.data.copy_(weight)
        self.token_proj = proj
        self.embed_dim = int(weight.shape[0])
        self.freeze()


def _clean_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _try_load(model: nn.Module, state: dict[str, Tensor], head: tuple[str, ...]) -> tuple[list[str], list[str]]:
    missing, unexpected = model.load_state_dict(state, strict=False)
    return (
        [k for k in missing if not k.startswith(head)],
        [k for k in unexpected if not k.startswith(head)],
    )


def load_timm_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm model (classifier head keys ignored).

    The state dict is tried as it is, then through the model's own timm ``checkpoint_filter_fn``
    (which converts e.g. OpenAI CLIP or DINOv2 layouts and resamples position embeddings).

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ValueError: unreadable file, or keys that do not match (message names the file and lists them).
    """
    p = Path(path).expanduser()
    state = _clean_keys(load_state_dict_file(p))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head = tuple(f"{c}." for c in names) + _HEAD_PREFIXES
    try:
        missing, unexpected = _try_load(model, state, head)
        error: str | None = None
    except RuntimeError as e:  # shape mismatch
        missing, unexpected, error = [], [], str(e)
    if not missing and not unexpected and error is None:
        return
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            converted = filter_fn(dict(state), model)
            m2, u2 = _try_load(model, converted, head)
            if not m2 and not u2:
                return
        except Exception:
            pass
    if error is not None:
        raise ValueError(f"{p} does not fit timm model {type(model).__name__}: {error}")
    more_m = f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""
    more_u = f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""
    raise ValueError(
        f"{p} does not fit timm model {type(model).__name__}: missing keys {missing[:20]}{more_m}, "
        f"unexpected keys {unexpected[:20]}{more_u}"
    )


def _parse_pretrained(pretrained: str | bool | None) -> tuple[bool, str | None, str | None]:
    """-> (load hub weights, pretrained tag, checkpoint path)."""
    if pretrained is None or isinstance(pretrained, bool):
        return bool(pretrained), None, None
    text = str(pretrained).strip()
    if text.lower() in ("true", "1", "yes"):
        return True, None, None
    if text.lower() in ("false", "0", "no", ""):
        return False, None, None
    if looks_like_path(text) or Path(text).expanduser().exists():
        return False, None, text
    return True, text, None


def _load_from_path(model: str | None, path: str, kwargs: dict[str, Any]) -> tuple[nn.Module, str]:
    import timm

    p = Path(path).expanduser()
    if p.is_dir():
        p = resolve_encoder_file(p)  # FileNotFoundError naming the expected file
    if not p.is_file():
        raise FileNotFoundError(f"timm teacher weights not found: {p}")
    meta: dict[str, str] = read_metadata(p) if p.suffix == ".safetensors" else {}
    exported = meta.get("timm_model")
    if exported is not None and (model is None or model == exported):
        return load_timm_model(p, **kwargs), f"timm {exported} from {p}"
    if model is None:
        raise ValueError(f"{p} has no 'timm_model' metadata (not a semmim export): name the timm model with model=")
    net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    load_timm_weights(net, p)
    return net, f"timm {model} from {p}"


@TEACHERS.register("timm", help="timm ViT/CNN (hub, weights file or semmim export): forward_features tokens")
def build_timm_teacher(
    model: str | None = None,
    pretrained: str | bool | None = None,
    path: str | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> TimmTeacher:
    """Build a :class:`TimmTeacher`.

    Args:
        model: timm architecture (``vit_base_patch16_224``, ``resnet50``, ...); may be omitted for a
            semmim export, whose metadata names it.
        pretrained: ``True``/``"true"`` for timm hub weights, a pretrained tag (``"mae"`` ->
            ``model.mae``), or a weights file.
        path: local weights (``.safetensors``/``.pth``/``.bin``) or a semmim run directory / export file.
        image_size: teacher input size; default the model's.
        mean: input mean; default the model's pretrained config.
        std: input std; default the model's pretrained config.
        **kwargs: forwarded to ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``, ...).
    """
    import timm

    check_loader_kwargs(kwargs, "timm teacher kwargs")
    hub, tag, file = _parse_pretrained(pretrained)
    if file is not None:
        if path is not None:
            raise ValueError(f"timm teacher: give the weights once (pretrained={pretrained!r}, path={path!r})")
        path = file
    projection = None
    if path is not None:
        net, label = _load_from_path(model, path, kwargs)
        exported_norm = _export_normalization(path)
        if exported_norm is not None:  # a semmim export records the input statistics it was trained with
            mean = mean if mean is not None else exported_norm[0]
            std = std if std is not None else exported_norm[1]
        projection = _export_projection(path)
    else:
        if model is None:
            raise ValueError("timm teacher: give model= (a timm architecture) or path= (weights / semmim export)")
        name = f"{model}.{tag}" if tag else model
        net = timm.create_model(name, pretrained=hub, num_classes=0, **kwargs)
        label = f"timm {name}" + (" (pretrained hub weights)" if hub else " (random weights: no pretrained, no path)")
    teacher = TimmTeacher(net, image_size=image_size, mean=mean, std=std, name=label)
    if projection is not None:
        teacher.set_projection(projection)
        teacher.name += " + image projection"
    return teacher


PROJECTION_FILE = "image_projection.safetensors"


def _export_normalization(path: str) -> tuple[list[float], list[float]] | None:
    from semmim.export import read_normalization

    p = Path(path).expanduser()
    try:
        return read_normalization(p) if (p.is_dir() or p.suffix == ".safetensors") else None
    except (FileNotFoundError, ValueError):
        return None


def _export_projection(path: str) -> Tensor | None:
    """The image projection a semmim ``clip`` run writes next to its encoder, if any."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    folder = p if p.is_dir() else p.parent
    f = folder / PROJECTION_FILE
    if not f.is_file():
        return None
    return load_file(str(f))["weight"]
