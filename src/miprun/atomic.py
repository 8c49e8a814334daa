"""Writing miprun's output safely: single files and whole folders that appear complete or not at all.

A folder is written into ``.NAME.tmp-TOKEN`` beside ``out`` (TOKEN: random, recorded first in the journal
``.NAME.swap``), flushed to disk, then swapped in through that journal, so an interrupt or a crash at any
moment leaves the old output or the new one; :func:`recover` finishes or rolls back whatever a killed run
left, touching only the folders its journal names. ``--overwrite`` replaces only an empty folder or a
previous miprun output holding nothing but the files its manifest lists, and a lock (``.NAME.lock``, deleted
when released) keeps two runs apart.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from miprun.errors import MiprunError, OutputError
from miprun.lockfile import LockBusy, SelfDeletingLock

log = logging.getLogger(__name__)

MANIFEST_NAME = "miprun.json"
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_SIGNALS = (signal.SIGINT, *_TERMINATING)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_HELD: dict[Path, int] = {}  # outputs whose lock this process holds -> the holding thread

# Test hook: called with "journal-written", "old-moved-aside", "new-moving-in" and "swapped" during a swap.
step_hook: Callable[[str], None] | None = None


# ----------------------------------------------------------------------------- errors (one place)


class OutputExistsError(OutputError, FileExistsError):
    """``out`` exists and may not be replaced: no ``--overwrite``, or it is not a miprun output."""


class UnsafeOutputError(MiprunError, ValueError):
    """``out`` overlaps an input or the current directory, or is a mount point."""


class OutputNotWritableError(OutputError):
    """The folder that would hold ``out`` does not allow writing."""


class OutputBusyError(OutputError):
    """Another process (or thread) is writing the same ``out`` now."""


class DiskFullError(OutputError):
    """The disk (or quota) filled up while writing; the previous output is untouched."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NonFiniteJSONError(MiprunError, ValueError):
    """A NaN or infinity was about to be written into a JSON file, which strict JSON cannot hold."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs; ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# ----------------------------------------------------------------------------- single files


def _umask() -> int:
    """The process umask, from /proc where possible: ``os.umask`` must set it (process-wide) to read it."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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


# ----------------------------------------------------------------------------- checks


def is_miprun_output(folder: str | Path, manifest: str = MANIFEST_NAME) -> bool:
    """Whether ``folder`` holds a manifest that miprun wrote, i.e. is a previous output it may replace."""
    from miprun.ownership import read_manifest

    return read_manifest(folder, manifest) is not None


def check_output(
    out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path] = (), manifest: str = MANIFEST_NAME
) -> None:
    """Refuse an ``out`` this run may not write or replace; cheap, so call it before any expensive work.

    A swap an interrupted run left half done is completed first (:func:`recover`), so the verdict is on
    what will really be at ``out``.
    """
    out = _resolve(out)
    _check_apart(out, inputs)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(
            f"--out {out} is an existing file; pass a folder path (new, empty or a previous miprun output)"
        )
    _check_writable(out)
    if out not in _HELD and _pending(out):
        recover(out)  # judge what will really be at ``out``, not a half-done swap (fails if a run is live)
    if out.is_dir() and not overwrite:
        raise OutputExistsError(
            f"--out {out} already exists; pass --overwrite to replace it (only an empty folder or a previous "
            f"miprun output is replaced), or choose another --out"
        )
    if out.is_dir() and (names := _listing(out)) and not is_miprun_output(out, manifest):
        raise OutputExistsError(
            f"--out {out} holds files miprun did not write ({names}) and no {manifest} from a previous "
            f"run, so --overwrite will not replace it; choose a new or empty folder, such as {out / 'pruned'}"
        )
    if out.is_dir() and (added := _foreign(out, manifest)):
        raise OutputExistsError(
            f"--out {out} is an earlier miprun output, but {added} in it is not listed in its {manifest} "
            f"(added since, or not written by miprun), so --overwrite will not replace it; move that away "
            f"or choose another --out"
        )
    if out not in _HELD and _lock_path(out).exists():
        with locked_output(out):  # fails at once if another run is writing there now
            pass


