"""Hugging Face ``transformers`` text models as sentence encoders (mean pooling).

Any encoder-only text model loadable with ``AutoTokenizer`` + ``AutoModel`` (BERT, RoBERTa, MiniLM,
MPNet, E5, ...; for encoder-decoder models such as T5 the encoder is used) gives one embedding per text
as the mean of its last hidden states over the real tokens (``attention_mask == 1``), as
sentence-transformers does (Reimers & Gurevych 2019, "Sentence-BERT", arXiv:1908.10084). Padding
therefore does not change a text's embedding.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from semmim.config import check_loader_kwargs
from semmim.registry import TEXT_ENCODERS
from semmim.text.base import TextEncoder, looks_like_path, parse_flag

__all__ = ["HFTextEncoder", "build_hf_text_encoder", "load_hf_text_model", "mean_pool"]

# beyond this ``tokenizer.model_max_length`` is transformers' "no limit" sentinel (int(1e30))
_NO_LIMIT = 1_000_000


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of token states over the real (unmasked) tokens.

    Args:
        hidden: (N, L, D) token states.
        attention_mask: (N, L) with 1 for real tokens and 0 for padding; ``None`` averages all tokens.

    Returns:
        (N, D) float32 means; an all-padding row gives zeros.
    """
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (N, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def _forward_keys(model: nn.Module) -> set[str] | None:
    """Names of the keyword arguments ``model.forward`` takes; ``None`` when it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class HFTextEncoder(TextEncoder):
    """A Hugging Face text model with its tokenizer; embedding = attention-masked mean of the last layer.

    Args:
        model: a ``transformers`` model returning ``last_hidden_state`` (``AutoModel`` output). For an
            encoder-decoder model the encoder (``get_encoder()``) is kept.
        tokenizer: the matching ``transformers`` tokenizer.
        max_length: most tokens per text, special tokens included; default (and largest allowed) the
            smallest of the tokenizer's ``model_max_length`` and the config's ``max_position_embeddings``
            (512 if neither is known).
        name: model description for :meth:`describe`.
        normalize: L2-normalise the embeddings (sentence-transformers' ``Normalize`` module).

    The encoder starts in eval mode (as ``from_pretrained`` models do); call ``.train()`` to fine-tune it
    with dropout.
    """

    model: Any
    tokenizer: Any

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int | None = None,
        name: str = "hf",
        normalize: bool = False,
    ) -> None:
        net: Any = model
        config = getattr(net, "config", None)
        if getattr(config, "is_encoder_decoder", False) and hasattr(net, "get_encoder"):
            net = net.get_encoder()
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if width is None:
            raise ValueError(f"{name}: cannot tell the hidden size of {type(net).__name__} from its config")
        limit = self._default_max_length(tokenizer, config)
        if max_length is not None and int(max_length) > limit:
            raise ValueError(
                f"{name}: max_length={max_length} is more tokens than the model takes ({limit}); "
                "leave it unset (null) for the model's own limit, or give at most that"
            )
        super().__init__(
            embed_dim=int(width),
            max_length=max_length if max_length is not None else limit,
            name=name,
            normalize=normalize,
        )
        self.model = net
        self.tokenizer = tokenizer
        self._keys = _forward_keys(net)
        self.eval()  # like ``from_pretrained``: dropout off until ``.train()``

    @staticmethod
    def _default_max_length(tokenizer: Any, config: Any) -> int:
        limits = [
            int(v)
            for v in (getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None))
            if isinstance(v, int) and 0 < v < _NO_LIMIT
        ]
        return min(limits) if limits else 512

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize with padding to the longest text and truncation at :attr:`max_length`.

        Args:
            texts: N strings.

        Returns:
            CPU tensors of shape (N, L): ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
            the tokenizer makes them), L <= :attr:`max_length`.
        """
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, special tokens included, after truncation at :attr:`max_length`."""
        ids = self.tokenizer(list(texts), padding=False, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def tokenize_padded(self, texts: Sequence[str], length: int) -> dict[str, Tensor]:
        """As :meth:`tokenize`, padded to exactly ``length`` tokens (``length`` <= :attr:`max_length`)."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def embed(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Mean of the last hidden states over real tokens.

        Args:
            tokens: ``input_ids`` (N, L), ``attention_mask`` (N, L), ... on the module's device.

        Returns:
            (N, D) float32 embeddings.
        """
        inputs = dict(tokens) if self._keys is None else {k: v for k, v in tokens.items() if k in self._keys}
        out = self.model(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(hidden, tokens.get("attention_mask"))


def _sentence_transformers_max_length(directory: Path) -> int | None:
    """``max_seq_length`` from a sentence-transformers ``sentence_bert_config.json``, if there is one."""
    file = directory / "sentence_bert_config.json"
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def load_hf_text_model(source: str | os.PathLike[str], pretrained: bool = True, **kwargs: Any) -> tuple[Any, Any]:
    """Load a text model and its tokenizer from a hub name or a local directory.

    A local directory is read with ``local_files_only=True`` (no network). A hub name is resolved by
    ``transformers`` (set ``HF_HUB_OFFLINE=1`` to use only the local cache).

    Args:
        source: hub name (``sentence-transformers/all-MiniLM-L6-v2``) or a ``save_pretrained`` directory.
        pretrained: ``False`` builds the architecture from its config with random weights.
        **kwargs: forwarded to ``AutoModel.from_pretrained`` (``revision``, ``dtype``, ...).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: ``source`` looks like a path but is not a directory (the message names it).
        OSError: the model could not be loaded (not in the cache while offline, no such hub repo, ...).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    check_loader_kwargs(kwargs, "hf text encoder kwargs")
    name = os.fspath(source)
    local = Path(name).expanduser()
    is_local = local.is_dir()
    if not is_local and (looks_like_path(name) or local.exists()):
        what = "is a file, not a model directory" if local.exists() else "not found"
        raise FileNotFoundError(f"hf text encoder: model directory {what}: {local}")
    src = str(local) if is_local else name
    common: dict[str, Any] = {"local_files_only": True} if is_local else {}
    for key in ("local_files_only", "revision", "cache_dir", "token"):
        if key in kwargs:
            common[key] = kwargs[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **common)
        if pretrained:
            model = AutoModel.from_pretrained(src, **{**common, **kwargs})
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(src, **common))
    except OSError as e:
        hint = "" if is_local else " (not a local directory; is it in the Hugging Face cache when offline?)"
        raise OSError(f"hf text encoder: could not load '{src}'{hint}: {e}") from e
    return model, tokenizer


def make_hf_encoder(
    source: str | os.PathLike[str],
    pretrained: bool,
    max_length: int | None,
    locked: bool,
    normalize: bool,
    name: str,
    **kwargs: Any,
) -> HFTextEncoder:
    model, tokenizer = load_hf_text_model(source, pretrained=pretrained, **kwargs)
    local = Path(os.fspath(source)).expanduser()
    if max_length is None and local.is_dir():
        max_length = _sentence_transformers_max_length(local)
    enc = HFTextEncoder(model, tokenizer, max_length=max_length, name=name, normalize=normalize)
    if locked:
        enc.lock()
    return enc


@TEXT_ENCODERS.register("hf", help="Hugging Face text model (hub name or local dir), masked mean pooling")
def build_hf_text_encoder(
    model: str | None = None,
    pretrained: bool | str | None = None,
    path: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    locked: bool | str | None = None,
    normalize: bool | str | None = None,
    **kwargs: Any,
) -> HFTextEncoder:
    """Build an :class:`HFTextEncoder` from a hub name or a ``save_pretrained`` directory.

    Args:
        model: hub name or local directory.
        pretrained: ``False``/``"false"`` for random weights with the checkpoint's architecture.
        path: a local directory (alternative to ``model``).
        max_length: most tokens per text; default the directory's sentence-transformers
            ``max_seq_length``, else the tokenizer's/model's limit.
        locked: freeze the encoder (:meth:`TextEncoder.lock`); default ``False`` (trainable).
        normalize: L2-normalise the embeddings; default ``False``.
        **kwargs: forwarded to ``AutoModel.from_pretrained`` (``revision``, ``local_files_only``, ...).

    Returns:
        The encoder.
    """
    if model is not None and path is not None and os.fspath(model) != os.fspath(path):
        raise ValueError(f"hf text encoder: give the model once (model={model!r}, path={path!r})")
    source = path if path is not None else model
    if source is None:
        raise ValueError("hf text encoder: give model= (a hub name or a local directory) or path=")
    if path is not None and not Path(os.fspath(path)).expanduser().is_dir():
        raise FileNotFoundError(f"hf text encoder: model directory not found: {Path(os.fspath(path)).expanduser()}")
    return make_hf_encoder(
        source,
        pretrained=parse_flag(pretrained, True),
        max_length=max_length,
        locked=parse_flag(locked, False),
        normalize=parse_flag(normalize, False),
        name=f"hf {os.fspath(source)}",
        **kwargs,
    )
