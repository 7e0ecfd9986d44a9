"""Networks: the ViT encoder and the decoders."""

from semmim.models.decoders import MAEDecoder, PromptingBlock, PromptingDecoder
from semmim.models.pos_embed import sincos_pos_embed_2d
from semmim.models.vit import ViTEncoder

__all__ = ["MAEDecoder", "PromptingBlock", "PromptingDecoder", "ViTEncoder", "sincos_pos_embed_2d"]
