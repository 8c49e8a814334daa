"""A whole output folder as one transaction: written into ``.NAME.tmp-TOKEN`` beside ``out``, flushed, then
swapped in through the journal ``.NAME.swap``, under the lock ``.NAME.lock``; :func:`recover` finishes or rolls
back what a killed run left, touching only the folders its journal names."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from miprun.errors import (
    DiskFullError,
    OutputExistsError,
    OutputNotWritableError,
    UnprovenJournalError,
    UnsafeOutputError,
)
from miprun.files import current_umask, fsync_dir
from miprun.output_policy import (
    MANIFEST_NAME,
    check_apart,
    check_writable,
    foreign,
    holding,
    is_miprun_output,
    listing,
    lock_path,
    locked_output,
    resolve_out,
)
from miprun.signals import signals_held

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# Test hook: called with "journal-written", "old-moved-aside", "new-moving-in" and "swapped" during a swap.
# Left module-wide on purpose: the crash tests set it in a child process before any call, to kill that process
# between two renames; passing it down would put a test-only parameter on every writer. None in real runs.
step_hook: Callable[[str], None] | None = None


def check_output(
    out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path] = (), manifest: str = MANIFEST_NAME
) -> None:
    """Refuse an ``out`` this run may not write or replace; cheap, so call it before any expensive work.

    A swap an interrupted run left half done is completed first (:func:`recover`), so the verdict is on
    what will really be at ``out``.
    """
    out = resolve_out(out)
    check_apart(out, inputs)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(
            f"--out {out} is an existing file; pass a folder path (new, empty or a previous miprun output)"
        )
    check_writable(out)
    if not holding(out) and _pending(out):
        recover(out)  # judge what will really be at ``out``, not a half-done swap (fails if a run is live)
    if out.is_dir() and not overwrite:
        raise OutputExistsError(
            f"--out {out} already exists; pass --overwrite to replace it (only an empty folder or a previous "
            f"miprun output is replaced), or choose another --out"
        )
    if out.is_dir() and (names := listing(out)) and not is_miprun_output(out, manifest):
        raise OutputExistsError(
            f"--out {out} holds files miprun did not write ({names}) and no {manifest} from a previous "
            f"run, so --overwrite will not replace it; choose a new or empty folder, such as {out / 'pruned'}"
        )
    if out.is_dir() and (added := foreign(out, manifest)):
        raise OutputExistsError(
            f"--out {out} is an earlier miprun output, but {added} in it is not listed in its {manifest} "
            f"(added since, or not written by miprun), so --overwrite will not replace it; move that away "
            f"or choose another --out"
        )
    if not holding(out) and lock_path(out).exists():
        with locked_output(out):  # fails at once if another run is writing there now
            pass


def _step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


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
    fsync_dir(out.parent)


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
    out = resolve_out(out)
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
        fsync_dir(out.parent)
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
    fsync_dir(out.parent)
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

    out, inputs = resolve_out(out), list(inputs)
    check_output(out, overwrite=overwrite, inputs=inputs, manifest=manifest)
    with locked_output(out):
        _recover(out)
        check_output(out, overwrite=overwrite, inputs=inputs, manifest=manifest)  # recovery may restore one
        token = secrets.token_hex(16)
        tmp, old = _names(out, token)
        record = {"token": token, "new": tmp.name, "old": old.name, "pid": os.getpid(), "state": "writing"}
        _write_journal(out, record)  # from here on, recover() deletes the partial output
        try:
            os.mkdir(tmp, 0o777 & ~current_umask())
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
            with signals_held():
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
    mask = current_umask()
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
        fsync_dir(Path(root))


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
    with signals_held():
        _write_journal(out, {**record, "state": "swapping"})
        _step("journal-written")  # from here on, recover() completes the swap
        if os.path.lexists(out):
            os.rename(out, old)
            _step("old-moved-aside")
        _step("new-moving-in")
        os.rename(tmp, out)
        fsync_dir(out.parent)
    _step("swapped")
    _finish_swap(out, old)
