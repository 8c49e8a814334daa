"""Writing a benchmark's results: ``NAME.json`` (strict JSON) and ``NAME.md`` beside it, each atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from miprun.atomic import atomic_write_text, write_json

# The text the recorded figures were measured on, calibration and held-out splits alike. `wiki` needs the
# BIG-bench source archive, which the package index stopped offering in December 2026 (set
# MIPRUN_BIGBENCH_ARCHIVE to it); MIPRUN_BENCH_TEXT=novel runs a benchmark on miprun's default text instead.
TEXT = os.environ.get("MIPRUN_BENCH_TEXT", "wiki")


def write_results(folder: str | Path, name: str, data: Any, markdown: str) -> None:
    """``folder/NAME.json`` and ``folder/NAME.md``; NaN/Inf (which strict JSON has no word for) become null."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", finite(json.loads(json.dumps(data, default=str))), indent=1)
    atomic_write_text(folder / f"{name}.md", markdown.rstrip("\n") + "\n")


def finite(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
