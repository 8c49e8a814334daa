"""Single files written whole or not at all: a temporary file beside the target, flushed, then renamed;
JSON strict (a NaN or an infinity is refused, naming where it was)."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from miprun.errors import (
    NonFiniteJSONError,
)

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, from /proc where possible: ``os.umask`` must set it (process-wide) to read it."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name; moved over ``path`` on success.

    The file is fsynced, gets umask permissions and replaces ``path`` in one rename; any exception (or
    interrupt) removes it and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at ``path`` only when the ``with`` block completes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, and rename it over ``path``: all or nothing."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (no NaN or Infinity, which most parsers reject), atomically."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as exc:
        found = _nonfinite(obj, "") if "Out of range float" in str(exc) else None  # not "Circular reference"
        if found is None:
            raise
        where, value = found
        raise NonFiniteJSONError(
            f"cannot write {path}: the value at {where or 'the top level'} is {value}, and strict JSON has "
            f"no NaN or Infinity; store null or a finite number there"
        ) from exc
    atomic_write_text(path, text + "\n")


def _nonfinite(obj: Any, at: str) -> tuple[str, float] | None:
    """The key path (``scores.table[2].mi``) and value of the first NaN or infinity in ``obj``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at, obj
    items: Iterable[tuple[str, Any]] = ()
    if isinstance(obj, dict):
        items = ((f"{at}.{key}" if at else str(key), value) for key, value in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{at}[{i}]", value) for i, value in enumerate(obj))
    return next((hit for where, value in items if (hit := _nonfinite(value, where))), None)
