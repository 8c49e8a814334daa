"""The identity repair: cut and change nothing else (what every depth-pruning method did before repairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from miprun.repair.base import REGISTRY, Repair, RepairContext, RepairRecord


@REGISTRY.register
@dataclass
class NoRepair(Repair):
    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "cut only: no weight is changed"
    changes_weights: ClassVar[bool] = False

    def fit(self, ctx: RepairContext) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        return {}, RepairRecord(self.name)
