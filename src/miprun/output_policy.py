"""What miprun may write where: ``--out`` never is or holds an input, is not the current folder or a mount
point, and is replaced only when empty or an earlier miprun output holding only the files its manifest lists;
one writer at a time holds ``.NAME.lock`` beside it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from miprun.errors import OutputBusyError, OutputExistsError, OutputNotWritableError, UnsafeOutputError
from miprun.lockfile import LockBusy, SelfDeletingLock

log = logging.getLogger(__name__)

MANIFEST_NAME = "miprun.json"


def is_miprun_output(folder: str | Path, manifest: str = MANIFEST_NAME) -> bool:
    """Whether ``folder`` holds a manifest that miprun wrote, i.e. is a previous output it may replace."""
    from miprun.ownership import read_manifest

    return read_manifest(folder, manifest) is not None


def foreign(out: Path, manifest: str, shown: int = 3) -> str:
    """The files in ``out`` its manifest does not list ("my_eval.txt, b.txt and 2 more"); empty if none."""
    from miprun.ownership import foreign_files

    names = foreign_files(out, manifest) or []
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def resolve_out(out: str | Path) -> Path:
    return Path(out).expanduser().resolve()


def check_apart(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``out`` that holds or lies in an input, holds the current directory, or is a mount point."""
    for given in inputs:
        if not os.path.lexists(given):
            continue  # a hub id or a named corpus, not a local path
        source = resolve_out(given)
        if source == out:
            raise UnsafeOutputError(
                f"--out {out} is the input {source} that this run reads; choose another output folder"
            )
        if out in source.parents:
            raise UnsafeOutputError(
                f"--out {out} contains the input {source} that this run reads; choose an output folder "
                f"apart from the inputs"
            )
        if source in out.parents:
            raise UnsafeOutputError(
                f"--out {out} lies inside the input {source} that this run reads; choose an output folder "
                f"outside it"
            )
    cwd = Path.cwd().resolve()
    if cwd == out or out in cwd.parents:
        raise UnsafeOutputError(
            f"--out {out} is or contains the current directory, and miprun replaces the output folder as a "
            f"whole; pass a new folder such as {cwd / 'pruned'}"
        )
    if os.path.ismount(out):
        raise UnsafeOutputError(
            f"--out {out} is a mount point, which cannot be replaced as a whole; pass a folder inside it, "
            f"such as {out / 'pruned'}"
        )


def check_writable(out: Path) -> None:
    """Refuse when the nearest existing folder above ``out`` is a file or does not allow writing."""
    above = next(p for p in out.parents if os.path.lexists(p))
    if not above.is_dir():
        raise OutputNotWritableError(
            f"cannot create --out {out}: {above} is a file, not a folder; choose another --out"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"cannot write in {above} (no write permission); choose another --out or fix its permissions"
        )


def listing(folder: Path, shown: int = 3) -> str:
    """A few names in ``folder`` for messages ("a.txt, b.txt, c and 12 more"); empty for an empty folder."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_file_output(
    out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path | None] = (), flag: str = "--out"
) -> None:
    """Fail early if a single output file may not be written: a folder, existing without ``overwrite``, or
    one of the files the run reads (``inputs``: the model, its text) or a file inside an input folder.

    The one check of every JSON writer (``score``, ``eval``, ``bench``), so ``--out MODEL/config.json`` never
    replaces a model's own file.
    """
    path = Path(out)
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder; give the path of a file to write")
    _check_file_apart(resolve_out(path), [given for given in inputs if given is not None], flag)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists; pass --overwrite to replace it, or choose another {flag}"
        )
    check_writable(resolve_out(path))


def check_results_file(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse writing a results file over one of the files it was computed from, or into a model folder it
    read (the writers' own last check; the CLI checks the same before any work)."""
    _check_file_apart(resolve_out(out), [given for given in inputs if given is not None])


def _check_file_apart(out: Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output file that is an input file of the run, or lies inside an input folder."""
    for given in inputs:
        if not os.path.lexists(Path(given).expanduser()):
            continue  # a hub id or a named corpus, not a local path
        source = resolve_out(given)
        if source == out:
            raise UnsafeOutputError(
                f"{flag} {out} is the input {source} that this run reads; write the results to another file"
            )
        if source in out.parents:
            raise UnsafeOutputError(
                f"{flag} {out} lies inside the input {source} that this run reads, and would replace or add "
                f"to its files; write the results to a file outside it"
            )


# ----------------------------------------------------------------------------- one writer at a time

# Outputs whose lock this process holds -> the holding thread. Process-wide by nature: a lock file is held
# per process, and a nested write (prune inside a notebook's own locked_output) must see the outer hold.
_HELD: dict[Path, int] = {}


def holding(out: Path) -> bool:
    """Whether this process holds the lock of ``out`` (taken by :func:`locked_output`)."""
    return out in _HELD


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextmanager
def locked_output(out: str | Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` (re-entrant per thread); another writer fails at once, naming us."""
    out = resolve_out(out)
    if _HELD.get(out) == threading.get_ident():
        yield
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot create the folder {out.parent} ({exc.strerror}); choose another --out"
        ) from exc
    lock = SelfDeletingLock(lock_path(out))
    try:
        lock.acquire()
    except LockBusy:
        pid = _lock_holder(lock_path(out))
        who = f"another process (pid {pid})" if pid else "another process"
        raise OutputBusyError(
            f"{who} is writing --out {out} now (it holds {lock_path(out)}); wait for it to finish or "
            f"choose another --out"
        ) from None
    _HELD[out] = threading.get_ident()
    try:
        yield
    finally:
        del _HELD[out]
        lock.release()


def _lock_holder(lock: Path) -> int | None:
    """The pid holding a lock on ``lock``, from /proc/locks (Linux); None where that cannot be told."""
    try:
        st = lock.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = [f[4] for f in map(str.split, lines) if len(f) > 5 and f[5] == inode and f[4].isdigit()]
    return int(pids[0]) if pids and pids[0] != "0" else None
