"""Methods: compositions of masker, encoder, decoder, target and loss."""

from __future__ import annotations

from typing import Any

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


def method_class(cfg: Config) -> type[Method]:
    """The class of the method ``cfg.method.name`` (its hooks, e.g. :meth:`Method.data_context`)."""
    return METHODS.get(cfg.method.name)  # type: ignore[no-any-return]


def build_method(cfg: Config, teacher: nn.Module | None = None, **context: Any) -> Method:
    """Build the method ``cfg.method.name`` from a config (a Python teacher overrides ``cfg.teacher``).

    ``context``: build-time values derived from the training data by :meth:`Method.data_context`
    (e.g. ``num_classes`` of supmim), passed on to the method's ``from_config``.
    """
    method_cls = method_class(cfg)
    method = method_cls.from_config(cfg, teacher=teacher, **context)
    method.num_masks = int(getattr(cfg.method, "num_masks", 1))
    return method


__all__ = ["CLIP", "MAE", "MILAN", "RILS", "MaskDistill", "Method", "SupervisedMIM", "build_method", "method_class"]
