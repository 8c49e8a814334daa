"""Parsers of command-line values: ``KEY=VALUE`` items and comma-separated lists."""

from __future__ import annotations

from miprun.errors import InvalidOptionError


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; each value is typed later by what it configures."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidOptionError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def split_list(items: list[str] | None) -> list[str]:
    """Repeatable options that also accept comma-separated values: ``-t a,b -t c`` -> [a, b, c]."""
    return [part.strip() for item in items or [] for part in str(item).split(",") if part.strip()]


def split_ints(items: list[str] | None) -> list[int]:
    """``-n 3 -n 6,9`` -> [3, 6, 9]; a non-integer is an error naming it."""
    out = []
    for part in split_list(items):
        try:
            out.append(int(part))
        except ValueError:
            raise InvalidOptionError(f"expected whole numbers like 3,6,9, got {part!r}") from None
    return out
