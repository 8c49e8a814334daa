"""One small registry for everything chosen by name: estimators, methods, repairs, statistics, tasks.

A miss says "did you mean" and lists what exists, so a typo on the command line teaches the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from miprun.errors import InvalidOptionError, InvalidTypeError, UnknownNameError

T = TypeVar("T")


def import_plugins(package: str, path: list[str]) -> None:
    """Import every module of a plugin package (not its sub-packages), so a plugin file registers itself with
    no import line of its own; the package imports its built-in plugins first, which keeps their order."""
    for module in pkgutil.iter_modules(path):
        if not module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


class Registry(Generic[T]):
    """Named entries of one kind; ``registry[name]`` or :meth:`get` raises a helpful error on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (a name can be registered once)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, entry: T) -> T:
        """Register a plugin class under its own ``name`` attribute, so the name is written once, in the class.

        Returns ``entry``, so it also serves as a class decorator (``@REGISTRY.register``).
        """
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{entry!r} has no `name` string to register it as a {self.kind} under; "
                "give the class a `name` class attribute, or use add(name, entry)"
            )
        return self.add(name, entry)

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its entry (a notebook cell run again, a test undoing what it added)."""
        if name not in self._entries:
            raise UnknownNameError(self.miss(name))
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry called ``name``; a miss suggests the closest name and lists all of them."""
        if not isinstance(name, str):
            raise UnknownNameError(f"{self.kind} names are strings, got {name!r} ({type(name).__name__})")
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.miss(name)) from None

    def miss(self, name: str) -> str:
        """The message for an unknown ``name``."""
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}."

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def build(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """An instance of the dataclass registered as ``name``, with typed ``params`` (see :func:`construct`)."""
        return construct(self.get(name), params or {}, f"{self.kind} {name!r}")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- typed parameters

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def construct(cls: type[T], params: Mapping[str, Any], what: str) -> T:
    """``cls(**params)`` for a dataclass of hyperparameters, each value typed by its field.

    Strings (from ``--est-opt KEY=VALUE``) are parsed by the field's type: booleans accept
    true/false/yes/no/on/off/1/0 and nothing else, numbers must parse exactly. A wrong key suggests the
    closest and lists every key with its type and default.
    """
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in params.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(
                f"{k} ({_type_name(hints[k])}, default {f.default!r})" for k, f in known.items()
            )
            raise InvalidOptionError(
                f"{what} has no parameter {key!r}.{hint} Parameters: {listing or 'none'}"
            )
        kwargs[key] = _coerce(raw, hints[key], f"{what} parameter {key!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a value its own checks refuse: say whose parameter it is
        raise InvalidOptionError(f"{what}: {err}") from err


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(raw: Any, tp: Any, what: str) -> Any:
    """``raw`` as a value of annotation ``tp`` (bool, int, float, str, a ``Literal``, or ``X | None``)."""
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise InvalidOptionError(f"{what} must be one of {', '.join(map(repr, choices))}, got {raw!r}")
        return raw
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if isinstance(raw, str):
        text = raw.strip()
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            if base is bool:
                if text.lower() in _TRUE | _FALSE:
                    return text.lower() in _TRUE
                raise ValueError
            if base is int:
                return int(text)
            if base is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
                return value
        except ValueError:
            raise InvalidOptionError(
                f"{what} must be {_type_name(base)}, got {raw!r}"
                + (" (true/false, yes/no, on/off or 1/0)" if base is bool else "")
            ) from None
        if base is str:
            return raw
    if raw is None and optional:
        return None
    ok = (
        (base is bool and isinstance(raw, bool))
        or (base is int and isinstance(raw, int) and not isinstance(raw, bool))
        or (base is float and isinstance(raw, (int, float)) and not isinstance(raw, bool))
        or (base is str and isinstance(raw, str))
    )
    if not ok:
        raise InvalidTypeError(f"{what} must be {_type_name(base)}, got {raw!r} ({type(raw).__name__})")
    return float(raw) if base is float else raw
