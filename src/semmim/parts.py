"""Config nodes of swappable parts: a part is built by its registry from its own node.

A node is a mapping ``{name: <registered name>, <key>: <value>, ...}``; the keys are the keyword
arguments of the registered factory (its ``__init__`` for a class), typed by its annotations and
documented by its ``Args:`` docstring section. A part registered by a user therefore gets its own
keys from YAML with no library change::

    @MASKERS.register("stripes")
    class StripeMasker:
        def __init__(self, mask_ratio: float = 0.5, width: int = 2) -> None: ...

    # method.masker: {name: stripes, width: 3}

Some arguments come from the method, not from the config (a decoder's ``out_dim`` is the target's
width): they are the *context* of the slot (:data:`SLOT_CONTEXT`), and a node that sets one is an error.

Examples:
    >>> from semmim.registry import LOSSES
    >>> resolve_part(LOSSES, {"name": "smooth_l1"}, "method.loss")
    {'name': 'smooth_l1', 'beta': 2.0}
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from semmim.errors import ConfigError
from semmim.registry import DECODERS, LOSSES, MASKERS, TARGETS, Registry, RegistryError

SLOT_CONTEXT: dict[str, tuple[str, ...]] = {
    "masker": (),
    "decoder": ("grid_size", "encoder_dim", "out_dim"),
    "target": ("patch_size", "img_size", "in_chans", "mean", "std", "teacher", "teacher_cache"),
    "loss": (),
}
"""Arguments of each kind of part that the method supplies (never set in a config node)."""

SLOT_REGISTRY: dict[str, Registry[Any]] = {"masker": MASKERS, "decoder": DECODERS, "target": TARGETS, "loss": LOSSES}
"""The registry each slot's node is looked up in."""

SLOT_KEY: dict[str, str] = {
    "masker": "method.masker",
    "decoder": "decoder",
    "target": "method.target",
    "loss": "method.loss",
}
"""Where each slot's node lives in the run config."""


