"""Checks of the Python API's arguments: a wrong type is an :class:`InvalidTypeError` naming the call and the
argument, before any work, instead of a raw ``TypeError``/``AttributeError`` from deep inside a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miprun.errors import InvalidTypeError


def check_argument(call: str, name: str, value: Any, expected: tuple[type | None, ...], what: str) -> None:
    """Refuse ``value`` unless it is an instance of one of ``expected`` (None: the value None is allowed).

    A bool is accepted only where ``bool`` is expected (``overwrite="no"`` or ``overwrite=1`` are refused).
    """
    if value is None and None in expected:
        return
    types = tuple(t for t in expected if t is not None)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        where = f"{call}(): " if call else ""
        raise InvalidTypeError(f"{where}{name} must be {what}, got {value!r} ({type(value).__name__})")


def check_path_argument(call: str, name: str, value: Any, optional: bool = False) -> None:
    """A path argument: a str or a Path (or None where ``optional``)."""
    expected: tuple[type | None, ...] = (str, Path, None) if optional else (str, Path)
    check_argument(
        call, name, value, expected, "a path (str or pathlib.Path)" + (" or None" if optional else "")
    )


def check_flag_argument(call: str, name: str, value: Any) -> None:
    """A yes/no argument: exactly True or False (a truthy string such as "no" is refused)."""
    check_argument(call, name, value, (bool,), "True or False")
