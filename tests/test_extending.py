"""The worked examples of docs/architecture.md, run for real: a new statistic, a new method reading it,
and a new repair, each one class plus one registry line, going through the whole pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import tiny_model

import miprun
from miprun import methods, repair
from miprun.capture import statistics
from miprun.capture.statistic import BatchInfo, Statistic, Tap
from miprun.methods.base import Choice, Evidence, GatherContext, Method
from miprun.methods.similarity import lowest
from miprun.model.layouts import decoder_layers
from miprun.model.loading import LoadedModel
from miprun.options import CalibrationConfig
from miprun.repair.base import Repair, RepairContext, RepairRecord

pytestmark = pytest.mark.integration


# --- docs/architecture.md, "A new statistic" ------------------------------------------------------------
@dataclass
class NormSums(Statistic):
    """Sum over tokens of each state's L2 norm: how much each block grows the residual stream."""

    name: ClassVar[str] = "norms"
    total: torch.Tensor | None = field(default=None, init=False)
    count: int = field(default=0, init=False)

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return h.norm(dim=-1)  # (tokens,): reduced as soon as the tap is seen

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        sums = torch.stack(parts).sum(1, dtype=torch.float64)  # (states,)
        self.total = sums if self.total is None else self.total + sums
        self.count += parts[0].shape[0]

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, NormSums) and other.total is not None
        self.total = other.total.clone() if self.total is None else self.total + other.total
        self.count += other.count


# --- "A new method" ---------------------------------------------------------------------------------------
@dataclass
class NormGrowth(Method):
    """Remove the blocks that grow the residual stream's norm least."""

    name: ClassVar[str] = "norm-growth"
    summary: ClassVar[str] = "the N blocks whose output norm grows least over their input's"
    evidence_keys: ClassVar[tuple[str, ...]] = ("norm_growth",)

    def statistics(self) -> list[Statistic]:
        return [NormSums()]

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        norms = ctx.stats.get(NormSums(), self.name)
        mean = (norms.total / norms.count).tolist()
        return {"norm_growth": Growth([mean[i + 1] / mean[i] for i in range(len(mean) - 1)])}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        growth = evidence.require("norm_growth", self.name).values
        return Choice(
            lowest(growth, n), len(growth), stop_reason="least norm growth", record={"scores": growth}
        )


@dataclass
class Growth:
    """The evidence a scores file keeps for it (to_json / from_json)."""

    values: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Growth:
        return cls(list(data["values"]))


# --- "A new repair" ---------------------------------------------------------------------------------------
@dataclass
class ScaleNext(Repair):
    """Scale the MLP output projection of the block before each removed run by a constant."""

    name: ClassVar[str] = "scale-next"
    summary: ClassVar[str] = "multiply block a-1's MLP output projection by `factor`"
    factor: float = 1.0

    def fit(self, ctx: RepairContext) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        from miprun.methods.search import runs

        edits = {}
        for a, _b in runs(ctx.removed):
            if a > 0:
                weight = decoder_layers(ctx.model)[a - 1].mlp.down_proj.weight
                name = next(n for n, p in ctx.model.named_parameters() if p is weight)
                edits[name] = weight.detach() * self.factor
        record = RepairRecord(self.name, self.params(), changed=sorted(edits), replay="refit")
        return edits, record


@pytest.fixture
def registered(monkeypatch):
    """The three registry lines (undone after the test)."""
    for registry, name, entry in [
        (statistics.REGISTRY, "norms", NormSums),
        (methods.REGISTRY, "norm-growth", NormGrowth),
        (methods.EVIDENCE, "norm_growth", Growth),
        (repair.REGISTRY, "scale-next", ScaleNext),
    ]:
        monkeypatch.setitem(registry._entries, name, entry)


def test_a_new_statistic_method_and_repair_run_through_the_pipeline(registered, tiny_tokenizer, tmp_path):
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    cal = CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24)
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="norm-growth",
        repair="scale-next",
        repair_params={"factor": "0.5"},  # typed from a string, as --repair-opt factor=0.5 gives it
        calibration=cal,
        out=tmp_path / "out",
        progress=False,
    )
    plan = result.plan
    assert plan.search.method == "norm-growth" and len(plan.search.params["scores"]) == 6
    assert plan.repair.name == "scale-next" and plan.repair.params == {"factor": 0.5}
    assert plan.repair.changed  # the block before the run was edited
    # ... and a scores file keeps the new method's evidence (prune cut `lm` in place: score a fresh copy)
    fresh = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    scores = miprun.score(fresh, calibration=cal, method="norm-growth", cache=False, progress=False)
    path = tmp_path / "scores.json"
    scores.write(path)
    assert miprun.select(miprun.scores.ScoreResult.read(path), 2, method="norm-growth")[0] == plan.removed
    with pytest.raises(ValueError, match="changed 1 weights that the plan does not hold"):
        miprun.apply_plan(tiny_model("llama")[0], tmp_path / "out" / "miprun.json")
