"""Evaluation recipes: each paper's fine-tuning and linear-probe settings, shipped as YAML presets.

A recipe is a YAML file of protocol keys in ``semmim/configs/eval/<protocol>/<name>.yaml`` (one per
paper, each number with its source in a comment). :func:`semmim.eval.config.load_eval_config` merges it
under everything else: the protocol's defaults, then the recipe, then the ``--config`` file, the flags
and the ``key=value`` overrides, so an explicit setting always wins over the recipe. The recipe
``default`` has no file: it is the protocol's own defaults (MAE's hyperparameters at a batch that fits
a small machine, the linear probe on cached centre-crop features, no random erasing).

Only ``finetune`` and ``linear`` have recipes.

Examples:
    >>> recipe_names("linear")
    ('default', 'mae', 'milan')
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from semmim.config import configs_dir, read_config_file
from semmim.errors import ConfigError
from semmim.parts import merge_checked

__all__ = [
    "DEFAULT_RECIPE",
    "NO_RECIPE",
    "RECIPE_KEY",
    "RECIPE_PROTOCOLS",
    "check_recipe",
    "recipe_names",
    "recipe_overrides",
    "recipe_path",
    "recipe_raw",
    "recipe_values",
    "recipes_dir",
]

RECIPE_KEY = "recipe"
"""The config key naming a protocol's recipe."""

DEFAULT_RECIPE = "default"
"""The recipe of the protocol's own defaults (no file)."""

RECIPE_PROTOCOLS = ("finetune", "linear")
"""Protocols with recipes."""

NO_RECIPE: dict[tuple[str, str], str] = {
    ("linear", "maskdistill"): "MaskDistill (Peng et al. 2022, arXiv:2210.10615) publishes no linear-probe protocol, "
    "only fine-tuning and segmentation",
}
"""(protocol, recipe name) pairs a user may expect but no paper defines, with the reason."""


def recipes_dir(protocol: str) -> Path:
    """The folder of ``protocol``'s recipe files (``semmim/configs/eval/<protocol>``)."""
    return configs_dir() / "eval" / protocol


def recipe_names(protocol: str) -> tuple[str, ...]:
    """``default`` and the shipped recipes of ``protocol`` (empty for a protocol without recipes)."""
    if protocol not in RECIPE_PROTOCOLS:
        return ()
    root = recipes_dir(protocol)
    shipped = sorted(p.stem for p in root.glob("*.yaml")) if root.is_dir() else []
    return (DEFAULT_RECIPE, *shipped)


def recipe_path(protocol: str, name: str) -> Path | None:
    """The file of recipe ``name`` (None for ``default``).

    Raises:
        ConfigError: ``protocol`` has no recipe ``name`` (the message lists the ones it has).
    """
    names = recipe_names(protocol)
    if name not in names:
        why = NO_RECIPE.get((protocol, name))
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close and not why else ""
        raise ConfigError(
            f"{protocol} has no recipe '{name}'{f' ({why})' if why else ''}: choose one of {', '.join(names)}.{hint}"
        )
    return None if name == DEFAULT_RECIPE else recipes_dir(protocol) / f"{name}.yaml"


def recipe_raw(protocol: str, name: str) -> dict[str, Any]:
    """The keys recipe ``name`` sets (``{}`` for ``default``), as written in its file.

    Raises:
        ConfigError: an unknown recipe, or a file that names another recipe than its own.
    """
    path = recipe_path(protocol, name)
    if path is None:
        return {}
    raw = read_config_file(path)
    if raw.get(RECIPE_KEY) != name:
        raise ConfigError(f"{path}: a recipe file must set {RECIPE_KEY}: {name}, got {raw.get(RECIPE_KEY)!r}")
    return raw


def recipe_values(cls: type, protocol: str, name: str) -> Any:
    """The config of class ``cls`` that recipe ``name`` gives with nothing overridden (typed)."""
    merged = merge_checked(OmegaConf.structured(cls), recipe_raw(protocol, name), f"{protocol} recipe '{name}'")
    return OmegaConf.to_object(merged)


def recipe_overrides(cfg: Any, protocol: str) -> dict[str, Any]:
    """The keys of ``cfg`` whose values depart from its recipe's (``{key: value in cfg}``), sorted.

    Keys of what an evaluation is measured on (``data``, ``root``, the limits) and plumbing keys are
    included too; :func:`semmim.eval.config.provenance` leaves them out of what it records.
    """
    name = getattr(cfg, RECIPE_KEY, DEFAULT_RECIPE)
    base = recipe_values(type(cfg), protocol, name)
    return {
        f.name: getattr(cfg, f.name)
        for f in sorted(fields(cfg), key=lambda f: f.name)
        if getattr(cfg, f.name) != getattr(base, f.name)
    }


def check_recipe(cfg: Any, protocol: str) -> None:
    """Refuse an unknown recipe, and a recipe that is only a label.

    A config built by hand (``FinetuneConfig(recipe="milan")``) keeps the class defaults: if none of the
    values that set the recipe apart from the defaults is in ``cfg``, the recipe is not in effect and
    the evaluation would silently run another recipe. (Load it with
    ``load_eval_config(protocol, recipe=name)``; explicit overrides on top of it stay allowed.)

    Raises:
        ConfigError: one line naming the recipe and what to do.
    """
    name = getattr(cfg, RECIPE_KEY, DEFAULT_RECIPE)
    recipe_path(protocol, name)
    if name == DEFAULT_RECIPE:
        return
    cls = type(cfg)
    preset, defaults = recipe_values(cls, protocol, name), cls()
    own = [f.name for f in fields(cls) if getattr(preset, f.name) != getattr(defaults, f.name) and f.name != RECIPE_KEY]
    if own and all(getattr(cfg, k) != getattr(preset, k) for k in own):
        shown = ", ".join(f"{k}={getattr(preset, k)}" for k in own)
        raise ConfigError(
            f"recipe '{name}' is not in effect: none of its own values ({shown}) is set; load the config with "
            f"load_eval_config('{protocol}', recipe='{name}') (a config built by hand keeps the defaults), or drop "
            f"{RECIPE_KEY}={name} if every one of them is overridden on purpose"
        )
