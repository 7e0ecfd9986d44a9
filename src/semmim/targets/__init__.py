"""Targets: what the model reconstructs (pixels, teacher features, a tokenizer's discrete codes)."""

from semmim.targets.features import TeacherFeatureTarget
from semmim.targets.pixels import PixelTarget, normalize_patches, patchify, unpatchify
from semmim.targets.tokens import CodebookTarget, VQTarget

__all__ = [
    "CodebookTarget",
    "PixelTarget",
    "TeacherFeatureTarget",
    "VQTarget",
    "normalize_patches",
    "patchify",
    "unpatchify",
]
