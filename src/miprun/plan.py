"""The pruning plan: a typed, JSON-serialisable record written beside the checkpoint as ``miprun.json``.

It holds everything needed to understand and re-apply a pruning run: removed blocks (0-based, original
numbering), the method and estimator settings, every score, the calibration data fingerprint, package
versions and the time of each phase.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "miprun.json"
SCHEMA_VERSION = 1


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the result."""
    out = {"python": platform.python_version()}
    for name in ("miprun", "torch", "transformers", "accelerate", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


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
class SearchInfo:
    """How the selection went, and how far it lands from the exact optimum of the set objective."""

    method: str
    num_evaluations: int  # span MI values (single blocks included), scores read, or forward passes
    loss: float  # set loss (spec 5.1) of the chosen blocks
    optimal_loss: float | None = None
    optimal_removed: list[int] | None = None
    gap: float | None = None  # loss - optimal_loss (>= 0)
    iterations: int = 0
    stop_reason: str = ""
    history: list[list[int]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the method's own time, including the span MI it computed
    optimum_seconds: float = 0.0  # time to compute the optimum for comparison (every span)


@dataclass
class PrunePlan:
    """The record of one pruning run."""

    model: dict[str, Any]  # name, path, model_type, content fingerprint
    num_blocks_before: int
    removed: list[int]
    estimator: dict[str, Any]
    calibration: CalibrationInfo
    search: SearchInfo
    scores: dict[str, Any]  # ScoreTable.to_json()
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_blocks_after(self) -> int:
        return self.num_blocks_before - len(self.removed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_blocks_after"] = self.num_blocks_after
        return data

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> PrunePlan:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data.pop("num_blocks_after", None)
        data["calibration"] = CalibrationInfo(**data["calibration"])
        data["search"] = SearchInfo(**data["search"])
        return cls(**data)
