"""The damage oracle and `miprun compare` on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model

from miprun.api import CalibrationConfig
from miprun.evaluation.compare import CompareConfig, compare, markdown, update, write
from miprun.model.loading import LoadedModel
from miprun.evaluation.oracle import DamageOracle, spearman
from miprun.model.perplexity import perplexity
from miprun.model.surgery import remove_blocks

IDS = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # average ranks for ties


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


def test_compare_runs_every_method_and_writes_outputs(tiny_tokenizer, tmp_path):
    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    config = CompareConfig(
        num_blocks=(1, 2),
        methods=("mi-prun", "shortgpt", "angular", "last-n"),
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24),
        estimator="gaussian",
        estimator_params={"proj_dim": 16},
        eval_source=str(HELDOUT_TXT),
        eval_samples=2,
        eval_seq_len=24,
        forward_repeats=1,
    )
    result = compare(loaded, config, progress=False)
    assert len(result["rows"]) == 8 and result["forward_pass_seconds"] > 0
    for row in result["rows"]:
        assert len(row["removed"]) == row["num_blocks"] and row["ppl"] > 0 and row["prune_x_forward"] > 0
    angular = next(r for r in result["rows"] if r["method"] == "angular" and r["num_blocks"] == 2)
    assert angular["removed"][1] == angular["removed"][0] + 1
    paths = write(result, tmp_path / "cmp")
    assert {p.name for p in paths} >= {
        "comparison.json",
        "comparison.md",
        "comparison_ppl.png",
        "comparison_time.png",
    }
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["model"] == "tiny-llama"
    assert "| shortgpt | 2 |" in markdown(result)


def test_update_replaces_only_the_rerun_methods_and_refuses_other_data(tiny_tokenizer):
    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    config = CompareConfig(
        num_blocks=(1, 2),
        methods=("shortgpt", "last-n"),
        calibration=CalibrationConfig(source=str(CALIBRATION_TXT), samples=2, seq_len=16),
        eval_source=str(HELDOUT_TXT),
        eval_samples=2,
        eval_seq_len=16,
        forward_repeats=1,
    )
    first = compare(loaded, config, progress=False)
    config.methods = ("last-n", "random")
    second = compare(loaded, config, progress=False)
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
    config.calibration = CalibrationConfig(source=str(CALIBRATION_TXT), samples=3, seq_len=16)
    other = compare(loaded, config, progress=False)
    with pytest.raises(ValueError, match="cannot update the comparison: its calibration"):
        update(first, other)


def test_update_refuses_other_tasks_before_running_anything(tiny_tokenizer, tmp_path, monkeypatch):
    import miprun.evaluation.compare as cmp

    model, _ = tiny_model("llama")
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    previous = {"model": "tiny-llama", "num_blocks_total": 6, "tasks": ["social_iqa"], "task_limit": 5}
    (tmp_path / "comparison.json").write_text(json.dumps(previous))
    monkeypatch.setattr(cmp, "load_model", lambda *a, **k: loaded)
    monkeypatch.setattr(cmp, "compare", lambda *a, **k: pytest.fail("compared before checking the setup"))
    with pytest.raises(ValueError, match="cannot update the comparison: its tasks"):
        cmp.run("tiny-llama", CompareConfig(tasks=()), tmp_path, update_existing=True)
