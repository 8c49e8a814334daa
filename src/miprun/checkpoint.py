"""Writing an output folder atomically: everything goes to a temporary folder beside the target, which
replaces the target only once complete, so an interrupted run never leaves a half-written model and
``overwrite`` never deletes the old output before the new one is whole."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    """The output folder exists and ``overwrite`` was not given."""


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early (before any expensive work) if ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")


def check_not_replacing(out: Path, source: Path, what: str) -> None:
    """Refuse an output folder that is, or contains, ``source``: replacing it would delete the input."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if source == out or out in source.parents:
        raise OutputExistsError(
            f"--out {out} would replace the {what} {source} that this run reads; choose another output folder"
        )


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it atomically becomes ``out``."""
    out = Path(out).resolve()
    check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot create the output folder in {out.parent} ({exc.strerror}); choose another --out",
        ) from exc
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)  # keep the old output until the new one is in place
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_steps(
    out: Path, steps: list[tuple[str, Callable[[Path], None]]], overwrite: bool, progress: bool
) -> None:
    """Run named writers into a temporary folder, with a progress bar, then move it into place."""
    with atomic_folder(out, overwrite) as tmp:
        bar = tqdm(steps, desc="saving", unit="step", disable=not progress)
        for name, write in bar:
            bar.set_postfix_str(name)
            try:
                write(tmp)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on the device while writing the {name} of {out}: nothing was written "
                    f"there (a previous {out.name} is untouched); free some space or pass --out on another disk",
                ) from exc
    log.info("wrote %s", out)
