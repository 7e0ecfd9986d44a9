"""Maskers: which patches the encoder sees. Pure functions plus registered wrappers."""

from semmim.masking.base import MaskOutput, mask_from_bool, mask_from_order, num_visible
from semmim.masking.block import BlockMasker, block_masking
from semmim.masking.random_mask import RandomMasker, random_masking
from semmim.masking.semantic import SemanticMasker, semantic_masking

__all__ = [
    "BlockMasker",
    "MaskOutput",
    "RandomMasker",
    "SemanticMasker",
    "block_masking",
    "mask_from_bool",
    "mask_from_order",
    "num_visible",
    "random_masking",
    "semantic_masking",
]
