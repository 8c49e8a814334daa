"""An explicit removal set (``prune --blocks 12,14,17``): blocks chosen elsewhere, applied and repaired here.

A set from a paper, another tool or an earlier run needs no scores and no calibration pass; it goes through
the rest of ``prune`` like any method's choice (repair, evaluation, card, GGUF), and the manifest records it
as method ``explicit``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from miprun.errors import InvalidOptionError
from miprun.methods import SearchInfo
from miprun.scores.result import CalibrationInfo

EXPLICIT = "explicit"
NO_CALIBRATION_SOURCE = "none (explicit --blocks)"


def explicit_removal(blocks: Sequence[int], total: int) -> tuple[list[int], SearchInfo]:
    """The sorted set ``blocks`` of a ``total``-block model, checked, and the selection record for it."""
    duplicates = sorted({b for b in blocks if list(blocks).count(b) > 1})
    if duplicates:
        raise InvalidOptionError(f"blocks (--blocks) lists {duplicates} more than once; name each block once")
    outside = [b for b in blocks if not 0 <= b < total]
    if outside:
        raise InvalidOptionError(
            f"blocks (--blocks) are 0-based indices in [0, {total - 1}] for this {total}-block model; got "
            f"{outside}. `miprun score` or miprun.json name blocks the same way."
        )
    if len(blocks) >= total:
        raise InvalidOptionError(f"blocks (--blocks) would remove all {total} blocks; keep at least one")
    removed = sorted(blocks)
    info = SearchInfo(
        method=EXPLICIT,
        num_evaluations=0,
        stop_reason="the removal set was given (--blocks)",
        params={"blocks": removed},
    )
    return removed, info


def no_calibration(seed: int) -> CalibrationInfo:
    """The calibration record of a run that read no calibration text to choose its blocks."""
    return CalibrationInfo(
        source=NO_CALIBRATION_SOURCE,
        fingerprint="",
        windows_fingerprint="",
        num_windows=0,
        seq_len=0,
        seed=seed,
        tokens=0,
    )


def check_budget_before_load(
    model: Any, blocks: Sequence[int], num_blocks: int | None, ratio: float | None
) -> None:
    """The removal budget against a local folder's ``config.json`` (its layer count), before the model loads.

    Other sources (and configs that do not name ``num_hidden_layers``) are checked once the model is loaded.
    """
    from miprun.pipeline.setup import blocks_to_remove

    total = _configured_layers(model)
    if total is None:
        return
    if blocks:
        explicit_removal(blocks, total)
    else:
        blocks_to_remove(total, num_blocks, ratio)


def _configured_layers(model: Any) -> int | None:
    """``num_hidden_layers`` of a local model folder's (text) config; None for anything else."""
    if (
        not isinstance(model, (str, Path))
        or not (config := Path(model).expanduser() / "config.json").is_file()
    ):
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the load says what is wrong with it
    text = (data.get("text_config") or data) if isinstance(data, dict) else {}
    layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None
