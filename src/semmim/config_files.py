"""The shipped ``configs/`` folder: find it, list it and resolve config names against it.

Kept apart from the command line so that library code (the demo, benchmarks) can resolve
``demo/mae``-style names without importing :mod:`semmim.cli`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["configs_dir", "resolve_config", "shipped_configs"]


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (next to ``src/`` in a checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "configs"
    return Path.cwd() / "configs"


def resolve_config(name: str) -> Path:
    """A path, or a shipped config name such as ``demo/mae`` / ``mae/vit_base_p16_in1k.yaml``."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file not found: {name} (also looked in {configs_dir()}; see `semmim list`)")


def shipped_configs() -> list[str]:
    """Every shipped config, as a path relative to :func:`configs_dir`."""
    root = configs_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root.is_dir() else []
