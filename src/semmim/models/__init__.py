"""Networks: the ViT encoder and the decoders."""

from semmim.models.decoders import LinearHead, MAEDecoder, PromptingBlock, PromptingDecoder
from semmim.models.pos_embed import sincos_pos_embed_2d
from semmim.models.vit import ViTEncoder

__all__ = ["LinearHead", "MAEDecoder", "PromptingBlock", "PromptingDecoder", "ViTEncoder", "sincos_pos_embed_2d"]
