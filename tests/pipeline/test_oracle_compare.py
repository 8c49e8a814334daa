"""The damage oracle and `miprun compare` on a tiny model."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from paths import RESULTS
from tiny_models import tiny_model

from miprun import repair
from miprun.errors import InvalidOptionError, UnknownNameError
from miprun.evaluation.oracle import DamageOracle, spearman
from miprun.model.identity import model_fingerprint
from miprun.model.loading import LoadedModel
from miprun.model.perplexity import perplexity
from miprun.model.surgery import remove_blocks, skip_blocks
from miprun.options import CalibrationConfig, CompareOptions, EstimatorOptions, HeldoutOptions, with_overrides
from miprun.output.comparison import Comparison, ComparisonRow, TextSetup, update
from miprun.output.comparison_report import markdown, write
from miprun.pipeline.compare import compare
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
    assert len(result.rows) == 8 and result.forward_pass_seconds > 0
    oracle = DamageOracle(model, result_windows(tiny_tokenizer))
    assert result.dense_ppl == pytest.approx(oracle.dense, rel=1e-9)
    for row in result.rows:
        assert len(row.removed) == row.num_blocks and row.ppl > 0 and row.prune_x_forward > 0
        assert row.repair == "none" and row.ppl == pytest.approx(oracle(row.removed), rel=1e-9)
        # only the MI method records its estimator
        want = {"name": "gaussian", "proj_dim": 16, "shrinkage": 0.05, "normalize": False}
        assert row.estimator == (want if row.method == "mi-prun" else None)
    rows = {(r.method, r.num_blocks): r.removed for r in result.rows}
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
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written["model"] == "tiny-llama" and written["kind"] == "miprun-comparison"
    # the file keeps its format: what a row did not measure is left out, and it reads back as it was
    assert set(written["rows"][0]) == {"method", "num_blocks", "removed", "repair", "mi_set_loss", "mi_evaluations",
                                       "prune_seconds", "estimator", "search", "ppl", "prune_x_forward"}  # fmt: skip
    assert set(written["calibration"]) == {"source", "windows", "seq_len", "seed"}
    assert Comparison.from_json(written) == result
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
    assert sorted((r.method, r.num_blocks) for r in merged.rows) == [
        ("last-n", 1),
        ("last-n", 2),
        ("random", 1),
        ("random", 2),
        ("shortgpt", 1),
        ("shortgpt", 2),
    ]
    assert [r for r in merged.rows if r.method == "last-n"] == [
        r for r in second.rows if r.method == "last-n"
    ]
    assert merged.earlier_forward_pass_seconds == {"shortgpt": first.forward_pass_seconds}
    assert "The rows of shortgpt come from an earlier run and are timed against its forward" in markdown(
        merged
    )
    other = compare(loaded, with_overrides(options, methods=["last-n"], samples=3))
    with pytest.raises(ValueError, match="cannot update the comparison: its calibration"):
        update(first, other)


@pytest.mark.integration
def test_update_reuses_the_dense_and_cut_only_task_results_it_already_has(tiny_tokenizer, monkeypatch):
    import miprun.pipeline.compare as cmp

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
    first.rows.append(replace(first.rows[0], repair="linear", tasks={"social_iqa": {"acc_norm": 0.9}}))
    known = cmp.known_task_results(first)
    assert set(known) == {((), "none"), ((4,), "none"), ((3, 4), "none")}  # a repaired result is not reused

    evaluated.clear()
    second = compare(loaded, with_overrides(options, methods=["last-n", "random"]), known)
    fresh = {tuple(sorted(r.removed)) for r in second.rows if r.method == "random"} - {(4,), (3, 4)}
    assert sorted(evaluated) == sorted(fresh)  # only the sets never evaluated before
    assert second.dense_tasks == first.dense_tasks
    by_set = {tuple(sorted(r.removed)): r.tasks for r in first.rows if r.repair == "none"}
    for row in second.rows:
        if row.method == "last-n":
            assert row.tasks == by_set[tuple(sorted(row.removed))]


@pytest.mark.integration
def test_update_refuses_other_tasks_before_running_anything(tiny_tokenizer, tmp_path, monkeypatch):
    import miprun.pipeline.compare as cmp

    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    previous = Comparison(
        model="tiny-llama", num_blocks_total=6, dense_ppl=10.0, calibration=TextSetup("wiki", 2, 16, 0),
        evaluation=TextSetup("wiki", 2, 16), forward_pass_seconds=1.0, estimator="coordinate",
        tasks=["social_iqa"], task_limit=5,
    )  # fmt: skip
    earlier = tmp_path / "cmp"
    earlier.mkdir()
    (earlier / "comparison.json").write_text(json.dumps({**previous.to_json(), "kind": "miprun-comparison"}))
    monkeypatch.setattr(cmp, "as_loaded", lambda *a, **k: loaded)
    monkeypatch.setattr(cmp, "compare", lambda *a, **k: pytest.fail("compared before checking the setup"))
    with pytest.raises(ValueError, match=r"cannot update the comparison: its tasks is \['social_iqa'\]"):
        cmp.run("tiny-llama", earlier, CompareOptions(tasks=[]), update_existing=True)
    with pytest.raises(InvalidOptionError, match="--update needs an earlier comparison in"):
        cmp.run("tiny-llama", tmp_path / "elsewhere", update_existing=True)


def test_compare_checks_names_before_loading_anything(tmp_path, monkeypatch):
    import miprun.pipeline.compare as cmp

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
    assert sorted((r.num_blocks, r.removed, r.repair) for r in result.rows) == sorted(
        [
            (1, [4], "none"),
            (1, [4], HalveFinalNorm.name),
            (2, [3, 4], "none"),
            (2, [3, 4], HalveFinalNorm.name),
        ]
    )
    oracle = DamageOracle(model, result_windows(tiny_tokenizer))
    for row in result.rows:
        if row.repair == "none":
            assert row.repair_record is None and row.ppl == pytest.approx(oracle(row.removed), rel=1e-9)
            assert "repair_record" not in row.to_json()
            continue
        assert row.repair_record["changed"] == ["model.norm.weight"] and row.repair_fit_seconds >= 0
        with torch.no_grad():  # the repaired row is the cut model with the edit folded in
            model.model.norm.weight.mul_(0.5)
            with skip_blocks(model, row.removed):
                assert row.ppl == pytest.approx(oracle.measure(), rel=1e-9)
            model.model.norm.weight.mul_(2.0)
        assert row.ppl != pytest.approx(oracle(row.removed), rel=1e-3)
    # edits are folded in for their rows only and undone after: the model comes back bit for bit
    assert model_fingerprint(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert f"| last-n | {HalveFinalNorm.name} | 2 |" in markdown(result)


def test_the_table_gives_mi_verifieds_gap_to_sleb_where_both_ran():
    def row(method: str, n: int, ppl: float, seconds: float, repair: str = "none") -> ComparisonRow:
        return ComparisonRow(method, n, list(range(n)), ppl, seconds, seconds, repair=repair)

    result = Comparison(
        model="m", num_blocks_total=6, dense_ppl=10.0, evaluation=TextSetup("t", 2, 8),
        calibration=TextSetup("t", 2, 8, 0), forward_pass_seconds=1.0, estimator="coordinate",
        rows=[row("mi-verified", 2, 11.0, 5.0), row("sleb", 2, 10.0, 100.0), row("shortgpt", 2, 12.0, 1.0),
              row("mi-verified", 2, 10.5, 8.0, "linear"), row("mi-verified", 3, 20.0, 5.0),
              row("mi-search", 2, 9.5, 10.0)],
    )  # fmt: skip
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


@pytest.mark.parametrize("name", ["compare-smollm2-135m", "compare-gemma3-270m"])
def test_the_published_comparisons_read_into_records_and_write_back_unchanged(name):
    """comparison.json keeps its format: the benchmark results written before the typed records round-trip."""

    path = RESULTS / name / "comparison.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    record = Comparison.from_json(data)
    assert record.rows and all(isinstance(row, ComparisonRow) for row in record.rows)
    written = record.to_json()
    assert {k: v for k, v in written.items() if k != "rows"} == {
        k: v for k, v in data.items() if k not in ("kind", "outputs", "rows")
    }
    for old, new in zip(data["rows"], written["rows"], strict=True):
        assert {k: new[k] for k in old} == old  # every value as it was
        # rows from before repairs (and before the estimator was recorded) gain the defaults they meant
        added = {k: new[k] for k in set(new) - set(old)}
        assert all(added[k] == {"repair": "none", "estimator": None, "search": {}}[k] for k in added)


def test_a_comparison_with_a_field_it_does_not_know_is_refused_not_dropped():
    data = Comparison(
        "m", 6, 10.0, TextSetup("t", 2, 8, 0), TextSetup("t", 2, 8), 1.0, "coordinate"
    ).to_json()
    data["rows"] = [{**ComparisonRow("last-n", 1, [4], 11.0, 0.1, 0.1).to_json(), "surprise": 1}]
    with pytest.raises(InvalidOptionError, match="its row has surprise"):
        Comparison.from_json(data)


@pytest.mark.integration
def test_compare_takes_every_option_prune_takes_and_chooses_what_prune_chooses(tiny_tokenizer):
    """One driver: --method-opt, --k, --sequential and --repair-opt reach compare's methods as they reach prune's,
    and each compare row removes the blocks `prune` removes with the same settings."""
    import miprun

    model, _ = tiny_model("llama")
    cal = CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24)
    estimation = EstimatorOptions(estimator="gaussian", estimator_params={"proj_dim": 16})
    options = CompareOptions(
        num_blocks=[2],
        methods=["mi-prun", "shortgpt", "sleb"],
        method_params={"rank": "mi"},
        k=1,
        sequential=True,
        repairs=["none", "linear"],
        repair_params={"guard": "0", "tokens": "0"},
        calibration=cal,
        estimation=estimation,
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=24),
        forward_repeats=1,
        progress=False,
    )
    result = compare(LoadedModel(model, tiny_tokenizer, "tiny-llama", None), options)
    rows = {(r.method, r.repair): r for r in result.rows}
    assert rows[("mi-prun", "none")].search["k"] == 1 and rows[("mi-prun", "none")].search["rank"] == "mi"
    assert rows[("mi-prun", "linear")].repair_record["params"]["guard"] == 0
    for (method, repair_name), row in rows.items():
        fresh, _ = tiny_model("llama")
        params = {"rank": "mi"} if method == "mi-prun" else {}
        pruned = miprun.prune(
            LoadedModel(fresh, tiny_tokenizer, "tiny-llama", None),
            num_blocks=2,
            method=method,
            method_params=params,
            k=1,
            sequential=True,
            repair=repair_name,
            repair_params={"guard": "0", "tokens": "0"} if repair_name == "linear" else {},
            calibration=cal,
            estimator="gaussian",
            estimator_params={"proj_dim": 16},
            cache=False,
            progress=False,
        )
        assert pruned.plan.removed == row.removed, (method, repair_name)


def test_compare_refuses_a_method_option_no_compared_method_has(tmp_path, monkeypatch):
    import miprun.pipeline.compare as cmp

    monkeypatch.setattr(cmp, "as_loaded", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(InvalidOptionError, match="no method among shortgpt, sleb has the parameter"):
        cmp.run("tiny-llama", tmp_path, methods=["shortgpt", "sleb"], method_params={"rank": "mi"})
