"""Training engine (Lightning Fabric)."""

from semmim.engine.optim import LARS, build_adamw, cosine_lr, layer_decay_groups, param_groups
from semmim.engine.trainer import NonFiniteLossError, PretrainRecipe, RunResult, pretrain

__all__ = [
    "LARS",
    "NonFiniteLossError",
    "PretrainRecipe",
    "RunResult",
    "build_adamw",
    "cosine_lr",
    "layer_decay_groups",
    "param_groups",
    "pretrain",
]
