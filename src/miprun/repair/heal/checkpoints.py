"""Healing's resumable checkpoints: Trainer's ``checkpoint-N`` folders, each completed by a miprun marker.

Trainer writes a checkpoint as several files; the marker (``miprun-heal.json``: the run's key, step and
losses) is written atomically after all of them, by the main process once every process has saved its
part. A folder without it is unfinished (an interrupt mid-save) and is ignored; older checkpoints are
deleted only after a newer one is complete, so an interrupt at any moment leaves a usable one on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from miprun.atomic import write_json
from miprun.errors import MiprunError

MARKER = "miprun-heal.json"
PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR
FORMAT = 2  # 1: the hand-written loop's single heal-checkpoint.safetensors


class HealCheckpointError(MiprunError, ValueError):
    """``work_dir`` holds a healing checkpoint made for another student, teacher or settings."""


def _step(folder: Path) -> int:
    tail = folder.name.removeprefix(PREFIX)
    return int(tail) if tail.isdigit() else -1


def checkpoints(work_dir: Path) -> list[Path]:
    """Trainer's checkpoint folders in ``work_dir``, oldest first (complete or not)."""
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and _step(p) >= 0]
    return sorted(found, key=_step)


def latest(work_dir: Path, key: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint for ``key`` and its marker; None if there is none.

    Raises:
        HealCheckpointError: the newest complete checkpoint was made for another run, or is unreadable.
    """
    complete = [p for p in checkpoints(work_dir) if (p / MARKER).is_file()]
    if not complete:
        return None
    path = complete[-1]
    meta = read_marker(path)
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise HealCheckpointError(_mismatch(path, meta.get("key"), key))
    return path, meta


def read_marker(folder: Path) -> dict[str, Any]:
    """The marker of a checkpoint folder, or a :class:`HealCheckpointError` saying it is unreadable."""
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HealCheckpointError(
            f"{folder} is not a readable healing checkpoint ({exc}); delete it to start over, or pass another "
            "--work-dir"
        ) from exc
    return meta if isinstance(meta, dict) else {}


def drop_unfinished(work_dir: Path) -> None:
    """Delete checkpoint folders without a marker: saves an interrupt cut short (main process only)."""
    for folder in checkpoints(work_dir):
        if not (folder / MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def complete(folder: Path, key: dict[str, Any], step: int, losses: list[float]) -> None:
    """Mark ``folder`` complete, then delete the older checkpoints (main process, after every process saved)."""
    write_json(folder / MARKER, {"format": FORMAT, "key": key, "step": step, "losses": losses})
    for older in checkpoints(folder.parent):
        if _step(older) < step:
            shutil.rmtree(older, ignore_errors=True)


def clean(work_dir: Path) -> None:
    """Remove a finished run's checkpoints and cached targets, and ``work_dir`` itself if nothing else is left."""
    from miprun.repair.heal.data import TARGETS_NAME

    for folder in checkpoints(work_dir):
        shutil.rmtree(folder, ignore_errors=True)
    (work_dir / TARGETS_NAME).unlink(missing_ok=True)
    if work_dir.is_dir() and not any(work_dir.iterdir()):
        work_dir.rmdir()


def _mismatch(path: Path, found: Any, wanted: dict[str, Any]) -> str:
    """The message for a checkpoint made for other models or settings: which ones, and what to do."""
    found = found if isinstance(found, dict) else {}
    differ = [k for k in wanted if found.get(k) != wanted[k]]
    shown = "; ".join(f"{k}: checkpoint {found.get(k)!r}, now {wanted[k]!r}" for k in differ)
    return (
        f"{path} was written for another healing run ({shown or 'another checkpoint format'}); pass the "
        "same student, teacher and settings to resume it, or another --work-dir (or delete the folder) to "
        "start over"
    )
