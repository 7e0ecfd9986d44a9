"""Methods: compositions of masker, encoder, decoder, target and loss."""

from __future__ import annotations

from torch import nn

from semmim.config import Config
from semmim.methods.base import Method, MethodOutput, method_output
from semmim.methods.clip import CLIP
from semmim.methods.mae import MAE
from semmim.methods.maskdistill import MaskDistill
from semmim.methods.milan import MILAN
from semmim.methods.rils import RILS
from semmim.methods.supmim import SupervisedMIM
from semmim.registry import METHODS


def method_class(cfg: Config) -> type[Method]:
    """The registered class of ``cfg.method.name``."""
    cls: type[Method] = METHODS.get(cfg.method.name)
    return cls


def build_method(cfg: Config, teacher: nn.Module | None = None, **context: object) -> Method:
    """Build the method ``cfg.method.name`` from a config (a Python teacher overrides ``cfg.teacher``).

    ``context`` holds what the method learned from the data (``num_classes`` for supmim).
    """
    method = method_class(cfg).from_config(cfg, teacher=teacher, **context)
    method.num_masks = int(cfg.method.num_masks)
    return method


__all__ = [
    "CLIP",
    "MAE",
    "MILAN",
    "RILS",
    "MaskDistill",
    "Method",
    "MethodOutput",
    "SupervisedMIM",
    "build_method",
    "method_class",
    "method_output",
]
