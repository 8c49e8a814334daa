"""The damage oracle and `miprun compare` on a tiny model."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model

from miprun import repair
from miprun.errors import InvalidOptionError, UnknownNameError
from miprun.evaluation.compare import compare, markdown, update, write
from miprun.evaluation.oracle import DamageOracle, spearman
from miprun.model.identity import model_fingerprint
from miprun.model.loading import LoadedModel
from miprun.model.perplexity import perplexity
from miprun.model.surgery import remove_blocks, skip_blocks
from miprun.options import CalibrationConfig, CompareOptions, EstimatorOptions, HeldoutOptions, with_overrides
from miprun.repair import Repair, RepairContext, RepairRecord

IDS = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # average ranks for ties


@pytest.mark.integration
def test_oracle_equals_the_perplexity_of_the_pruned_model(tmp_path):
    model, _ = tiny_model("qwen2")
    oracle = DamageOracle(model, IDS, cache_path=tmp_path / "oracle.json")
    pruned = remove_blocks(copy.deepcopy(model), [1, 4])
    assert oracle([4, 1]) == pytest.approx(perplexity(pruned, IDS), rel=1e-6)
    assert oracle.dense == pytest.approx(perplexity(model, IDS), rel=1e-6)
    window, ppl = oracle.best_window(6, 2)
    assert (
        len(window) == 2 and window[1] == window[0] + 1 and ppl == min(oracle((a, a + 1)) for a in range(5))
    )
    reloaded = DamageOracle(model, IDS, cache_path=tmp_path / "oracle.json")  # resumes from the file
    assert reloaded.ppl == oracle.ppl
    # measure(): the model as it is now, never memoised (a repaired model differs from the plain cut)
    with skip_blocks(model, [1, 4]):
        assert oracle.measure() == pytest.approx(oracle([1, 4]), rel=1e-9)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    assert oracle.measure() != pytest.approx(oracle.dense, rel=1e-3)
    assert oracle(()) == reloaded.dense  # the memo still holds the untouched model's value


def result_windows(tokenizer) -> torch.Tensor:
    """The held-out windows compare evaluates on (2 x 24 tokens of the evaluation split)."""
    from miprun.evaluation.heldout import heldout_windows

    return heldout_windows(tokenizer, str(HELDOUT_TXT), 24, 2)[1]


@pytest.mark.integration
def test_compare_runs_every_method_and_writes_outputs(tiny_tokenizer, tmp_path):
    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["mi-prun", "shortgpt", "angular", "last-n"],
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24),
        estimation=EstimatorOptions(estimator="gaussian", estimator_params={"proj_dim": 16}),
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=24),
        forward_repeats=1,
        progress=False,
    )
    result = compare(loaded, options)
    assert len(result["rows"]) == 8 and result["forward_pass_seconds"] > 0
    oracle = DamageOracle(model, result_windows(tiny_tokenizer))
    assert result["dense_ppl"] == pytest.approx(oracle.dense, rel=1e-9)
    for row in result["rows"]:
        assert len(row["removed"]) == row["num_blocks"] and row["ppl"] > 0 and row["prune_x_forward"] > 0
        assert row["repair"] == "none" and row["ppl"] == pytest.approx(oracle(row["removed"]), rel=1e-9)
        # only the MI method records its estimator
        want = {"name": "gaussian", "proj_dim": 16, "shrinkage": 0.05, "normalize": False}
        assert row["estimator"] == (want if row["method"] == "mi-prun" else None)
    rows = {(r["method"], r["num_blocks"]): r["removed"] for r in result["rows"]}
    assert rows[("last-n", 1)] == [4] and rows[("last-n", 2)] == [3, 4]  # deepest but the final block
    angular = rows[("angular", 2)]
    assert angular[1] == angular[0] + 1
    paths = write(result, tmp_path / "cmp")
    assert {p.name for p in paths} >= {
        "comparison.json",
        "comparison.md",
        "comparison_ppl.png",
        "comparison_time.png",
    }
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["model"] == "tiny-llama"
    assert "| shortgpt | 2 |" in markdown(result)


@pytest.mark.integration
def test_update_replaces_only_the_rerun_methods_and_refuses_other_data(tiny_tokenizer):
    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["shortgpt", "last-n"],
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=2, seq_len=16),
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=16),
        forward_repeats=1,
        progress=False,
    )
    first = compare(loaded, options)
    second = compare(loaded, with_overrides(options, methods=["last-n", "random"]))
    merged = update(first, second)
    assert sorted((r["method"], r["num_blocks"]) for r in merged["rows"]) == [
        ("last-n", 1),
        ("last-n", 2),
        ("random", 1),
        ("random", 2),
        ("shortgpt", 1),
        ("shortgpt", 2),
    ]
    assert [r for r in merged["rows"] if r["method"] == "last-n"] == [
        r for r in second["rows"] if r["method"] == "last-n"
    ]
    assert merged["earlier_forward_pass_seconds"] == {"shortgpt": first["forward_pass_seconds"]}
    assert "The rows of shortgpt come from an earlier run and are timed against its forward" in markdown(
        merged
    )
    other = compare(loaded, with_overrides(options, methods=["last-n"], samples=3))
    with pytest.raises(ValueError, match="cannot update the comparison: its calibration"):
        update(first, other)


@pytest.mark.integration
def test_update_reuses_the_dense_and_cut_only_task_results_it_already_has(tiny_tokenizer, monkeypatch):
    import miprun.evaluation.compare as cmp

    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    evaluated: list[tuple[int, ...]] = []

    def tasks(_loaded, removed, _opts):  # lm-eval's place: records which models were evaluated
        evaluated.append(tuple(sorted(removed)))
        return {"social_iqa": {"acc_norm": 0.5 + 0.01 * len(evaluated)}}

    monkeypatch.setattr(cmp, "_tasks", tasks)
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["last-n"],
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=2, seq_len=16),
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=16),
        tasks=["social_iqa"],
        forward_repeats=1,
        progress=False,
    )
    first = compare(loaded, options)
    assert evaluated == [(), (4,), (3, 4)]  # dense, then last-n's two sets
    first["rows"].append({**first["rows"][0], "repair": "linear", "tasks": {"social_iqa": {"acc_norm": 0.9}}})
    known = cmp.known_task_results(first)
    assert set(known) == {((), "none"), ((4,), "none"), ((3, 4), "none")}  # a repaired result is not reused

    evaluated.clear()
    second = compare(loaded, with_overrides(options, methods=["last-n", "random"]), known)
    fresh = {tuple(sorted(r["removed"])) for r in second["rows"] if r["method"] == "random"} - {(4,), (3, 4)}
    assert sorted(evaluated) == sorted(fresh)  # only the sets never evaluated before
    assert second["dense_tasks"] == first["dense_tasks"]
    by_set = {tuple(sorted(r["removed"])): r["tasks"] for r in first["rows"] if r.get("repair") == "none"}
    for row in second["rows"]:
        if row["method"] == "last-n":
            assert row["tasks"] == by_set[tuple(sorted(row["removed"]))]


@pytest.mark.integration
def test_update_refuses_other_tasks_before_running_anything(tiny_tokenizer, tmp_path, monkeypatch):
    import miprun.evaluation.compare as cmp

    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    previous = {"model": "tiny-llama", "num_blocks_total": 6, "tasks": ["social_iqa"], "task_limit": 5}
    earlier = tmp_path / "cmp"
    earlier.mkdir()
    (earlier / "comparison.json").write_text(json.dumps({**previous, "kind": "miprun-comparison"}))
    monkeypatch.setattr(cmp, "as_loaded", lambda *a, **k: loaded)
    monkeypatch.setattr(cmp, "compare", lambda *a, **k: pytest.fail("compared before checking the setup"))
    with pytest.raises(ValueError, match=r"cannot update the comparison: its tasks is \['social_iqa'\]"):
        cmp.run("tiny-llama", earlier, CompareOptions(tasks=[]), update_existing=True)
    with pytest.raises(InvalidOptionError, match="--update needs an earlier comparison in"):
        cmp.run("tiny-llama", tmp_path / "elsewhere", update_existing=True)


def test_compare_checks_names_before_loading_anything(tmp_path, monkeypatch):
    import miprun.evaluation.compare as cmp

    monkeypatch.setattr(cmp, "as_loaded", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UnknownNameError, match="Did you mean 'shortgpt'"):
        cmp.run("tiny-llama", tmp_path, methods=["shortgtp"])
    with pytest.raises(UnknownNameError, match="unknown repair 'lineer'"):
        cmp.run("tiny-llama", tmp_path, repairs=["none", "lineer"])
    with pytest.raises(InvalidOptionError, match=r"num_blocks \(--num-blocks\) must be positive"):
        cmp.run("tiny-llama", tmp_path, num_blocks=[2, 0])
    with pytest.raises(InvalidOptionError, match=r"unknown option 'task_limit'.*Did you mean 'limit'"):
        cmp.run("tiny-llama", tmp_path, task_limit=3)


@dataclass
class HalveFinalNorm(Repair):
    """A stand-in repair that needs no statistics: it halves the final norm's weight."""

    name: ClassVar[str] = "halve-final-norm"
    summary: ClassVar[str] = "test only"

    def fit(self, ctx: RepairContext) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        weight = ctx.model.model.norm.weight
        return {"model.norm.weight": 0.5 * weight.detach()}, RepairRecord(
            self.name, changed=["model.norm.weight"]
        )