def _foreign(out: Path, manifest: str, shown: int = 3) -> str:
    """The files in ``out`` its manifest does not list ("my_eval.txt, b.txt and 2 more"); empty if none."""
    from miprun.ownership import foreign_files

    names = foreign_files(out, manifest) or []
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _resolve(out: str | Path) -> Path:
    return Path(out).expanduser().resolve()


def _check_apart(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``out`` that holds or lies in an input, holds the current directory, or is a mount point."""
    for given in inputs:
        if not os.path.lexists(given):
            continue  # a hub id or a named corpus, not a local path
        source = _resolve(given)
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


def _check_writable(out: Path) -> None:
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


def _listing(folder: Path, shown: int = 3) -> str:
    """A few names in ``folder`` for messages ("a.txt, b.txt, c and 12 more"); empty for an empty folder."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ----------------------------------------------------------------------------- lock and signals


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextmanager
def locked_output(out: str | Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` (re-entrant per thread); another writer fails at once, naming us."""
    out = _resolve(out)
    if _HELD.get(out) == threading.get_ident():
        yield
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot create the folder {out.parent} ({exc.strerror}); choose another --out"
        ) from exc
    lock = SelfDeletingLock(_lock_path(out))
    try:
        lock.acquire()
    except LockBusy:
        pid = _lock_holder(_lock_path(out))
        who = f"another process (pid {pid})" if pid else "another process"
        raise OutputBusyError(
            f"{who} is writing --out {out} now (it holds {_lock_path(out)}); wait for it to finish or "
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


@contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (``timeout``, Slurm, ``docker stop``) into :class:`Interrupted`, as Ctrl-C.

    Only in the main thread (elsewhere it does nothing); a signal that is ignored (``nohup``) stays ignored.
    """

    def raise_interrupted(signum: int, _frame: object) -> None:
        global last_signal
        last_signal = signum
        raise Interrupted(signum)

    with _replaced_handlers(_TERMINATING, raise_interrupted):
        yield


last_signal: int | None = None  # the last SIGTERM/SIGHUP turned into Interrupted (libraries may catch it)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP over a block and re-deliver them after it: renames are never cut in half.

    Handlers rather than ``pthread_sigmask``: a signal sent to the process may land on any thread (torch,
    tqdm), and the main thread would still run its Python handler in the middle of the block.
    """
    caught: list[int] = []
    try:
        with _replaced_handlers(_SIGNALS, lambda signum, _frame: caught.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # now the previous handler (or the default action) applies


@contextmanager
def _replaced_handlers(signums: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for ``signums`` (main thread, not over ignored ones); restore the previous ones."""
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                if signal.getsignal(signum) not in (None, signal.SIG_IGN):  # None: set outside Python
                    previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


# ----------------------------------------------------------------------------- journal and recovery


class UnprovenJournalError(OutputError):
    """A ``.NAME.swap`` beside ``out`` that miprun cannot prove it wrote: recovery will not act on it."""


def _journal(out: Path) -> Path:
    return out.with_name(f".{out.name}.swap")


def _names(out: Path, token: str) -> tuple[Path, Path]:
    """The temporary folder and the aside name of the previous output of the run with ``token``."""
    return out.with_name(f".{out.name}.tmp-{token}"), out.with_name(f".{out.name}.old-{token}")


def _pending(out: Path) -> bool:
    """Whether a journal of an interrupted (or running) write lies beside ``out``."""
    return out.parent.is_dir() and os.path.lexists(_journal(out))


def _write_journal(out: Path, record: dict[str, Any]) -> None:
    """Write the journal atomically through a draft whose name holds the run's token (so recovery knows it)."""
    draft = out.with_name(f".{out.name}.swap-{record['token']}.tmp")
    with _disk_full_message(out, "swap journal"):
        try:
            with open(draft, "w", encoding="utf-8") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(draft, _journal(out))
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(draft)
            raise
    _fsync_dir(out.parent)


def _read_journal(out: Path) -> dict[str, Any]:
    """The journal's record, when its form proves a miprun run wrote it; else :class:`UnprovenJournalError`."""
    journal = _journal(out)
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        token = record["token"]
        ok = (
            isinstance(token, str)
            and re.fullmatch(r"[0-9a-f]{32}", token) is not None
            and record["state"] in ("writing", "swapping")
            and [record["new"], record["old"]] == [p.name for p in _names(out, token)]
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        ok, record = False, {"error": str(exc)}
    if not ok:
        raise UnprovenJournalError(
            f"found {journal} beside --out {out}, which miprun cannot read as its own swap journal, so it "
            f"touches nothing it names; if no miprun run is writing {out}, look at it, then delete it"
        )
    return dict(record)


def recover(out: str | Path) -> list[str]:
    """Finish or roll back a swap an interrupted run left beside ``out``, and delete its temporaries.

    Only what the journal names, by the random token of the run that wrote it, is touched: a sibling that
    merely looks like a temporary (``.out.old-20240101``) is left alone. Returns what was done (each also
    logged as a warning); empty when there was nothing to do.
    """
    out = _resolve(out)
    if not out.parent.is_dir():
        return []
    with locked_output(out):
        return _recover(out)


def _recover(out: Path) -> list[str]:
    """:func:`recover` with the lock already held."""
    if not _pending(out):
        return []
    record = _read_journal(out)
    new, old = _names(out, record["token"])
    with suppress(FileNotFoundError):
        out.with_name(f".{out.name}.swap-{record['token']}.tmp").unlink()
    if record["state"] == "writing":  # stopped before the swap began: the partial output goes
        _delete_tree(new)
        _journal(out).unlink()
        _fsync_dir(out.parent)
        done = [f"deleted {new.name} beside {out}: a partial output left by an interrupted run"]
    else:
        done = _replay_swap(out, new, old)
    for message in done:
        log.warning("%s", message)
    return done


def _replay_swap(out: Path, new: Path, old: Path) -> list[str]:
    """Complete the swap the journal names: its new folder was whole (flushed) before the journal said so."""
    outcome = f"completed an interrupted swap: {out} holds the new output"
    if new.is_dir():
        if os.path.lexists(out) and os.path.lexists(old):
            raise OutputExistsError(
                f"cannot finish the interrupted swap of {out}: both it and the previous output {old} exist; "
                f"move one away and run again"
            )
        if os.path.lexists(out):
            os.rename(out, old)
        os.rename(new, out)
    elif not os.path.lexists(out) and old.is_dir():
        os.rename(old, out)
        outcome = f"rolled back an interrupted swap: {out} holds the previous output again"
    elif not os.path.lexists(out):
        outcome = f"deleted the swap journal {_journal(out)}: the folders it names are gone"
    _finish_swap(out, old)
    return [outcome]


def _finish_swap(out: Path, old: Path) -> None:
    """Delete the replaced output, then the journal: until then :func:`recover` can still finish the job.

    A replaced output that cannot be deleted (made read-only, owned by someone else) is reported, not
    left to wedge every later run: the swap itself is done.
    """
    try:
        _delete_tree(old)
    except OSError as exc:
        log.warning(
            "the new output is in place, but the replaced output %s could not be deleted (%s); delete it "
            "by hand",
            old,
            exc.strerror or exc,
        )
    _fsync_dir(out.parent)
    _journal(out).unlink()


def _delete_tree(folder: Path) -> None:
    """Delete ``folder`` (if there) even where the user made it read-only: write permission is restored first."""
    if not os.path.lexists(folder):
        return
    if folder.is_dir() and not folder.is_symlink():
        for root, dirs, _ in os.walk(folder):
            for path in [Path(root), *(Path(root, d) for d in dirs)]:
                if not path.is_symlink():
                    with suppress(OSError):
                        os.chmod(path, stat.S_IMODE(path.lstat().st_mode) | stat.S_IRWXU)
        shutil.rmtree(folder)
    else:
        folder.unlink()


# ----------------------------------------------------------------------------- writing a folder


def write_steps(
    out: str | Path,
    steps: list[tuple[str, Callable[[Path], None]]],
    *,
    overwrite: bool,
    progress: bool,
    inputs: Iterable[str | Path] = (),
    manifest: str = MANIFEST_NAME,
) -> None:
    """Run named writers ``(folder) -> None`` into a temp folder beside ``out``, then swap it into place.

    The manifest the writers leave (``manifest``) gets the list of every other file written, so that a
    later ``--overwrite`` can tell miprun's files from ones the user added.
    """
    from miprun.ownership import record_outputs

    out, inputs = _resolve(out), list(inputs)
    check_output(out, overwrite=overwrite, inputs=inputs, manifest=manifest)
    with locked_output(out):
        _recover(out)
        check_output(out, overwrite=overwrite, inputs=inputs, manifest=manifest)  # recovery may restore one
        token = secrets.token_hex(16)
        tmp, old = _names(out, token)
        record = {"token": token, "new": tmp.name, "old": old.name, "pid": os.getpid(), "state": "writing"}
        _write_journal(out, record)  # from here on, recover() deletes the partial output
        try:
            os.mkdir(tmp, 0o777 & ~_umask())
            with tqdm(steps, desc="saving", unit="step", disable=not progress) as bar:
                for name, write in bar:
                    bar.set_postfix_str(name)
                    with _disk_full_message(out, name):
                        write(tmp)
                bar.set_postfix_str("flushing to disk")
                with _disk_full_message(out, "files"):
                    record_outputs(tmp, manifest)
                    _seal(tmp)
            _swap(out, tmp, record, overwrite=overwrite, inputs=inputs, manifest=manifest)
        finally:
            with _signals_held():
                if _pending(out):
                    _recover(out)  # stopped while writing: delete the partial folder; mid-swap: finish it
    log.info("wrote %s", out)


@contextmanager
def _disk_full_message(out: Path, step: str) -> Iterator[None]:
    """Turn ENOSPC (or a full quota) while writing ``step`` into the documented one-line message."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiskFullError) or not _is_disk_full(exc):
            raise
        raise DiskFullError(
            f"no space left on the device while writing the {step} of {out}: nothing was written there "
            f"(a previous {out.name} is untouched); free some space or pass --out on another disk"
        ) from exc


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a full quota) as an OSError, or as the text of a library's own error (safetensors raises
    ``SafetensorError: ... IoError(Os { code: 28, kind: StorageFull, ... })``)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    text = str(exc)
    return any(mark in text for mark in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def _seal(folder: Path) -> None:
    """Give every entry the umask's permissions and flush it to disk, so a journaled folder is whole."""
    mask = _umask()
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in [*files, *dirs]:
            path = Path(root, name)
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
                if path.is_file():
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        _fsync_dir(Path(root))


def _swap(
    out: Path, tmp: Path, record: dict[str, Any], *, overwrite: bool, inputs: list[str | Path], manifest: str
) -> None:
    """Re-check ``out``, then journal and rename the complete ``tmp`` into place with interrupts held."""
    try:
        if os.path.lexists(out) and not overwrite:
            raise OutputExistsError(
                f"--out {out} appeared while this run was working, and --overwrite was not given"
            )
        check_output(out, overwrite=overwrite, inputs=inputs, manifest=manifest)
    except (OutputExistsError, UnsafeOutputError, OutputNotWritableError) as exc:
        kept = out.with_name(f"{out.name}.new-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.rename(tmp, kept)
        raise type(exc)(f"{exc}; the new output was kept in {kept} instead") from None
    old = out.with_name(record["old"])
    with _signals_held():
        _write_journal(out, {**record, "state": "swapping"})
        _step("journal-written")  # from here on, recover() completes the swap
        if os.path.lexists(out):
            os.rename(out, old)
            _step("old-moved-aside")
        _step("new-moving-in")
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    _step("swapped")
    _finish_swap(out, old)


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
    _check_file_apart(_resolve(path), [given for given in inputs if given is not None], flag)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists; pass --overwrite to replace it, or choose another {flag}"
        )
    _check_writable(_resolve(path))


def check_results_file(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse writing a results file over one of the files it was computed from, or into a model folder it
    read (the writers' own last check; the CLI checks the same before any work)."""
    _check_file_apart(_resolve(out), [given for given in inputs if given is not None])


def _check_file_apart(out: Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output file that is an input file of the run, or lies inside an input folder."""
    for given in inputs:
        if not os.path.lexists(Path(given).expanduser()):
            continue  # a hub id or a named corpus, not a local path
        source = _resolve(given)
        if source == out:
            raise UnsafeOutputError(
                f"{flag} {out} is the input {source} that this run reads; write the results to another file"
            )
        if source in out.parents:
            raise UnsafeOutputError(
                f"{flag} {out} lies inside the input {source} that this run reads, and would replace or add "
                f"to its files; write the results to a file outside it"
            )
