"""What one scoring run produced, and its file format (``miprun score --json FILE``).

A :class:`ScoreResult` holds the MI span table (when an estimator ran), the evidence each method measured
(cosine matrices, the SLEB path, one-shot losses), and enough about the model and the calibration text to
refuse reusing it for anything else. Files are strict JSON, checked on load: finite, in range, complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miprun.errors import ScoresError
from miprun.estimators import Estimator
from miprun.estimators.table import ScoreTable
from miprun.model.identity import ModelInfo
from miprun.scores.evidence import EVIDENCE_TYPES

SCORES_KIND = "miprun-scores"
SCORES_VERSION = 2  # 1: baselines kept raw cosine sums under "baselines"


@dataclass
class CalibrationInfo:
    """Which text the scores came from, exactly enough to detect a mismatch later."""

    source: str
    fingerprint: str  # hash of the source text
    windows_fingerprint: str  # hash of the token windows actually used
    num_windows: int
    seq_len: int
    seed: int
    tokens: int
    exclude_first_token: bool = False


@dataclass
class ScoreResult:
    """Scores of every block and span (when an estimator ran) and every method's evidence, with provenance."""

    calibration: CalibrationInfo
    model: ModelInfo
    table: ScoreTable | None = None
    estimator: Estimator | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # key -> object with to_json()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": SCORES_KIND,
            "version": SCORES_VERSION,
            "model": self.model.to_json(),
            "estimator": self.estimator.params() if self.estimator is not None else None,
            "calibration": asdict(self.calibration),
            "scores": self.table.to_json() if self.table is not None else None,
            "evidence": {key: value.to_json() for key, value in sorted(self.evidence.items())},
            "timings": self.timings,
        }

    def write(self, path: str | Path) -> None:
        """Write strict JSON atomically (floats as their exact repr): a crash never leaves half a file.

        Never over the calibration text or into the model folder the scores were computed from.
        """
        from miprun.atomic import check_results_file, write_json

        check_results_file(path, [self.model.path, self.calibration.source])
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> ScoreResult:
        """Read and check a scores file; any problem is a :class:`~miprun.errors.ScoresError` that says what to do."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_reject_constant)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ScoresError(
                f"cannot read scores file {path}: {err}. Expected the JSON written by "
                "`miprun score --json FILE`; re-create it with that command"
            ) from err
        if not isinstance(data, dict) or data.get("kind") != SCORES_KIND:
            raise ScoresError(
                f"{path} is not a miprun scores file (write one with `miprun score --json FILE`)"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ScoresError(
                f"{path} is an incomplete, invalid or incompatible miprun scores file ({err}); "
                "re-create it with `miprun score --json FILE`"
            ) from err

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScoreResult:
        from miprun import estimators

        est = data.get("estimator")
        estimator = None
        if est is not None:
            params = dict(est)
            estimator = estimators.build(params.pop("name"), params)
        evidence = {k: EVIDENCE_TYPES.get(k).from_json(v) for k, v in (data.get("evidence") or {}).items()}
        evidence.update(_version1_evidence(data.get("baselines")))
        result = cls(
            calibration=CalibrationInfo(**data["calibration"]),
            model=ModelInfo.from_json(data["model"]),
            table=ScoreTable.from_json(data["scores"]) if data.get("scores") is not None else None,
            estimator=estimator,
            evidence=evidence,
            timings=dict(data.get("timings") or {}),
        )
        if result.table is not None and result.table.num_blocks != result.num_blocks:
            raise ScoresError(
                f"the scores cover {result.table.num_blocks} blocks but the model has {result.num_blocks}"
            )
        return result


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (a scores file holds finite numbers only)")


def _version1_evidence(baselines: dict[str, Any] | None) -> dict[str, Any]:
    """Evidence from a version-1 file's ``baselines``, each converted by its class (raw cosine sums become
    mean matrices)."""
    out: dict[str, Any] = {}
    for key, raw in (baselines or {}).items():
        if not raw:
            continue
        cls: Any = EVIDENCE_TYPES.get(key)
        value = cls.from_version1(raw) if hasattr(cls, "from_version1") else cls(**raw)
        if value is not None:
            out[key] = value
    for key, value in out.items():
        losses = getattr(value, "losses", [])
        if any(not math.isfinite(float(x)) for x in losses):
            raise ScoresError(f"the {key} losses in the scores file are not finite")
    return out
