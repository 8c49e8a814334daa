"""What miprun wrote in an output folder: the manifest (``miprun.json``, ``comparison.json``) lists its files.

``--overwrite`` replaces a folder only when every file in it is one the manifest lists: a file the user
added since (``my_eval.txt``), or a folder that merely holds a file named like a manifest, is refused,
naming what is not miprun's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "miprun.json"
OUTPUTS_KEY = "outputs"  # the manifest's list of the other files miprun wrote in the folder

# Manifests written before the list was complete: the files miprun wrote after the manifest, or without one.
_LEGACY_FILES = {
    "miprun.json": ("report.png", "report.md", "README.md"),
    "comparison.json": (
        "comparison.md",
        "comparison_ppl.png",
        "comparison_time.png",
        "comparison_accuracy.png",
    ),
}


def read_manifest(folder: str | Path, manifest: str = MANIFEST_NAME) -> dict[str, Any] | None:
    """The manifest miprun wrote in ``folder``, or None when there is none (or it is not miprun's)."""
    try:
        data = json.loads((Path(folder) / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    outputs = data.get(OUTPUTS_KEY, [])
    if not (isinstance(outputs, list) and all(isinstance(name, str) for name in outputs)):
        return None
    kind = data.get("kind")
    if isinstance(kind, str) and kind.startswith("miprun-"):
        return data
    legacy_plan = type(data.get("schema_version")) is int and {"removed", "num_blocks_before"} <= data.keys()
    legacy_comparison = manifest == "comparison.json" and {"rows", "forward_pass_seconds"} <= data.keys()
    return data if legacy_plan or legacy_comparison else None


def files_in(folder: Path) -> list[str]:
    """Every file (and link, and empty folder) below ``folder``, as sorted relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        found += [(here / name).as_posix() for name in files]
        found += [(here / name).as_posix() for name in dirs if Path(root, name).is_symlink()]
        if not dirs and not files and here != Path("."):
            found.append(here.as_posix() + "/")
    return sorted(found)


def foreign_files(folder: str | Path, manifest: str = MANIFEST_NAME) -> list[str] | None:
    """Files in ``folder`` that its manifest does not list; None when it has no miprun manifest."""
    data = read_manifest(folder, manifest)
    if data is None:
        return None
    listed = {manifest, *data.get(OUTPUTS_KEY, []), *_LEGACY_FILES.get(manifest, ())}
    return [name for name in files_in(Path(folder)) if name not in listed]


def record_outputs(folder: Path, manifest: str = MANIFEST_NAME) -> list[str]:
    """Write the list of every other file in ``folder`` into its manifest (when it has one); returns it."""
    from miprun.files import write_json

    path = folder / manifest
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    outputs = [name for name in files_in(folder) if name != manifest]
    data[OUTPUTS_KEY] = outputs
    write_json(path, data, indent=2 if manifest == MANIFEST_NAME else 1)
    return outputs
