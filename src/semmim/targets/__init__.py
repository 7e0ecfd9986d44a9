"""Targets: what the model reconstructs (pixels, teacher features)."""

from semmim.targets.features import TeacherFeatureTarget
from semmim.targets.pixels import PixelTarget, normalize_patches, patchify, unpatchify

__all__ = ["PixelTarget", "TeacherFeatureTarget", "normalize_patches", "patchify", "unpatchify"]
