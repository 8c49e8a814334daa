"""What ``miprun compare`` produces: typed rows and their comparison, ``comparison.json`` read and written.

The JSON keeps the format earlier comparisons have (benchmarks and ``--update`` read it): one object with
the setup, the dense model's results and ``rows``, each row a method's choice at one N under one repair;
what a row did not measure (tasks, a repair's fit) is left out rather than written as null.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miprun.errors import InvalidOptionError
from miprun.ownership import OUTPUTS_KEY

COMPARISON_NAME = "comparison.json"
COMPARISON_KIND = "miprun-comparison"
CUT_ONLY = "none"  # the repair name of a row that was only cut (what rows written before repairs hold)


@dataclass
class ComparisonRow:
    """One method's choice at one N under one repair, and what it measured."""

    method: str
    num_blocks: int
    removed: list[int]
    ppl: float  # held-out perplexity of the cut (and repaired) model
    prune_seconds: float  # the method's scoring, live evidence and choice; not the repair
    prune_x_forward: float  # prune_seconds in plain forward passes over the calibration tokens
    repair: str = CUT_ONLY
    mi_set_loss: float | None = None
    mi_evaluations: int = 0
    estimator: dict[str, Any] | None = None  # the estimator's parameters, for methods that read MI
    search: dict[str, Any] = field(default_factory=dict)  # the method's parameters and what it ranked
    repair_fit_seconds: float | None = None
    repair_pass_seconds: float | None = None  # the repair's calibration pass, shared by its rows
    repair_record: dict[str, Any] | None = None
    tasks: dict[str, Any] | None = None  # zero-shot results; None where skipped or not asked for

    @property
    def key(self) -> tuple[str, str]:
        """What a rerun with ``--update`` replaces: the method under the repair."""
        return self.method, self.repair

    @property
    def label(self) -> str:
        """The row's curve in the plots: the method, with its repair when it has one."""
        return self.method if self.repair == CUT_ONLY else f"{self.method} + {self.repair}"

    def to_json(self) -> dict[str, Any]:
        return _without_none(asdict(self), _OPTIONAL_ROW)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComparisonRow:
        return _build(cls, data, "row")


_OPTIONAL_ROW = ("repair_fit_seconds", "repair_pass_seconds", "repair_record", "tasks")


@dataclass
class TextSetup:
    """The text and windows a comparison read: the calibration text (with its seed) or the held-out text."""

    source: str
    windows: int
    seq_len: int
    seed: int | None = None  # the calibration windows' seed; None for held-out text (consecutive windows)

    def to_json(self) -> dict[str, Any]:
        return _without_none(asdict(self), ("seed",))


@dataclass
class Comparison:
    """Every row of a comparison, with the setup they share and the dense model's results."""

    model: str
    num_blocks_total: int
    dense_ppl: float
    calibration: TextSetup
    evaluation: TextSetup
    forward_pass_seconds: float  # median plain forward pass over the calibration tokens, this run
    estimator: str
    rows: list[ComparisonRow] = field(default_factory=list)
    dense_tasks: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    task_max_ppl_ratio: float | None = None
    tokenize_seconds: float = 0.0
    # after --update: method -> the forward pass its rows were timed against, for rows of an earlier run
    earlier_forward_pass_seconds: dict[str, float] | None = None

    def setup(self) -> dict[str, Any]:
        """What must match for rows of two runs to share one table."""
        return {key: getattr(self, key) for key in SAME_SETUP}

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["calibration"] = self.calibration.to_json()
        data["evaluation"] = self.evaluation.to_json()
        data["rows"] = [row.to_json() for row in self.rows]
        data["dense_tasks"] = dict(self.dense_tasks)
        return _without_none(data, ("earlier_forward_pass_seconds",))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        data = {k: v for k, v in data.items() if k not in ("kind", OUTPUTS_KEY)}  # the folder's, not ours
        try:
            data["calibration"] = _build(TextSetup, data["calibration"], "calibration")
            data["evaluation"] = _build(TextSetup, data["evaluation"], "evaluation")
            data["rows"] = [ComparisonRow.from_json(row) for row in data["rows"]]
        except (KeyError, TypeError) as err:
            raise InvalidOptionError(f"not a miprun comparison: it lacks {err}") from err
        return _build(cls, data, "comparison")

    @classmethod
    def read(cls, path: Path) -> Comparison:
        """The comparison in ``path`` (a ``comparison.json``); an unreadable one says what ``--update`` needs."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise InvalidOptionError(f"--update needs an earlier comparison in {path}: {err}") from err


# What must match for rows of two runs to share one table.
SAME_SETUP = (
    "model",
    "num_blocks_total",
    "calibration",
    "evaluation",
    "tasks",
    "task_limit",
    "task_max_ppl_ratio",
)


def check_setup(previous: Comparison, setup: dict[str, Any]) -> None:
    """Refuse to merge into ``previous`` a run whose ``setup`` (some of :data:`SAME_SETUP`) differs."""
    for key, value in setup.items():
        if getattr(previous, key) != value:
            shown = lambda v: v.to_json() if isinstance(v, TextSetup) else v  # noqa: E731
            raise InvalidOptionError(
                f"cannot update the comparison: its {key} is {shown(getattr(previous, key))!r}, this run's is "
                f"{shown(value)!r}; rerun every method (without --update) or use the same settings"
            )


def update(previous: Comparison, result: Comparison) -> Comparison:
    """``previous`` with the rows of ``result``'s methods replaced by ``result``'s (same model and data).

    Each row keeps the pruning-time ratio of its own run; the header's forward pass is the latest run's.
    """
    check_setup(previous, result.setup())
    fresh = {row.method for row in result.rows}
    fresh_keys = {row.key for row in result.rows}
    rows = [row for row in previous.rows if row.key not in fresh_keys] + result.rows
    earlier = {row.method: previous.forward_pass_seconds for row in previous.rows}
    earlier.update(previous.earlier_forward_pass_seconds or {})
    kept = {m: s for m, s in earlier.items() if m not in fresh}
    return dataclasses.replace(result, rows=rows, earlier_forward_pass_seconds=kept)


def _without_none(data: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


def _build(cls: Any, data: dict[str, Any], what: str) -> Any:
    """``cls(**data)``, refusing a key the record does not have (it would be lost on the next write)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidOptionError(
            f"not a comparison miprun can read: its {what} has {', '.join(unknown)}, which this version does "
            "not know; rerun the comparison (without --update)"
        )
    try:
        return cls(**data)
    except TypeError as err:
        raise InvalidOptionError(f"not a comparison miprun can read: its {what}: {err}") from err
