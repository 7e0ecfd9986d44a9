"""OpenCLIP text towers as sentence encoders (CLIP-style image-text alignment).

The embedding of a text is OpenCLIP's own ``model.encode_text(tokens)`` (Radford et al. 2021, "CLIP",
arXiv:2103.00020): the token transformer, ``ln_final``, pooling at the end-of-text token (or as the
model's config says) and the ``text_projection``, *without* the L2 normalisation. It therefore lives in
the joint image-text space of the matching image tower (see the ``open_clip`` teacher).

The image tower (``visual``), CoCa's multimodal decoder and the logit scale/bias are dropped to save
memory. Tokenizing uses ``open_clip.get_tokenizer``; the CLIP BPE vocabulary ships with
``open_clip_torch``, so it is offline (towers with a Hugging Face tokenizer need it in the local cache).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import check_loader_kwargs
from semmim.export import load_state_dict_file
from semmim.registry import TEXT_ENCODERS
from semmim.text.base import TextEncoder, looks_like_path, open_clip_context_length, parse_flag

__all__ = [
    "OpenCLIPTextEncoder",
    "build_open_clip_text_encoder",
    "load_open_clip_text_weights",
    "open_clip_context_length",
]

# parts of an open_clip model that ``encode_text`` does not use
_NON_TEXT_PARTS = ("visual", "text_decoder", "logit_scale", "logit_bias")


def _strip_non_text(model: nn.Module) -> nn.Module:
    """Delete the image tower and other parts ``encode_text`` does not need (in place)."""
    for attr in _NON_TEXT_PARTS:
        if attr in model._modules or attr in model._parameters or attr in model.__dict__:
            delattr(model, attr)
    return model


def _text_width(model: Any) -> int | None:
    """Output width of ``model.encode_text`` read from its projection, or ``None`` if unclear."""
    tower: Any = getattr(model, "text", model)
    proj = getattr(tower, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, Tensor) and proj.dim() == 2:
        return int(proj.shape[1])
    out = getattr(tower, "output_dim", None)
    if isinstance(out, int):
        return out
    return None


def _tokenizer_from_cfg(text_cfg: Mapping[str, Any], context_length: int) -> Any:
    """The tokenizer open_clip would pick for a custom ``text_cfg``."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        return HFTokenizer(hf_name, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"))
    return SimpleTokenizer(context_length=context_length, **kwargs)


def _as_dict(cfg: Any) -> dict[str, Any]:
    """A ``text_cfg`` given as a mapping or a dataclass, as a dict."""
    if cfg is None:
        return {}
    return dict(cfg) if isinstance(cfg, Mapping) else dict(vars(cfg))


