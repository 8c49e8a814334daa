"""Real English text taken once from the BIG-bench source archive: ``cache_dir()/data/bigbench/...``.

Each kept file is written atomically, so an interrupted download never leaves a half-written file that a
later run would trust.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from miprun.assets.packages import AssetError, cache_dir, pip_failure, run_pip
from miprun.atomic import atomic_file
from miprun.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
# Members of the BIG-bench archive we keep, relative to its ``bigbench/benchmark_tasks/`` folder.
BIGBENCH_MEMBERS = ("squad_shifts/*.json", "social_iqa/task.json")
_BIGBENCH_PREFIX = "bigbench/benchmark_tasks/"


def bigbench_file(relpath: str) -> Path:
    """A file of the BIG-bench tasks folder, e.g. ``"squad_shifts/squaddev_v1.1.json"``.

    The first call fetches the ``bigbench==1.0.0`` source archive with pip (358 MB, about a minute),
    keeps only :data:`BIGBENCH_MEMBERS` under ``cache_dir()/data/bigbench`` and deletes the rest.
    Set ``MIPRUN_BIGBENCH_ARCHIVE`` to that archive already on disk to skip the download (it is kept).
    """
    relpath = relpath.strip("/")
    if not any(fnmatch.fnmatch(relpath, pat) for pat in BIGBENCH_MEMBERS):
        kept = ", ".join(BIGBENCH_MEMBERS)
        raise DataError(f"{relpath!r} is not among the BIG-bench files miprun keeps: {kept}")
    root = cache_dir() / "data" / "bigbench"
    target = root / relpath
    if target.is_file():
        return target
    start = time.perf_counter()
    archive_env = os.environ.get("MIPRUN_BIGBENCH_ARCHIVE")
    if archive_env:
        archive = Path(archive_env).expanduser()
        if not archive.is_file():
            raise DataNotFoundError(f"MIPRUN_BIGBENCH_ARCHIVE points at {archive}, which is not a file")
        count = _store_members(_archive_members(archive), root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".bigbench-download-", dir=root.parent) as tmp:
            count = _store_members(_download_bigbench(Path(tmp)), root)
    if count == 0:
        raise DataError(f"the {BIGBENCH_REQUIREMENT} source holds none of {', '.join(BIGBENCH_MEMBERS)}")
    log.info("Kept %d BIG-bench files under %s in %.1f s", count, root, time.perf_counter() - start)
    if not target.is_file():
        raise DataNotFoundError(f"{relpath} is not in the {BIGBENCH_REQUIREMENT} source archive")
    return target


def _download_bigbench(tmp: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Fetch the BIG-bench sdist with pip into ``tmp`` and yield its kept members.

    Recent pip refuses to finish ``pip download`` of this sdist, because its metadata names a direct-URL
    dependency (bleurt); by then pip has unpacked the archive, and ``--no-clean`` keeps that tree in
    pip's temporary folder. Older pip saves the archive itself. Either is accepted.
    """
    dest, work = tmp / "archive", tmp / "pip-tmp"
    args = ["download", "--no-deps", "--no-binary", ":all:", "--no-clean", "--disable-pip-version-check"]
    args += ["-d", str(dest), BIGBENCH_REQUIREMENT]
    output = run_pip(
        args, "Downloading the BIG-bench source archive (358 MB, once)", tmpdir=work, check=False
    )
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if archives:
        yield from _archive_members(archives[0])
        return
    trees = sorted(work.glob("pip-download-*/*/" + _BIGBENCH_PREFIX))
    if not trees:
        cmd = [sys.executable, "-m", "pip", *args]
        raise AssetError(pip_failure(cmd, 1, output, "Downloading the BIG-bench source archive"))
    for path in sorted(trees[0].rglob("*")):
        rel = path.relative_to(trees[0]).as_posix()
        if path.is_file() and _kept(rel):
            with path.open("rb") as f:
                yield rel, f


def _archive_members(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(path under benchmark_tasks/, file)`` for the kept members of a BIG-bench archive."""
    log.info("Reading %s", archive.name)  # it may lie in a temporary folder the user never sees
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            _, sep, rel = member.name.partition(_BIGBENCH_PREFIX)
            if sep and member.isfile() and _kept(rel):
                src = tar.extractfile(member)
                if src is not None:
                    yield rel, src


def _kept(rel: str) -> bool:
    return ".." not in rel.split("/") and any(fnmatch.fnmatch(rel, p) for p in BIGBENCH_MEMBERS)


def _store_members(members: Iterator[tuple[str, IO[bytes]]], root: Path) -> int:
    """Copy each member under ``root``; each file appears atomically. Returns how many."""
    count = 0
    for rel, src in members:
        with atomic_file(root / rel) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        count += 1
    return count
