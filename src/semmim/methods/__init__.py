"""Methods: compositions of masker, encoder, decoder, target and loss."""

from __future__ import annotations

from torch import nn

from semmim.config import Config
from semmim.methods.base import Method
from semmim.methods.clip import CLIP
from semmim.methods.mae import MAE
from semmim.methods.maskdistill import MaskDistill
from semmim.methods.milan import MILAN
from semmim.methods.rils import RILS
from semmim.methods.supmim import SupervisedMIM
from semmim.registry import METHODS


def build_method(cfg: Config, teacher: nn.Module | None = None) -> Method:
    """Build the method ``cfg.method.name`` from a config (a Python teacher overrides ``cfg.teacher``)."""
    method_cls = METHODS.get(cfg.method.name)
    method = method_cls.from_config(cfg, teacher=teacher)
    method.num_masks = int(getattr(cfg.method, "num_masks", 1))
    return method


__all__ = ["CLIP", "MAE", "MILAN", "RILS", "MaskDistill", "Method", "SupervisedMIM", "build_method"]
