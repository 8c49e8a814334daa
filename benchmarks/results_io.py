"""Writing a benchmark's results: ``NAME.json`` (strict JSON) and ``NAME.md`` beside it, each atomically."""

from __future__ import annotations

import json
import os
import re
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


def default_manifests(folder: Path, model: str | None = None) -> dict[tuple[str, int], Path]:
    """The default command's manifests in ``folder`` by (model, N): ``MODEL-nN.json``, or ``MODEL-nN/miprun.json``
    as ``benchmarks/default_runs.sh`` leaves them (the latter where both exist); only ``model``'s when given."""
    found: dict[tuple[str, int], Path] = {}
    for path in [*folder.glob("*-n*.json"), *folder.glob("*-n*/miprun.json")]:
        match = re.fullmatch(r"(.+)-n(\d+)", path.parent.name if path.name == "miprun.json" else path.stem)
        if match is not None and model in (None, match.group(1)):
            found[(match.group(1), int(match.group(2)))] = path
    return dict(sorted(found.items()))


def sleb_sets(folder: Path) -> dict[int, dict[str, Any]]:
    """SLEB's set at every N of a ``miprun compare`` folder with the held-out perplexity of its rows: ``cut``
    (no repair) and ``linear`` (None where not run), on the comparison's ``text`` (None where not recorded).
    Its rows at one N share the set; a comparison where they do not is refused."""
    data = json.loads((folder / "comparison.json").read_text())
    text = data.get("evaluation", {}).get("source", "").split(":")[0] or None
    out: dict[int, dict[str, Any]] = {}
    for row in data["rows"]:
        if row["method"] != "sleb":
            continue
        entry = out.setdefault(
            row["num_blocks"], {"removed": row["removed"], "cut": None, "linear": None, "text": text}
        )
        if entry["removed"] != row["removed"]:
            raise SystemExit(f"{folder}: SLEB's rows at N={row['num_blocks']} hold different sets")
        entry["linear" if row.get("repair") == "linear" else "cut"] = row["ppl"]
    return out


def pruned_with_linear(model: str, removed: list[int], calibration: Any, **repair_params: Any) -> Any:
    """``model`` (a name or folder) pruned by ``removed`` with the linear repair (``repair_params`` over its
    defaults), evaluated on 8 x 256 held-out tokens of :data:`TEXT`: miprun's ``PruneResult``."""
    import miprun
    from miprun.model.loading import load_model

    return miprun.prune(
        load_model(model),
        blocks=removed,
        repair="linear",
        repair_params=repair_params,
        calibration=calibration,
        evaluate=True,
        eval_samples=8,
        eval_source=TEXT,
        cache=False,
        progress=False,
    )
