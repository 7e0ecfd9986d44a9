"""semmim: masked image pretraining with semantic targets.

One framework for MAE, MILAN, MaskDistill, RILS and supervised + MIM: a method composes a masker,
an encoder, a decoder, a target and a loss, each swappable through a registry (``semmim list``).

Examples:
    >>> import semmim
    >>> cfg = semmim.load_config("configs/demo/mae.yaml", ["trainer.max_steps=3"])  # doctest: +SKIP
    >>> semmim.pretrain(cfg, "runs/mae")  # doctest: +SKIP
"""

from semmim import (  # noqa: F401  (registration)
    data,
    losses,
    masking,
    models,
    targets,
    teachers,
)
from semmim.config import Config, ConfigError, load_config
from semmim.engine import pretrain
from semmim.export import load_timm_model
from semmim.methods import build_method

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "__version__",
    "build_method",
    "load_config",
    "load_timm_model",
    "pretrain",
]
