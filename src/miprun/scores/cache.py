"""The scores cache: a scoring run is reused when the model, the token windows and every setting match.

Entries live under ``cache_dir()/scores/<key>.json``; each carries a hash of its content, checked before
reuse, so a damaged or edited entry is recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from miprun.assets import cache_dir
from miprun.errors import ScoresError
from miprun.model.identity import tensor_fingerprint
from miprun.scores.result import ScoreResult

log = logging.getLogger(__name__)


def cache_key(settings: dict[str, Any]) -> str:
    """Hash of everything a :class:`ScoreResult` depends on (model and text fingerprints, windows, settings)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def settings_for(
    model_fingerprint: str,
    param: torch.Tensor,
    text_fingerprint: str,
    windows: torch.Tensor,
    scoring: dict[str, Any],
) -> dict[str, Any]:
    """The settings a cache key is made of; ``scoring`` holds the estimator, method and calibration settings."""
    from miprun.versions import package_versions

    return {
        "model": model_fingerprint,
        "dtype": str(param.dtype),
        "device": param.device.type,
        "text": text_fingerprint,
        "windows": tensor_fingerprint(windows),
        **scoring,
        "miprun": package_versions().get("miprun"),
    }


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def path_for(key: str) -> Path:
    return cache_dir() / "scores" / f"{key}.json"


def read(key: str, num_blocks: int, owner: dict[str, str] | None = None) -> ScoreResult | None:
    """The cached result for ``key``, or None (absent, damaged, incomplete, or another model's: recomputed).

    ``owner`` holds what the entry must have been made from: the model's ``fingerprint`` and the token
    windows' ``windows_fingerprint``; an entry placed under this key for another model or other windows is
    not reused, whatever its hash says.
    """
    path = path_for(key)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or entry.get("sha256") != _digest(entry.get("result", {})):
            raise ScoresError("its content does not match its hash")
        result = ScoreResult.from_json(entry["result"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring a damaged cached scores file %s (%s); recomputing", path, err)
        return None
    if result.num_blocks != num_blocks or (result.table is not None and not result.table.complete):
        log.warning("ignoring an incomplete cached scores file %s; recomputing", path)
        return None
    if mismatch := _not_its_owner(entry, key, result, owner or {}):
        log.warning("ignoring the cached scores file %s: %s; recomputing", path, mismatch)
        return None
    log.info("reusing cached scores %s: no calibration pass (--no-cache recomputes)", path)
    return result


def _not_its_owner(entry: dict[str, Any], key: str, result: ScoreResult, owner: dict[str, str]) -> str:
    """Why a cache entry is not this run's (another key, model or windows); empty when it is."""
    if "key" in entry and entry["key"] != key:
        return f"it was stored under the key {entry['key']}, not this one"
    made_for = {
        "fingerprint": (result.model.fingerprint, "model"),
        "windows_fingerprint": (result.calibration.windows_fingerprint, "token windows"),
    }
    for field, want in owner.items():
        found, what = made_for[field]
        if found != want:
            return f"it was made for other {what} (fingerprint {found}, this run's is {want})"
    return ""


def write(key: str, result: ScoreResult) -> None:
    """Store ``result`` under ``key``; a read-only or full cache only logs a warning."""
    from miprun.atomic import write_json

    data = result.to_json()
    try:
        write_json(path_for(key), {"key": key, "sha256": _digest(data), "result": data}, indent=None)
    except (OSError, ValueError) as err:
        log.warning("could not cache the scores in %s: %s", path_for(key), err)


__all__ = ["cache_key", "read", "settings_for", "write"]
