"""Decorator registries for every swappable part of semmim.

A method is composed of parts (masker, encoder, decoder, target, teacher, loss) that are looked up
by name in these registries, so a config names a part and a user can add one without touching
library code::

    from semmim.registry import LOSSES

    @LOSSES.register("my_loss")
    class MyLoss(torch.nn.Module): ...

``semmim list`` prints the contents of every registry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


# modules whose import registers semmim's built-in parts; loaded on first registry lookup so that
# `import semmim` and `semmim --help` stay fast
BUILTIN_MODULES = (
    "semmim.masking",
    "semmim.models",
    "semmim.targets",
    "semmim.teachers",
    "semmim.losses",
    "semmim.methods",
    "semmim.data",
    "semmim.text",
)
_builtins_loaded = False


def load_builtins() -> None:
    """Import every built-in part so the registries are complete (idempotent)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


class RegistryError(KeyError):
    """An unknown name was looked up; the message lists what is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> object table filled by a decorator.

    Args:
        kind: what the registry holds, used in error messages ("method", "masker", ...).

    Examples:
        >>> R = Registry("thing")
        >>> @R.register("one")
        ... def one() -> int:
        ...     return 1
        >>> R.get("one")()
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str | None = None, *, help: str | None = None) -> Callable[[T], T]:
        """Register the decorated object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register an anonymous {self.kind}; pass a name")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is already registered by {self._items[key]!r}")
            self._items[key] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._help[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        """Look a name up; an unknown name raises :class:`RegistryError` naming the choices."""
        if name not in self._items:
            load_builtins()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} '{name}'. Registered {self.kind}s: {', '.join(self.names())}.{hint}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the registered factory with ``kwargs``, dropping ``None`` values (as timm does)."""
        factory: Any = self.get(name)
        return factory(**{k: v for k, v in kwargs.items() if v is not None})

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._items)

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        load_builtins()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


METHODS: Registry[Any] = Registry("method")
MASKERS: Registry[Any] = Registry("masker")
ENCODERS: Registry[Any] = Registry("encoder")
DECODERS: Registry[Any] = Registry("decoder")
TARGETS: Registry[Any] = Registry("target")
TEACHERS: Registry[Any] = Registry("teacher")
LOSSES: Registry[Any] = Registry("loss")
DATASETS: Registry[Any] = Registry("dataset")
TEXT_ENCODERS: Registry[Any] = Registry("text encoder")

ALL_REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "maskers": MASKERS,
    "encoders": ENCODERS,
    "decoders": DECODERS,
    "targets": TARGETS,
    "teachers": TEACHERS,
    "losses": LOSSES,
    "datasets": DATASETS,
    "text_encoders": TEXT_ENCODERS,
}