@pytest.mark.integration
def test_compare_evaluates_each_repair_and_leaves_the_model_as_it_was(tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(repair.REGISTRY._entries, HalveFinalNorm.name, HalveFinalNorm)
    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    before = model_fingerprint(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["last-n"],
        repairs=["none", HalveFinalNorm.name],
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24),
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=24),
        forward_repeats=1,
        progress=False,
    )
    result = compare(loaded, options)
    assert sorted((r["num_blocks"], r["removed"], r["repair"]) for r in result["rows"]) == sorted(
        [
            (1, [4], "none"),
            (1, [4], HalveFinalNorm.name),
            (2, [3, 4], "none"),
            (2, [3, 4], HalveFinalNorm.name),
        ]
    )
    oracle = DamageOracle(model, result_windows(tiny_tokenizer))
    for row in result["rows"]:
        if row["repair"] == "none":
            assert "repair_record" not in row and row["ppl"] == pytest.approx(
                oracle(row["removed"]), rel=1e-9
            )
            continue
        assert row["repair_record"]["changed"] == ["model.norm.weight"] and row["repair_fit_seconds"] >= 0
        with torch.no_grad():  # the repaired row is the cut model with the edit folded in
            model.model.norm.weight.mul_(0.5)
            with skip_blocks(model, row["removed"]):
                assert row["ppl"] == pytest.approx(oracle.measure(), rel=1e-9)
            model.model.norm.weight.mul_(2.0)
        assert row["ppl"] != pytest.approx(oracle(row["removed"]), rel=1e-3)
    # edits are folded in for their rows only and undone after: the model comes back bit for bit
    assert model_fingerprint(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert f"| last-n | {HalveFinalNorm.name} | 2 |" in markdown(result)


def test_the_table_gives_mi_verifieds_gap_to_sleb_where_both_ran():
    def row(method: str, n: int, ppl: float, seconds: float, repair: str = "none") -> dict:
        return {"method": method, "num_blocks": n, "removed": list(range(n)), "ppl": ppl, "repair": repair,
                "prune_seconds": seconds, "prune_x_forward": seconds}  # fmt: skip

    result = {
        "model": "m", "num_blocks_total": 6, "dense_ppl": 10.0, "dense_tasks": {},
        "evaluation": {"windows": 2, "seq_len": 8}, "calibration": {"windows": 2, "seq_len": 8},
        "forward_pass_seconds": 1.0,
        "rows": [row("mi-verified", 2, 11.0, 5.0), row("sleb", 2, 10.0, 100.0), row("shortgpt", 2, 12.0, 1.0),
                 row("mi-verified", 2, 10.5, 8.0, "linear"), row("mi-verified", 3, 20.0, 5.0),
                 row("mi-search", 2, 9.5, 10.0)],
    }  # fmt: skip
    text = markdown(result)
    assert (
        "mi-search against SLEB (same N, same repair; pruning time in forward passes of each row's run): N=2: 9.50 vs 10.00 (-5.0 %) in 0.100x"
        in text
    )
    assert "shortgpt against SLEB" not in text  # one-pass methods get no such line
    assert (
        "mi-verified against SLEB (same N, same repair; pruning time in forward passes of each row's run): N=2: 11.00 vs 10.00 (+10.0 %) in 0.050x"
        in text
    )
    assert "N=3" not in text.split("mi-verified against SLEB")[1].split("\n")[0]  # no SLEB row at N=3
    assert "linear" not in text.split("mi-verified against SLEB")[1].split("\n")[0]  # nor under the repair
