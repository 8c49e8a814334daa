"""The pruning plan: a typed, strict-JSON record written beside the checkpoint as ``miprun.json``.

It holds everything needed to understand and re-apply a pruning run: removed blocks (0-based, original
numbering), the method, estimator and repair settings, every score, the calibration data fingerprint,
package versions and the time of each phase. Its ``kind`` marks a folder as miprun's own output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miprun.errors import ScoresError
from miprun.methods.base import SearchInfo
from miprun.model.identity import ModelInfo
from miprun.repair.base import RepairRecord
from miprun.repair.heal_report import HealReport
from miprun.scores.result import CalibrationInfo
from miprun.versions import package_versions

MANIFEST_NAME = "miprun.json"
MANIFEST_KIND = "miprun-plan"
SCHEMA_VERSION = 2  # 2: kind, repair, optional MI fields (baselines no longer capture MI)


@dataclass
class HeldoutEvaluation:
    """Held-out perplexity of one run: the dense model, the plain cut (when a repair follows), the result.

    ``heal`` fills ``healed_ppl`` (its ``pruned_ppl`` is the model before healing); the JSON leaves out what
    was not measured, as the manifest always has.
    """

    source: str
    windows: int
    seq_len: int
    dense_ppl: float
    fingerprint: str | None = None
    cut_ppl: float | None = None
    pruned_ppl: float | None = None
    healed_ppl: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HeldoutEvaluation | None:
        return cls(**data) if data else None


@dataclass
class HealRecord:
    """What ``miprun heal`` did after the cut. The manifest keeps it flat under ``heal``: the training
    report's fields beside the teacher, the time of each phase and the held-out evaluation."""

    report: HealReport
    teacher: str
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: HeldoutEvaluation | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.report.to_json(),
            "teacher": self.teacher,
            "timings": self.timings,
            "evaluation": self.evaluation.to_json() if self.evaluation is not None else {},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HealRecord | None:
        if not data:
            return None
        report = {k: v for k, v in data.items() if k not in ("teacher", "timings", "evaluation")}
        return cls(
            HealReport.from_json(report),
            data["teacher"],
            dict(data.get("timings") or {}),
            HeldoutEvaluation.from_json(data.get("evaluation")),
        )


@dataclass
class PrunePlan:
    """The record of one pruning run."""

    model: ModelInfo  # name, path, model_type, number of blocks, content fingerprint
    num_blocks_before: int
    removed: list[int]
    calibration: CalibrationInfo
    search: SearchInfo
    estimator: dict[str, Any] | None = None  # None for methods that read no MI
    scores: dict[str, Any] | None = None  # ScoreTable.to_json() when an MI table was computed
    repair: RepairRecord = field(default_factory=lambda: RepairRecord("none"))
    heal: HealRecord | None = None  # what `miprun heal` did after the cut, if it ran
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: HeldoutEvaluation | None = None  # with --eval
    outputs: list[str] = field(default_factory=list)  # files of the checkpoint besides the manifest
    versions: dict[str, str] = field(default_factory=package_versions)
    schema_version: int = SCHEMA_VERSION
    kind: str = MANIFEST_KIND

    @property
    def num_blocks_after(self) -> int:
        return self.num_blocks_before - len(self.removed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_json()
        data["heal"] = self.heal.to_json() if self.heal is not None else None
        data["num_blocks_after"] = self.num_blocks_after
        data["evaluation"] = self.evaluation.to_json() if self.evaluation is not None else {}
        return data

    def write(self, path: Path) -> None:
        """Strict JSON (no NaN or Infinity), written atomically."""
        from miprun.atomic import write_json

        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> PrunePlan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            data.pop("num_blocks_after", None)
            data["model"] = ModelInfo.from_json(data["model"])
            data["heal"] = HealRecord.from_json(data.get("heal"))
            data["calibration"] = CalibrationInfo(**data["calibration"])
            data["search"] = SearchInfo(**data["search"])
            data["repair"] = RepairRecord(**(data.get("repair") or {"name": "none"}))
            data["evaluation"] = HeldoutEvaluation.from_json(data.get("evaluation"))
            data.setdefault("kind", MANIFEST_KIND)
            return cls(**data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ScoresError(
                f"cannot read the pruning plan {path}: {err}. Expected the miprun.json that `miprun prune` writes"
            ) from err