def _carries_weights(model: str) -> bool:
    """Whether an OpenCLIP model name brings its own weights (``hf-hub:`` and ``local-dir:`` ones may)."""
    return model.startswith(("hf-hub:", "local-dir:"))


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an OpenCLIP model; embedding = ``model.encode_text(tokens)`` (not normalised).

    Args:
        model: an OpenCLIP ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` model. Its image tower (and the other
            parts ``encode_text`` does not use) is deleted *in place*.
        tokenizer: the matching OpenCLIP tokenizer (``open_clip.get_tokenizer(name)``), a callable
            ``list[str] -> (N, context_length)`` token ids.
        name: model description for :meth:`describe`.
        normalize: L2-normalise the embeddings (CLIP's similarity does).

    The encoder starts in eval mode; call ``.train()`` to fine-tune it.
    """

    model: Any

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "open_clip", normalize: bool = False) -> None:
        clip: Any = model
        if not hasattr(clip, "encode_text"):
            raise TypeError(f"{name}: {type(model).__name__} has no encode_text(); pass an open_clip CLIP model")
        context_length = getattr(clip, "context_length", None) or getattr(tokenizer, "context_length", None)
        if not context_length:
            raise ValueError(f"{name}: cannot tell the model's context length")
        clip = _strip_non_text(clip)
        width = _text_width(clip)
        if width is None:  # unusual tower: measure it
            with torch.no_grad():
                width = int(clip.encode_text(tokenizer([""], context_length=int(context_length))).shape[-1])
        super().__init__(embed_dim=width, max_length=int(context_length), name=name, normalize=normalize)
        self.model = clip
        self.tokenizer = tokenizer
        self.eval()  # dropout off until ``.train()``, like the other text encoders

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize with the OpenCLIP tokenizer (lower-cased BPE, start/end-of-text tokens, zero padding).

        Args:
            texts: N strings.

        Returns:
            ``{"input_ids": (N, max_length) int64}`` on the CPU; texts are truncated to fit the context.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(list(texts), context_length=self.max_length)
        return {"input_ids": torch.as_tensor(ids, dtype=torch.long).cpu()}

    def embed(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Projected text features.

        Args:
            tokens: ``input_ids`` (N, max_length) on the module's device.

        Returns:
            (N, D) embeddings, ``model.encode_text(input_ids)``.
        """
        ids = tokens["input_ids"]
        if ids.dim() != 2 or ids.shape[1] != self.max_length:
            raise ValueError(f"{self.name}: expected input_ids of shape (N, {self.max_length}), got {tuple(ids.shape)}")
        return self.model.encode_text(ids)


def load_open_clip_text_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the text weights of a local open_clip checkpoint (full CLIP state dict) into ``model``.

    Image-tower keys and the logit scale/bias are ignored; every text weight of ``model`` must be present.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        ValueError: the file is unreadable or its text weights do not match (lists missing keys).
    """
    p = Path(os.fspath(path)).expanduser()
    state = load_state_dict_file(p)
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.split(".", 1)[0] in _NON_TEXT_PARTS:
            continue
        cleaned[key] = value
    try:
        missing, unexpected = model.load_state_dict(cleaned, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{p} does not fit the open_clip text tower: {e}") from None
    if missing:
        raise ValueError(
            f"{p} does not fit the open_clip text tower: missing keys {list(missing)[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {list(unexpected)[:20]}"
        )


@TEXT_ENCODERS.register("open_clip", help="OpenCLIP text tower: encode_text (ln_final + text_projection)")
def build_open_clip_text_encoder(
    model: str | None = None,
    pretrained: str | bool | None = None,
    path: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    locked: bool | str | None = None,
    normalize: bool | str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> OpenCLIPTextEncoder:
    """Build an :class:`OpenCLIPTextEncoder`.

    Args:
        model: OpenCLIP architecture (``ViT-B-16``, ``hf-hub:...``, ``local-dir:...``).
        pretrained: an OpenCLIP pretrained tag (``openai``, ``laion2b_s34b_b88k``) or a checkpoint file;
            unset = random initialisation (a tower trained from scratch, as RILS's).
        path: a local checkpoint file (full CLIP state dict) loaded after creation.
        max_length: the context length. A randomly initialised tower (no ``pretrained``, no ``path``) is
            built with it (default the architecture's own, 77 for CLIP); a tower with weights takes only its
            own, so a different value is an error.
        locked: freeze the encoder; default ``False``.
        normalize: L2-normalise the embeddings; default ``False``.
        model_cfg: instead of ``model``, an OpenCLIP model config (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ...) for a custom architecture, built with ``open_clip.model.CLIP`` (or
            ``CustomTextCLIP`` when ``custom_text=True`` is in it).
        **kwargs: forwarded to ``open_clip.create_model`` (or the model constructor).

    Returns:
        The encoder.
    """
    import open_clip

    check_loader_kwargs(kwargs, "open_clip text encoder kwargs")
    if pretrained is True:
        raise ValueError("open_clip text encoder: pretrained must be a tag such as 'openai' or a checkpoint file")
    tag = pretrained if isinstance(pretrained, str) and pretrained else None
    if tag is not None and tag.lower() in ("false", "none", "0", "no"):
        tag = None
    if tag is not None and (looks_like_path(tag) or Path(tag).expanduser().exists()):
        if path is not None:
            raise ValueError(f"open_clip text encoder: give the checkpoint once (pretrained={tag!r}, path={path!r})")
        path, tag = tag, None
    if path is not None and not Path(os.fspath(path)).expanduser().is_file():
        raise FileNotFoundError(f"open_clip text encoder checkpoint not found: {Path(os.fspath(path)).expanduser()}")

    # a randomly initialised tower (no weights to load) is built with the context length asked for
    context = int(max_length) if max_length is not None and tag is None and path is None else None
    if model is not None and model_cfg is None and context is not None and _carries_weights(model):
        context = None
    if model_cfg is not None:
        if tag is not None:
            raise ValueError("open_clip text encoder: a pretrained tag needs a model name, not model_cfg")
        from open_clip.model import CLIP, CustomTextCLIP

        cfg = {**model_cfg, **kwargs}
        if context is not None:
            cfg["text_cfg"] = {**_as_dict(cfg.get("text_cfg")), "context_length": context}
        cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
        clip = cls(**cfg)
        tokenizer = _tokenizer_from_cfg(_as_dict(cfg.get("text_cfg")), int(clip.context_length))
        label = "open_clip custom"
    elif model is not None:
        if context is not None:
            kwargs = {**kwargs, "force_context_length": context}
        clip = open_clip.create_model(model, pretrained=tag, **kwargs)
        tokenizer = open_clip.get_tokenizer(model, context_length=context)
        fresh = tag is None and path is None and not _carries_weights(model)
        label = f"open_clip {model}" + (f" ({tag})" if tag else " (random init)" if fresh else "")
    else:
        raise ValueError("open_clip text encoder: give model= (an OpenCLIP architecture name) or model_cfg=")
    _strip_non_text(clip)
    if path is not None:
        load_open_clip_text_weights(clip, path)
        label += f" from {os.fspath(path)}"
    enc = OpenCLIPTextEncoder(clip, tokenizer, name=label, normalize=parse_flag(normalize, False))
    if max_length is not None and int(max_length) != enc.max_length:
        raise ValueError(
            f"open_clip text encoder: {label} takes a context of exactly {enc.max_length} tokens (fixed by its "
            f"weights or its model directory); max_length={max_length} does not fit (leave it unset: the tower's own)"
        )
    if parse_flag(locked, False):
        enc.lock()
    return enc
