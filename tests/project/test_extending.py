"""The worked examples of docs/architecture.md, run for real: a new statistic, a new method reading it,
and a new repair, each one class plus one registry line, going through the whole pipeline."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
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
class Growth:
    """The evidence a scores file keeps for it (to_json / from_json), and shows in `miprun score` (columns)."""

    values: list[float]

    def columns(self, key: str) -> dict[str, list[float]]:
        return {"norm growth": self.values}

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Growth:
        return cls(list(data["values"]))


@dataclass
class NormGrowth(Method):
    """Remove the blocks that grow the residual stream's norm least."""

    name: ClassVar[str] = "norm-growth"
    summary: ClassVar[str] = "the N blocks whose output norm grows least over their input's"
    evidence_types: ClassVar[dict[str, type]] = {"norm_growth": Growth}

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


PLUGINS = [(statistics.REGISTRY, NormSums), (methods.REGISTRY, NormGrowth), (repair.REGISTRY, ScaleNext)]


def register_plugins() -> None:
    """The one line each gets in its own module (``@REGISTRY.register`` above the class), as calls."""
    for registry, cls in PLUGINS:
        registry.register(cls)


@pytest.fixture
def registered():
    """The three plugins registered through the public API, and unregistered after the test."""
    register_plugins()
    yield
    for registry, cls in PLUGINS:
        registry.remove(cls.name)


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


def test_the_new_plugins_run_layer_by_layer_as_they_run_on_the_whole_model(registered, tiny_tokenizer):
    cal = CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24)
    plans = [
        miprun.prune(
            LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None),
            num_blocks=2,
            method="norm-growth",
            repair="scale-next",
            repair_params={"factor": "0.5"},
            sequential=sequential,
            calibration=cal,
            cache=False,
            progress=False,
        ).plan
        for sequential in (False, True)
    ]
    whole, layerwise = plans
    assert layerwise.removed == whole.removed and layerwise.repair.changed == whole.repair.changed
    assert layerwise.search.params["scores"] == pytest.approx(whole.search.params["scores"], rel=1e-5)


def test_the_new_method_and_repair_are_compared_with_no_other_change(registered, tiny_tokenizer):
    from miprun.options import CompareOptions, HeldoutOptions
    from miprun.pipeline.compare import compare

    assert "norm-growth" in methods.default_comparison()  # it says it belongs there; nothing else lists it
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["norm-growth", "last-n"],
        repairs=["none", "scale-next"],
        repair_params={"factor": "0.5"},
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24),
        heldout=HeldoutOptions(eval_source=str(CALIBRATION_TXT), eval_samples=2, eval_seq_len=24),
        forward_repeats=1,
        progress=False,
    )
    result = compare(LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None), options)
    rows = {(r.method, r.repair, r.num_blocks): r for r in result.rows}
    assert len(rows) == 8
    for n in (1, 2):
        plain, fixed = rows[("norm-growth", "none", n)], rows[("norm-growth", "scale-next", n)]
        assert (
            plain.removed == fixed.removed and len(plain.removed) == n
        )  # the repair does not change the choice
        assert fixed.repair_record["params"] == {"factor": 0.5} and fixed.ppl != plain.ppl


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama")[0].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _prune_args(model: Path, out: Path) -> list[str]:
    return [
        "prune", "--model", str(model), "--calib", str(CALIBRATION_TXT), "-n", "2", "--out", str(out),
        "--samples", "6", "--seq-len", "24", "--batch-size", "2", "--method", "norm-growth",
        "--repair", "scale-next", "--repair-opt", "factor=0.5", "--no-cache", "--quiet", "--device", "cpu",
    ]  # fmt: skip


def test_the_new_plugins_work_from_the_command_line(registered, tiny_folder, tmp_path, capsys):
    from miprun.cli import main

    assert main(["prune", "--help"]) == 0
    help_text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(capsys.readouterr().out.split()))  # undo wraps
    assert "norm-growth: the N blocks whose output norm grows least" in help_text  # from its own summary
    assert "scale-next: multiply block a-1's MLP output projection" in help_text
    assert main(_prune_args(tiny_folder, tmp_path / "out")) == 0
    plan = json.loads((tmp_path / "out" / "miprun.json").read_text())
    assert plan["search"]["method"] == "norm-growth" and plan["repair"]["params"] == {"factor": 0.5}
    capsys.readouterr()
    score = ["score", "--model", str(tiny_folder), "--calib", str(CALIBRATION_TXT), "--samples", "4"]
    score += [
        "--seq-len",
        "24",
        "--method",
        "norm-growth",
        "--no-cache",
        "--quiet",
        "--out",
        str(tmp_path / "s.json"),
    ]
    assert main(score) == 0
    assert "norm growth" in capsys.readouterr().out  # the evidence's own column in the score table
    compare = ["compare", "--model", str(tiny_folder), "--calib", str(CALIBRATION_TXT), "--samples", "4"]
    compare += [
        "--seq-len",
        "24",
        "--eval-text",
        str(CALIBRATION_TXT),
        "--eval-samples",
        "2",
        "--eval-seq-len",
        "24",
    ]
    compare += [
        "-n",
        "1,2",
        "--methods",
        "norm-growth",
        "--repairs",
        "none,scale-next",
        "--repair-opt",
        "factor=0.5",
    ]
    compare += ["--sequential", "--forward-repeats", "1", "--quiet", "--out", str(tmp_path / "cmp")]
    assert main(compare) == 0
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert {(r["method"], r["repair"], r["num_blocks"]) for r in rows} == {
        ("norm-growth", repair_name, n) for repair_name in ("none", "scale-next") for n in (1, 2)
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One torchrun-like rank running `miprun prune` with the new plugins (registered before the fork)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from accelerate import PartialState

    from miprun.capture import distributed
    from miprun.cli import main

    PartialState._reset_state()  # forked from a process that may have made its own single-process state
    assert distributed.is_distributed()
    code = main(_prune_args(Path(folder) / "tiny-llama", Path(folder) / "dp"))
    (Path(folder) / f"rank{rank}.rc").write_text(str(code))


def test_the_new_plugins_run_data_parallel_and_choose_what_one_process_chooses(registered, tiny_folder):
    import torch.multiprocessing as mp

    from miprun.cli import main

    folder = tiny_folder.parent
    # fork: the ranks inherit the registrations (and torch, already imported)
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(folder)), nprocs=2, start_method="fork")
    assert [(folder / f"rank{r}.rc").read_text() for r in range(2)] == ["0", "0"]
    assert main(_prune_args(tiny_folder, folder / "single")) == 0
    one = json.loads((folder / "single" / "miprun.json").read_text())
    two = json.loads((folder / "dp" / "miprun.json").read_text())
    assert two["removed"] == one["removed"] and two["calibration"]["tokens"] == one["calibration"]["tokens"]
    assert two["search"]["params"]["scores"] == pytest.approx(one["search"]["params"]["scores"], rel=1e-5)
    assert two["repair"]["changed"] == one["repair"]["changed"]
