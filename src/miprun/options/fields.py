"""The engine of the option dataclasses: fields that carry their CLI flags, help and bounds, checked when built.

Each field made by :func:`opt` carries its help text, command-line flags and bounds as metadata: the CLI builds
its options from these fields (:mod:`miprun.cli.params`), so a default, a description and a check live in one
place. Values are checked when an options object is built, before any work, with errors that name the option
both ways (``num_blocks (--num-blocks)``). The option classes themselves live beside this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import field
from typing import Any, Literal, TypeVar

from miprun.errors import InvalidOptionError, InvalidTypeError

T = TypeVar("T")


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *extra_flags: str,
    factory: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    cli: bool = True,
    parse: Any = None,
    flags: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with its CLI flags, help and bounds (``min``/``max`` inclusive, ``above``/``below`` not).

    ``parse`` turns the command line's value into the field's (e.g. ``KEY=VALUE`` items into a dict).
    """
    meta = {
        "help": help,
        "flags": flags or extra_flags,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
    }
    meta |= {"cli": cli, "parse": parse}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(f: dataclasses.Field) -> str:
    """The long command-line flag of a field (``--num-blocks``), for messages."""
    flags = [x for x in f.metadata.get("flags", ()) if x.startswith("--")]
    return flags[0].split("/")[0] if flags else "--" + f.name.replace("_", "-")


class Options:
    """Base of the option groups: checks every field's type and bounds when the object is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(f, getattr(self, f.name), hints[f.name])
        self.check()

    def validate(self) -> None:
        """Check every field again, nested groups included: for an object changed after it was built."""
        for _, group in groups(self):
            group.validate()
        self.__post_init__()

    def check(self) -> None:
        """Checks across fields; subclasses extend it."""


def _allowed(tp: Any) -> tuple[type, ...]:
    """The runtime types a field annotation admits (``int | None`` -> ``(int, NoneType)``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return tuple(t for arg in typing.get_args(tp) for t in _allowed(arg))
    if origin is not None:
        return (origin,)
    if tp is Any:
        return (object,)
    return (tp,) if isinstance(tp, type) else (object,)


def _check_field(f: dataclasses.Field, value: Any, tp: Any) -> None:
    name = f"{f.name} ({flag(f)})"
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise InvalidOptionError(
                f"{name} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}"
            )
        return
    allowed = _allowed(tp)
    if value is None and type(None) in allowed:
        return
    is_bool = isinstance(value, bool)
    ok = any(
        (t is int and isinstance(value, int) and not is_bool)
        or (t is float and isinstance(value, (int, float)) and not is_bool)
        or (t not in (int, float) and isinstance(value, t))
        for t in allowed
    )
    if not ok:
        names = sorted({getattr(t, "__name__", str(t)) for t in allowed if t is not type(None)})
        want = " or ".join(names) + (" (or None)" if type(None) in allowed else "")
        raise InvalidTypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if isinstance(value, (int, float)) and not is_bool:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
        meta = f.metadata
        bounds = [
            (meta.get("min"), lambda v, b: v >= b, "at least"),
            (meta.get("max"), lambda v, b: v <= b, "at most"),
            (meta.get("above"), lambda v, b: v > b, "greater than"),
            (meta.get("below"), lambda v, b: v < b, "less than"),
        ]
        for bound, holds, words in bounds:
            if bound is not None and not holds(value, bound):
                shown = bound if isinstance(bound, int) else f"{bound:g}"
                raise InvalidOptionError(f"{name} must be {words} {shown}, got {value!r}{_hint(meta)}")


def _hint(meta: Any) -> str:
    text = meta.get("help", "")
    return f" ({text[0].lower() + text[1:].rstrip('.')})" if text else ""


def groups(obj: Any) -> list[tuple[str, Any]]:
    """``(field name, value)`` of the nested option groups of an options object."""
    return [
        (f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if _is_group(getattr(obj, f.name))
    ]


def _is_group(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and isinstance(value, Options)


def flat_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Every leaf field of an options class and its nested groups: flat name -> (path of groups, field)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Options) and dataclasses.is_dataclass(tp):
            for name, (path, leaf) in flat_fields(tp).items():
                _add_unique(out, name, ((f.name, *path), leaf), cls)
        else:
            _add_unique(out, f.name, ((), f), cls)
    return out


def _add_unique(out: dict, name: str, entry: Any, cls: type) -> None:
    if name in out:
        raise TypeError(f"{cls.__name__}: option {name!r} is defined twice in its groups")
    out[name] = entry


def with_overrides(options: T, **flat: Any) -> T:
    """A copy of ``options`` with fields replaced by flat name (``samples=8`` reaches the calibration group).

    A whole group can be replaced by its own name (``calibration=CalibrationConfig(...)``).
    """
    if not flat:
        if isinstance(options, Options):
            options.validate()  # an object changed after it was built (``opts.calibration.samples = 0``)
        return options
    leaves = flat_fields(type(options))
    group_names = {name for name, _ in groups(options)}
    _refuse_unknown(type(options), [k for k in flat if k not in leaves and k not in group_names])
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        path = () if name in group_names else leaves[name][0]
        if path:
            nested.setdefault(path[0], {})[name] = value
        else:
            changes[name] = value
    for group, sub in nested.items():
        changes[group] = with_overrides(changes.get(group, getattr(options, group)), **sub)
    return dataclasses.replace(options, **changes)  # type: ignore[type-var]


def _refuse_unknown(cls: type, unknown: list[str]) -> None:
    """An :class:`InvalidOptionError` for the first of ``unknown`` option names, with a "did you mean"."""
    if not unknown:
        return
    known = sorted({*flat_fields(cls), *(f.name for f in dataclasses.fields(cls))})
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InvalidOptionError(
        f"unknown option {unknown[0]!r} for {cls.__name__}.{hint} Options: {', '.join(known)}"
    )


def accept_flat_names(cls: type) -> None:
    """Let ``cls(...)`` take the flat names of its nested groups' fields, as :func:`with_overrides` does:
    ``PruneOptions(num_blocks=6, repair="linear", samples=8)``; an unknown name is an InvalidOptionError."""
    init: Any = cls.__init__  # type: ignore[misc]
    own = {f.name for f in dataclasses.fields(cls)}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name not in own}
        if flat:
            leaves = flat_fields(cls)
            _refuse_unknown(cls, [name for name in flat if name not in leaves])
            nested: dict[str, dict[str, Any]] = {}
            for name, value in flat.items():
                nested.setdefault(leaves[name][0][0], {})[name] = value
            defaults = {f.name: f for f in dataclasses.fields(cls)}
            for group, sub in nested.items():
                base = kwargs[group] if group in kwargs else defaults[group].default_factory()  # type: ignore[misc,operator]
                kwargs[group] = with_overrides(base, **sub)
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