# ------------------------------------------------------------------ typed merging with key names
def suggest(key: str, names: Collection[str]) -> str:
    """`` Allowed keys here: a, b. Did you mean 'a'?`` for an unknown ``key`` among ``names``."""
    close = difflib.get_close_matches(key.split(".")[-1], list(names), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    allowed = ", ".join(sorted(names)) or "(none)"
    return f" Allowed keys here: {allowed}.{hint}"


def _parent_keys(schema: DictConfig, full_key: str) -> list[str]:
    node: Any = schema
    for part in full_key.split(".")[:-1]:
        try:
            node = node[part]
        except Exception:
            return list(schema.keys())  # type: ignore[arg-type]
    try:
        return [str(k) for k in node]
    except Exception:
        return []


def merge_checked(schema: DictConfig, other: Mapping[str, Any], where: str, prefix: str = "") -> DictConfig:
    """``OmegaConf.merge(schema, other)`` whose errors name the key (``prefix`` + key) and the choices.

    Raises:
        ConfigError: an unknown key (with the allowed keys and a close match) or a value of the wrong type.
    """
    try:
        merged = OmegaConf.merge(schema, other)
        assert isinstance(merged, DictConfig)
        return merged
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        raise ConfigError(
            f"{where}: unknown config key '{prefix}{key}'.{suggest(key, _parent_keys(schema, key))}"
        ) from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", ""))
        raise ConfigError(f"{where}: bad value for '{prefix}{key}': {str(e.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


# ------------------------------------------------------------------ what a factory accepts
@dataclasses.dataclass(frozen=True)
class PartKey:
    """One config key of a part: its name, type, default (``dataclasses.MISSING`` = required) and help."""

    name: str
    type: Any
    default: Any
    help: str


_ARG_LINE = re.compile(r"^\s+([A-Za-z_][\w, ]*?)\s*(?:\([^)]*\))?:\s*(.*)$")


def _args_help(*docs: str | None) -> dict[str, str]:
    """Google-style ``Args:`` entries of docstrings: ``{"mask_ratio": "fraction masked", ...}``."""
    out: dict[str, str] = {}
    for doc in docs:
        if not doc:
            continue
        lines = inspect.cleandoc(doc).splitlines()
        inside = False
        current: list[str] = []
        for line in lines:
            if line.strip() in ("Args:", "Arguments:", "Parameters:"):
                inside = True
                continue
            if inside and line and not line.startswith(" "):
                break
            if not inside:
                continue
            m = _ARG_LINE.match(line)
            if m and len(line) - len(line.lstrip()) <= 4:
                current = [n.strip() for n in m.group(1).split(",")]
                for n in current:
                    out.setdefault(n, m.group(2).strip())
            elif current and line.strip():
                for n in current:
                    out[n] = (out[n] + " " + line.strip()).strip()
    return out


def _omegaconf_type(tp: Any) -> Any:
    """``tp`` if OmegaConf can check it, else ``Any`` (tuples, tensors, modules...)."""
    try:
        probe = dataclasses.make_dataclass("Probe", [("x", tp)])
        OmegaConf.structured(probe)
        return tp
    except Exception:
        return Any


def factory_params(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Named keyword arguments of a registered factory (its ``__init__`` for a class)."""
    fn = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())
    if inspect.isclass(factory) and params and params[0].name == "self":
        params = params[1:]
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def part_keys(registry: Registry[Any], name: str, context: Collection[str] = ()) -> list[PartKey]:
    """The config keys of part ``name`` (its factory's arguments minus the slot's ``context``)."""
    factory = registry.get(name)
    fn = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    helps = _args_help(getattr(factory, "__doc__", None), getattr(fn, "__doc__", None))
    keys = []
    for pname, p in factory_params(factory).items():
        if pname in context:
            continue
        default = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
        tp = _omegaconf_type(hints.get(pname, Any))
        keys.append(PartKey(pname, tp, default, helps.get(pname, "")))
    return keys


def _copier(value: Any) -> Callable[[], Any]:
    import copy

    return lambda: copy.deepcopy(value)


def _schema(registry: Registry[Any], name: str, keys: list[PartKey]) -> DictConfig:
    fields = []
    for k in keys:
        if k.default is dataclasses.MISSING:
            fields.append((k.name, k.type, dataclasses.field()))
        elif isinstance(k.default, list | dict | tuple):
            value = list(k.default) if isinstance(k.default, tuple) else k.default
            fields.append((k.name, Any, dataclasses.field(default_factory=_copier(value))))
        else:
            fields.append((k.name, k.type, dataclasses.field(default=k.default)))
    cls = dataclasses.make_dataclass(f"{registry.kind.title().replace(' ', '')}_{name}", fields)
    conf = OmegaConf.structured(cls)
    assert isinstance(conf, DictConfig)
    return conf


def resolve_part(
    registry: Registry[Any], node: Mapping[str, Any] | str, where: str, context: Collection[str] = ()
) -> dict[str, Any]:
    """Check ``node`` against part ``node["name"]`` and fill in its defaults: ``{"name": ..., **keys}``.

    Args:
        registry: where the part is registered.
        node: ``{name: ..., key: value}`` (a bare string is the name).
        where: the node's config key for messages (``method.masker``).
        context: argument names the method supplies; setting one is an error.

    Raises:
        ConfigError: no name, an unknown name, a key the part does not take (listing those it takes), a
            context key, a value of the wrong type or a required key left out.
    """
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where} must be a part name or a mapping {{name: ..., key: value}}, got {node!r}")
    body = dict(node)
    name = body.pop("name", None)
    if not name:
        raise ConfigError(f"{where}.name is not set: name a registered {registry.kind} ({', '.join(registry.names())})")
    try:
        registry.get(str(name))
    except RegistryError as e:
        hint = " (a part of your own: import its module first, e.g. `semmim pretrain --import my_parts`)"
        raise ConfigError(f"{where}.name: {e}{hint}") from None
    keys = part_keys(registry, str(name), context)
    allowed = [k.name for k in keys]
    for key in body:
        if key in context:
            raise ConfigError(
                f"{where}.{key} is set by the method ({registry.kind} '{name}' receives it from the method): remove it"
            )
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}: {registry.kind} '{name}' has no key '{key}'.{suggest(str(key), allowed)}"
            )
    merged = merge_checked(_schema(registry, str(name), keys), body, where, prefix=f"{where}.")
    try:
        values = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        raise ConfigError(f"{where}.{key} is required by {registry.kind} '{name}': set it") from None
    assert isinstance(values, dict)
    return {"name": str(name), **{str(k): v for k, v in values.items()}}


class Lazy:
    """A context value computed only if the part asks for it (a teacher is built only for a target that takes one)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def _config_error(e: Exception, resolved: Mapping[str, Any], where: str, kind: str, name: str) -> ConfigError:
    named = [k for k in resolved if k != "name" and re.search(rf"\b{re.escape(k)}\b", str(e))]
    at = f"{where}.{named[0]}={resolved[named[0]]!r}" if named else where
    return ConfigError(f"{at} ({kind} '{name}'): {e}")


def check_part(registry: Registry[Any], node: Mapping[str, Any], where: str) -> None:
    """Run the part's own ``check_args(**keys)`` (when it has one) on a resolved node, before anything is built.

    Raises:
        ConfigError: the part refused a value (the message names the key).
    """
    factory = registry.get(node["name"])
    check = getattr(factory, "check_args", None)
    if check is None:
        return
    keys = {k: v for k, v in node.items() if k != "name"}
    try:
        check(**keys)
    except (ValueError, TypeError) as e:
        raise _config_error(e, node, where, registry.kind, node["name"]) from None


def build_part(registry: Registry[Any], node: Mapping[str, Any], where: str, **context: Any) -> Any:
    """Build the part a resolved node describes, passing the context arguments its factory takes.

    Raises:
        ConfigError: the node is invalid (see :func:`resolve_part`) or the factory rejects a value (the
            message names the node).
    """
    resolved = resolve_part(registry, node, where, tuple(context))
    name = resolved.pop("name")
    factory = registry.get(name)
    params = factory_params(factory)
    kwargs = dict(resolved)
    for key, value in context.items():
        if key in params:
            kwargs[key] = value.make() if isinstance(value, Lazy) else value
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise _config_error(e, resolved, where, registry.kind, name) from None


def merge_node(default: Mapping[str, Any] | None, user: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    """A part node ``user`` merged onto the node ``default`` (the method's default, or an earlier file's node).

    No user node: the default. A user node without a name, or naming the default's part: the default
    updated with the user's keys (mappings key by key). A user node naming another part replaces the
    default whole (the keys of one part mean nothing to another). A bare string is ``{name: ...}``.
    """
    if isinstance(user, str):
        user = {"name": user}
    if user is None:
        return None if default is None else dict(default)
    if default is None or (user.get("name") not in (None, default.get("name"))):
        return dict(user)
    return _merge_mappings(default, user)


def _merge_mappings(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in other.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge_mappings(old, value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out
