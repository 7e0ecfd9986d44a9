"""semmim: masked image pretraining with semantic targets.

One framework for MAE, MILAN, MaskDistill, RILS and supervised + MIM: a method composes a masker,
an encoder, a decoder, a target and a loss, each swappable through a registry (``semmim list``).

Examples:
    >>> import semmim
    >>> cfg = semmim.load_config("configs/demo/mae.yaml", ["trainer.max_steps=3"])  # doctest: +SKIP
    >>> semmim.pretrain(cfg, "runs/mae")  # doctest: +SKIP

Heavy submodules (torch models, timm, Lightning) load on first use, so ``import semmim`` is quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Config": "semmim.config",
    "ConfigError": "semmim.config",
    "load_config": "semmim.config",
    "pretrain": "semmim.engine",
    "build_method": "semmim.methods",
    "load_timm_model": "semmim.export",
}

__all__ = ["Config", "ConfigError", "__version__", "build_method", "load_config", "load_timm_model", "pretrain"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semmim' has no attribute '{name}'")
