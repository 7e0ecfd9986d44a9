"""Training engine (Lightning Fabric)."""

from semmim.engine.optim import build_adamw, cosine_lr, param_groups
from semmim.engine.trainer import NonFiniteLossError, RunResult, pretrain

__all__ = ["NonFiniteLossError", "RunResult", "build_adamw", "cosine_lr", "param_groups", "pretrain"]
