"""The text-encoder interface: a list of strings in, one sentence embedding per string out.

Semantic MIM and CLIP-style alignment need text embeddings: class-name prompts for zero-shot targets,
captions for image-text alignment. A :class:`TextEncoder` owns its tokenizer, so callers pass plain
strings::

    enc = build_text_encoder("minilm", locked=True)
    emb = enc(["a photo of a dog.", "a photo of a cat."])  # (2, 384) float32

Subclasses implement :meth:`TextEncoder.tokenize` (strings -> CPU tensors) and
:meth:`TextEncoder.embed` (tokens on the module's device -> (N, D) embeddings); the base class handles
device placement, locking (a frozen encoder, like a frozen teacher), optional L2 normalisation,
batched inference (:meth:`TextEncoder.encode`) and inference whose result for a text does not depend on
the other texts encoded with it (:meth:`TextEncoder.encode_each`, for caches of locked towers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.registry import TEXT_ENCODERS
from semmim.teachers.base import looks_like_path

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "EACH_ROWS",
    "TextEncoder",
    "TextInput",
    "build_text_encoder",
    "looks_like_path",
    "open_clip_context_length",
    "parse_flag",
]

DEFAULT_TEXT_ENCODER = "minilm"
"""Name of the text encoder used when a config names none (offline all-MiniLM-L6-v2, D = 384)."""

EACH_ROWS = 32
"""Texts per forward pass of :meth:`TextEncoder.encode_each` (a chunk is always this many rows)."""

EACH_MIN_TOKENS = 16
"""Shortest padded length of :meth:`TextEncoder.encode_each` (lengths are 16, 32, 64, ... up to max_length)."""

TextInput = str | Sequence[str] | Mapping[str, Tensor]
"""What :meth:`TextEncoder.forward` accepts: strings, or the output of :meth:`TextEncoder.tokenize`."""


def parse_flag(value: bool | str | int | None, default: bool) -> bool:
    """Read a boolean option that may come from a config as a string (``"false"``, ``"0"``, ``"no"``)."""
    if value is None:
        return default
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


class TextEncoder(nn.Module):
    """Base class of sentence encoders: ``list[str]`` -> (N, D) float32 embeddings.

    Embeddings are *not* L2-normalised unless ``normalize=True`` (cosine-similarity users normalise
    themselves). Gradients flow into the parameters unless the encoder is :meth:`lock`-ed.

    Subclasses call ``super().__init__(...)`` first, set their modules, and implement :meth:`tokenize`
    and :meth:`embed`.

    Args:
        embed_dim: width D of the returned embeddings.
        max_length: the most tokens per text (longer texts are truncated).
        name: short description of the model and its source, for :meth:`describe`.
        normalize: L2-normalise the embeddings.

    Attributes:
        embed_dim: output width D.
        max_length: token budget L per text.
        locked: whether :meth:`lock` froze the encoder.
    """

    def __init__(self, embed_dim: int, max_length: int, name: str = "", normalize: bool = False) -> None:
        super().__init__()
        if int(embed_dim) <= 0 or int(max_length) <= 0:
            raise ValueError(f"embed_dim and max_length must be positive, got {embed_dim} and {max_length}")
        self.embed_dim = int(embed_dim)
        self.max_length = int(max_length)
        self.name = name or type(self).__name__
        self.normalize = bool(normalize)
        self.locked = False

    # -- subclass hooks -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize texts into padded CPU tensors.

        Args:
            texts: N strings.

        Returns:
            A dict of CPU tensors of shape (N, L), e.g. ``input_ids`` and ``attention_mask``.
        """
        raise NotImplementedError

    def token_counts(self, texts: Sequence[str]) -> list[int] | None:
        """Subclass hook: tokens of each text after truncation, or ``None`` when :meth:`tokenize` always gives
        :attr:`max_length` tokens (a fixed context, as CLIP's). An encoder that pads to the longest text
        implements this and :meth:`tokenize_padded`, for :meth:`encode_each`.
        """
        return None

    def tokenize_padded(self, texts: Sequence[str], length: int) -> dict[str, Tensor]:
        """Subclass hook: like :meth:`tokenize`, but padded to exactly ``length`` tokens (each text has at most
        that many, see :meth:`token_counts`). The default is :meth:`tokenize` (a fixed context)."""
        return self.tokenize(texts)

    def embed(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Subclass hook: sentence embeddings for tokens already on the module's device.

        Args:
            tokens: the output of :meth:`tokenize`, tensors of shape (N, L).

        Returns:
            (N, D) embeddings (any float dtype; the caller casts to float32).
        """
        raise NotImplementedError

    # -- state --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the encoder's first parameter (or buffer); CPU for an empty module."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def lock(self) -> TextEncoder:
        """Freeze the encoder for good: no gradients, eval mode under ``.train()``, forward under no_grad.

        Returns:
            ``self``, so ``enc = build(...).lock()`` works.
        """
        self.requires_grad_(False)
        self.locked = True
        self.eval()
        return self

    def train(self, mode: bool = True) -> TextEncoder:
        """Set training mode; a locked encoder stays in eval mode (dropout off) whatever ``mode``."""
        return super().train(mode and not self.locked)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, texts: TextInput) -> Tensor:
        """Embed texts.

        Args:
            texts: a string, N strings (tokenized here), or the dict returned by :meth:`tokenize` with
                tensors of shape (N, L). Tokens are moved to the module's device.

        Returns:
            (N, D) float32 sentence embeddings on the module's device (L2-normalised only when the
            encoder was built with ``normalize=True``). Without grad when the encoder is locked.
        """
        if isinstance(texts, Mapping):
            tokens: Mapping[str, Tensor] = texts
        else:
            tokens = self.tokenize([texts] if isinstance(texts, str) else list(texts))
        device = self.device
        tokens = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in tokens.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked):
            out = self.embed(tokens).float()
            if out.dim() != 2 or out.shape[1] != self.embed_dim:
                raise RuntimeError(
                    f"{self.name}: embed() returned shape {tuple(out.shape)}, expected (N, {self.embed_dim})"
                )
            if self.normalize:
                out = F.normalize(out, dim=-1)
        return out

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], batch_size: int = 256) -> Tensor:
        """Embed many texts in eval mode, in batches, without gradients.

        The training mode is restored afterwards.

        Args:
            texts: a string or N strings.
            batch_size: texts per forward pass.

        Returns:
            (N, D) float32 embeddings on the CPU.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        items = [texts] if isinstance(texts, str) else list(texts)
        was_training = self.training
        self.eval()
        try:
            chunks = [self(items[i : i + batch_size]).cpu() for i in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.embed_dim, dtype=torch.float32)
        return torch.cat(chunks, dim=0)

    @torch.no_grad()
    def encode_each(self, texts: Sequence[str]) -> Tensor:
        """Embed texts in eval mode, without gradients, so that a text's embedding depends on that text only.

        Batched inference is not exact: padding to the longest text of a batch and the batch's size change
        the last bits of every row. Here every forward pass has a shape fixed by the text alone: texts are
        padded to the first of 16, 32, 64, ... (capped at :attr:`max_length`) that holds them, and texts of
        one padded length go through in chunks of exactly :data:`EACH_ROWS` rows (the last chunk filled up
        with copies). A caption cached by a locked tower therefore gets the same numbers whichever captions
        were new in the same step (a resumed run equals the uninterrupted one). Encoders that pad otherwise
        and say nothing of their token counts are run one text at a time.

        Args:
            texts: N strings.

        Returns:
            (N, D) float32 embeddings on the CPU.
        """
        items = list(texts)
        out = torch.empty(len(items), self.embed_dim, dtype=torch.float32)
        if not items:
            return out
        counts = self.token_counts(items)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(counts if counts is not None else [self.max_length] * len(items)):
            length = EACH_MIN_TOKENS
            while length < n:
                length *= 2
            groups.setdefault(min(length, self.max_length), []).append(i)
        was_training = self.training
        self.eval()
        try:
            for length, rows in groups.items():
                for start in range(0, len(rows), EACH_ROWS):
                    part = rows[start : start + EACH_ROWS]
                    chunk = [items[i] for i in part] + [items[part[0]]] * (EACH_ROWS - len(part))
                    tokens = self.tokenize_padded(chunk, length)
                    if any(v.dim() < 2 or v.shape[1] != length for v in tokens.values()):  # pads otherwise
                        for i in part:
                            out[i] = self(self.tokenize([items[i]]))[0].cpu()
                        continue
                    out[part] = self(tokens)[: len(part)].cpu()
        finally:
            self.train(was_training)
        return out

    def describe(self) -> str:
        """One line naming the model, its output width, token budget and state."""
        flags = [f"D={self.embed_dim}", f"max_length={self.max_length}"]
        if self.normalize:
            flags.append("L2-normalised")
        flags.append("locked" if self.locked else "trainable")
        return f"{self.name} ({', '.join(flags)})"

    def extra_repr(self) -> str:
        return self.describe()


