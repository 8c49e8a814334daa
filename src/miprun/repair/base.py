"""What a repair is: a step between selection and surgery that edits the kept weights to make up for the cut.

A repair may ask the calibration pass for statistics (:meth:`Repair.statistics`, captured in one extra
pass once the removed blocks are known), fits its edits (:meth:`Repair.fit`), and folds them into existing
weights (:meth:`Repair.apply`) so the output stays a stock checkpoint. What it did is recorded as a
:class:`RepairRecord` in ``miprun.json``, so :func:`miprun.apply_plan` can replay it or refuse clearly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.options import CalibrationConfig
from miprun.registry import Registry


@dataclass
class RepairContext:
    """What a repair may use: the dense model (not yet cut), the blocks to remove and its captured statistics."""

    model: nn.Module
    removed: list[int]  # 0-based, original numbering
    stats: CapturedStats | None = None
    windows: torch.Tensor | None = None  # the calibration token ids its statistics were captured on
    progress: bool = False
    check: torch.Tensor | None = None  # calibration windows left out of the statistics, to check the fit on
    # how ``windows`` are batched and sampled (None: the defaults)
    calibration: CalibrationConfig | None = None
    measuring: bool = False  # a fit for a method's measurement of a candidate set: skip any extra passes


@dataclass
class RepairRecord:
    """What a repair did, for the manifest: its name and parameters, per-run details, and what it changed."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # per removed run: how it was repaired
    changed: list[str] = field(default_factory=list)  # parameter names (original numbering) it edited
    tokens: int = 0  # calibration tokens its fit read
    seconds: float = 0.0
    replay: str = "none"  # how apply_plan repeats it: "none" (nothing to do) or "refit" (needs calibration)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Repair(ABC):
    """A named repair; subclasses are dataclasses whose fields are its hyperparameters."""

    name: ClassVar[str]
    summary: ClassVar[str]
    changes_weights: ClassVar[bool] = True  # False: the cut alone (no fit, no extra pass, nothing to replay)

    def statistics(self, model: nn.Module, removed: list[int]) -> list[Statistic]:
        """What the repair's calibration pass must record for this removal set (none: no extra pass)."""
        return []

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this repair cannot repair ``model``, or None where it can: a repair that changes weights
        cannot edit weights offloaded to disk (accelerate keeps them on the meta device between passes)."""
        if self.changes_weights and any(p.device.type == "meta" for p in model.parameters()):
            return (
                "some weights are offloaded to disk (device_map), and a repair edits weights in place; load the "
                "model on CPU or GPU memory, or use --repair none"
            )
        return None

    def calibration(self, cal: CalibrationConfig) -> CalibrationConfig:
        """The windows of the repair's own pass (by default the scoring windows)."""
        return cal

    def split(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The windows its statistics are captured on, and those left out for it to check its fit on (none)."""
        return windows, None

    @abstractmethod
    def fit(self, ctx: RepairContext) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        """New values of the parameters it edits (by name, original numbering) and the record of what it did."""

    def apply(self, model: nn.Module, edits: dict[str, torch.Tensor]) -> None:
        """Fold the fitted edits into the model's weights in place (before the blocks are removed)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in edits.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def example(cls) -> Repair:
        """A small instance for the registry-wide contract tests (tests/test_contracts.py) on a tiny model:
        the defaults, unless a plugin's defaults need more than a tiny model holds."""
        return cls()


# Every repair by name: a class registers itself with ``@REGISTRY.register`` (its ``name`` is the key).
REGISTRY: Registry[type[Repair]] = Registry("repair")
