"""``miprun.json`` is a typed record that reads and writes the JSON manifests already on disk have: the model's
identity and the heal step are dataclasses, written flat as before."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from paths import RESULTS

from miprun.model.identity import ModelInfo
from miprun.options import HealConfig
from miprun.output.manifest import HealRecord, HeldoutEvaluation, PrunePlan
from miprun.repair.heal_report import HealReport

PUBLISHED = sorted(RESULTS.glob("**/*miprun.json"))


def test_there_are_published_manifests() -> None:
    assert PUBLISHED, f"no miprun.json under {RESULTS}"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_published_manifest_reads_typed_and_writes_back_the_same_json(path: Path) -> None:
    plan = PrunePlan.read(path)
    assert isinstance(plan.model, ModelInfo) and plan.model.num_blocks == plan.num_blocks_before
    assert plan.to_json() == json.loads(path.read_text())


def _healed_plan(path: Path) -> PrunePlan:
    """A published plan, healed as ``miprun heal`` records it."""
    report = HealReport(
        steps=3,
        tokens=1536,
        seconds=2.5,
        cpu_seconds=4.0,
        loss_start=0.9,
        loss_end=0.4,
        resumed=True,
        resumed_at_step=2,
        config=HealConfig(tokens=1536, rank=4),
        target_modules=["q_proj", "down_proj"],
        losses=[0.9, 0.6, 0.4],
    )
    evaluation = HeldoutEvaluation("wiki", 4, 64, dense_ppl=20.0, pruned_ppl=30.0, healed_ppl=25.0)
    return dataclasses.replace(
        PrunePlan.read(path), heal=HealRecord(report, "dense-model", {"heal": 2.5}, evaluation)
    )


def test_the_heal_record_is_written_flat_as_before_and_reads_back_equal(tmp_path: Path) -> None:
    plan = _healed_plan(PUBLISHED[0])
    written = plan.to_json()["heal"]
    # the layout earlier manifests have: the report's fields beside the teacher, timings and evaluation
    assert written["teacher"] == "dense-model" and written["steps"] == 3 and written["config"]["rank"] == 4
    assert written["evaluation"] == {
        "source": "wiki",
        "windows": 4,
        "seq_len": 64,
        "dense_ppl": 20.0,
        "pruned_ppl": 30.0,
        "healed_ppl": 25.0,
    }
    path = tmp_path / "miprun.json"
    plan.write(path)
    again = PrunePlan.read(path)
    assert again == plan and isinstance(again.heal, HealRecord) and again.heal.report.config.rank == 4
    assert json.loads(path.read_text()) == plan.to_json()


def test_a_heal_record_without_an_evaluation_round_trips(tmp_path: Path) -> None:
    plan = _healed_plan(PUBLISHED[0])
    plan.heal = dataclasses.replace(plan.heal, evaluation=None)
    assert plan.to_json()["heal"]["evaluation"] == {}  # what heal without --eval has always written
    path = tmp_path / "miprun.json"
    plan.write(path)
    assert PrunePlan.read(path) == plan
