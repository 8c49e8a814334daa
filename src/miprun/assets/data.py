"""Real English text taken once from source archives on the package index: ``cache_dir()/data/<archive>/...``.

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
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from miprun.assets.packages import AssetError, cache_dir, pip_failure, run_pip
from miprun.atomic import atomic_file
from miprun.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextArchive:
    """A source archive on the package index that carries real text, and the files of it that miprun keeps."""

    name: str  # its folder under ``cache_dir()/data``
    requirement: str  # what pip downloads (``--no-binary :all:``: the source archive)
    prefix: str  # the archive's path up to the kept files, e.g. ``bigbench/benchmark_tasks/``
    members: tuple[str, ...]  # kept files, as patterns relative to ``prefix``
    size: str  # said while downloading

    @property
    def archive_variable(self) -> str:
        """The environment variable that names this archive already on disk (no download)."""
        return f"MIPRUN_{self.name.upper()}_ARCHIVE"


# The BIG-bench source archive: the SQuAD-shifts registers (wiki, nyt, ...) and Social IQa. The package index
# stopped offering version 1.0.0 in December 2026 (only 0.0.1, without the tasks, is left): it is fetched where
# an index still has it, or read from MIPRUN_BIGBENCH_ARCHIVE.
BIGBENCH = TextArchive(
    "bigbench",
    "bigbench==1.0.0",
    "bigbench/benchmark_tasks/",
    ("squad_shifts/*.json", "social_iqa/task.json"),
    "358 MB",
)
# SentencePiece's source archive carries a whole public-domain novel as test data: Botchan (Natsume Soseki,
# tr. Yasotaro Morri, 1918; Project Gutenberg #8868), about 70 k tokens of plain English prose.
SENTENCEPIECE = TextArchive("sentencepiece", "sentencepiece==0.2.3", "test/", ("botchan.txt",), "3.7 MB")
BIGBENCH_REQUIREMENT = BIGBENCH.requirement
BIGBENCH_MEMBERS = BIGBENCH.members


def bigbench_file(relpath: str) -> Path:
    """A file of the BIG-bench tasks folder, e.g. ``"squad_shifts/squaddev_v1.1.json"``."""
    return archive_file(BIGBENCH, relpath)


def archive_file(archive: TextArchive, relpath: str) -> Path:
    """A kept file of ``archive``, fetched on first use.

    The first call fetches the source archive with pip, keeps only its ``members`` under
    ``cache_dir()/data/<name>`` and deletes the rest. Set ``MIPRUN_<NAME>_ARCHIVE`` to that archive already
    on disk to skip the download (it is kept).
    """
    relpath = relpath.strip("/")
    if not _kept(archive, relpath):
        kept = ", ".join(archive.members)
        raise DataError(f"{relpath!r} is not among the {archive.name} files miprun keeps: {kept}")
    root = cache_dir() / "data" / archive.name
    target = root / relpath
    if target.is_file():
        return target
    start = time.perf_counter()
    archive_env = os.environ.get(archive.archive_variable)
    if archive_env:
        path = Path(archive_env).expanduser()
        if not path.is_file():
            raise DataNotFoundError(f"{archive.archive_variable} points at {path}, which is not a file")
        count = _store_members(_archive_members(archive, path), root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{archive.name}-download-", dir=root.parent) as tmp:
            count = _store_members(_download(archive, Path(tmp)), root)
    if count == 0:
        raise DataError(f"the {archive.requirement} source holds none of {', '.join(archive.members)}")
    log.info("Kept %d %s files under %s in %.1f s", count, archive.name, root, time.perf_counter() - start)
    if not target.is_file():
        raise DataNotFoundError(f"{relpath} is not in the {archive.requirement} source archive")
    return target


def _download(archive: TextArchive, tmp: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Fetch the source archive with pip into ``tmp`` and yield its kept members.

    Recent pip refuses to finish ``pip download`` of BIG-bench's sdist, because its metadata names a
    direct-URL dependency (bleurt); by then pip has unpacked the archive, and ``--no-clean`` keeps that tree
    in pip's temporary folder. Older pip saves the archive itself. Either is accepted.
    """
    dest, work = tmp / "archive", tmp / "pip-tmp"
    args = ["download", "--no-deps", "--no-binary", ":all:", "--no-clean", "--disable-pip-version-check"]
    args += ["-d", str(dest), archive.requirement]
    what = f"Downloading the {archive.name} source archive ({archive.size}, once)"
    output = run_pip(args, what, tmpdir=work, check=False)
    archives = sorted(p for p in dest.glob("*") if p.name.endswith((".tar.gz", ".zip", ".tgz")))
    if archives:
        yield from _archive_members(archive, archives[0])
        return
    trees = sorted(work.glob("pip-download-*/*/" + archive.prefix))
    if not trees:
        cmd = [sys.executable, "-m", "pip", *args]
        failure = pip_failure(cmd, 1, output, f"Downloading the {archive.name} source archive")
        raise AssetError(
            f"{failure}\nWith that archive on disk, set {archive.archive_variable}=PATH to read it instead."
        )
    for path in sorted(trees[0].rglob("*")):
        rel = path.relative_to(trees[0]).as_posix()
        if path.is_file() and _kept(archive, rel):
            with path.open("rb") as f:
                yield rel, f


def _archive_members(archive: TextArchive, path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(path under the prefix, file)`` for the kept members of a source archive (tar or zip)."""
    log.info("Reading %s", path.name)  # it may lie in a temporary folder the user never sees
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                _, sep, rel = info.filename.partition(archive.prefix)
                if sep and not info.is_dir() and _kept(archive, rel):
                    with zf.open(info) as opened:
                        yield rel, opened
        return
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            _, sep, rel = member.name.partition(archive.prefix)
            if sep and member.isfile() and _kept(archive, rel):
                src = tar.extractfile(member)
                if src is not None:
                    yield rel, src


def _kept(archive: TextArchive, rel: str) -> bool:
    return ".." not in rel.split("/") and any(fnmatch.fnmatch(rel, p) for p in archive.members)


def _store_members(members: Iterator[tuple[str, IO[bytes]]], root: Path) -> int:
    """Copy each member under ``root``; each file appears atomically. Returns how many."""
    count = 0
    for rel, src in members:
        with atomic_file(root / rel) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        count += 1
    return count