def build_text_encoder(name: str = DEFAULT_TEXT_ENCODER, **kwargs: Any) -> TextEncoder:
    """Build a registered text encoder by name (``None`` kwargs are dropped, as in the registry).

    Args:
        name: a name in :data:`semmim.registry.TEXT_ENCODERS` (``minilm``, ``hf``, ``open_clip``, ...).
        **kwargs: forwarded to the factory (``model``, ``pretrained``, ``path``, ``max_length``,
            ``locked``, ``normalize``, ...).

    Returns:
        The encoder.
    """
    enc = TEXT_ENCODERS.build(name, **kwargs)
    if not isinstance(enc, TextEncoder):
        raise TypeError(f"text encoder '{name}' built a {type(enc).__name__}, not a semmim TextEncoder")
    return enc


def open_clip_context_length(model: str | None) -> int | None:
    """The context length of an OpenCLIP architecture from its config alone (no model built, no network):
    a built-in name or ``local-dir:DIR``; ``None`` when it cannot be told this way (``hf-hub:``, unknown)."""
    if not model or model.startswith("hf-hub:"):
        return None
    try:
        import open_clip

        cfg = open_clip.get_model_config(model)
    except (OSError, ValueError, ImportError):
        return None
    if not isinstance(cfg, Mapping):
        return None
    text_cfg = cfg.get("text_cfg")
    if text_cfg is None:
        text_cfg = {}
    text = dict(text_cfg) if isinstance(text_cfg, Mapping) else dict(vars(text_cfg))
    return int(text.get("context_length", 77))
