"""Opening a run directory: its resolved config, and rebuilding its method and teacher."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from semmim.run.files import CONFIG, ENCODER, ckpt_path

if TYPE_CHECKING:
    import torch
    from torch import nn

    from semmim.config import Config
    from semmim.methods.base import Method


@dataclass
class Run:
    """A run directory opened for reading: its resolved config and how to rebuild its method and teacher.

    Get one with :func:`load_run`. A run trained with a teacher passed from Python (``teacher.name=module``)
    needs that same teacher again: pass it as ``teacher=`` to the builders.
    """

    path: Path
    cfg: Config

    @property
    def ckpt(self) -> Path:
        """``checkpoints/last.ckpt`` (it may not exist: a run that has not saved yet)."""
        return ckpt_path(self.path)

    @property
    def encoder(self) -> Path:
        """``encoder.safetensors`` (written at the end of the run)."""
        return self.path / ENCODER

    def build_teacher(self, teacher: nn.Module | None = None) -> nn.Module | None:
        """The run's teacher as its config names it (``teacher``: the Python one); None when it has none."""
        from semmim.methods.base import build_teacher

        t = self.cfg.teacher
        if teacher is None and (not t.name or t.name == "none"):
            return None
        return build_teacher(self.cfg, teacher)

    def build_method(self, teacher: nn.Module | None = None) -> Method:
        """The run's method with fresh weights, as its config describes it."""
        from semmim.methods import build_method

        return build_method(self.cfg, teacher=teacher)

    def load_method(self, device: torch.device | str = "cpu", teacher: nn.Module | None = None) -> Method:
        """The run's method with the weights of ``last.ckpt`` (strict), one masked view per image, in eval mode.

        Raises:
            FileNotFoundError: the run has no checkpoint.
        """
        from semmim.engine.checkpoint import load_verified

        if not self.ckpt.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.ckpt}")
        method = self.build_method(teacher)
        method.num_masks = 1  # one masked view per shown image, whatever the run trained with
        state = load_verified(self.ckpt, required_keys=("model",))["model"]
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {self.ckpt}: its 'model' entry is a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
        method.load_state_dict(state, strict=True)
        return method.to(device).eval()


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Open the run directory ``run_dir``: its resolved ``config.yaml`` (validated) and helpers to rebuild it.

    Raises:
        FileNotFoundError: ``run_dir`` or its ``config.yaml`` does not exist.
        ConfigError: the config cannot be read or is invalid.
    """
    from semmim.config import load_saved_config

    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {p}")
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"{p} is not a semmim run directory: it has no {CONFIG}")
    return Run(p, load_saved_config(p / CONFIG))
