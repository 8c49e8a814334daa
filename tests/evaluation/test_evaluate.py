"""Evaluation: perplexity through `evaluate`, the offline task builders, and lm-eval end to end on a tiny model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HELDOUT_TXT
from tiny_models import tiny_model

from miprun.assets import HubUnreachableError
from miprun.cli import main
from miprun.data import eval_windows, load_text
from miprun.errors import InvalidOptionError, InvalidTypeError, UnknownNameError
from miprun.evaluation.evaluate import evaluate
from miprun.evaluation.tasks import (
    HARNESS_PREFIX,
    next_sentence_records,
    render_yaml,
    social_iqa_records,
    split_sentences,
    write_tasks,
)
from miprun.model.loading import LoadedModel
from miprun.model.perplexity import perplexity

WORDS = [
    *("age", "wisdom", "times", "season", "light", "darkness", "hope"),
    *("winter", "nation", "liberty", "people", "union", "justice"),
]


def paragraphs(count: int = 10) -> list[str]:
    """Paragraphs of three sentences each; every sentence names its paragraph and position."""
    return [
        " ".join(
            f"Part {p} line {s} tells of {WORDS[(p + s) % len(WORDS)]} and {WORDS[(3 * p + s) % len(WORDS)]}."
            for s in range(3)
        )
        for p in range(count)
    ]


@pytest.fixture
def paragraph_file(tmp_path: Path) -> Path:
    path = tmp_path / "paragraphs.txt"
    path.write_text("\n\n".join(paragraphs()) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def social_iqa_file() -> Path:
    """A tiny BIG-bench style social_iqa task.json where bigbench_file looks first (the test cache)."""
    path = Path(os.environ["MIPRUN_CACHE"]) / "data" / "bigbench" / "social_iqa" / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = [
        {
            "input": f"It was the {w} of times. What will people want next? ",
            "target_scores": {
                "hope": int(i % 3 == 0),
                "the season": int(i % 3 == 1),
                "a nation": int(i % 3 == 2),
            },
        }
        for i, w in enumerate(WORDS[:8])
    ]
    path.write_text(json.dumps({"name": "social_iqa", "examples": examples}), encoding="utf-8")
    return path


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline mode for libraries imported before conftest set HF_HUB_OFFLINE (else they retry for ~25 s)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def loaded(tokenizer, arch: str = "llama") -> LoadedModel:
    return LoadedModel(tiny_model(arch)[0], tokenizer, f"tiny-{arch}", None)


# ------------------------------------------------------------------------------------- builders


def test_split_sentences_keeps_abbreviations_and_initials():
    text = 'The instance is a number (e.g. 15) and the U.S. Army agreed. Dr. Smith left! Was it "over"? Yes.'
    assert split_sentences(text) == [
        "The instance is a number (e.g. 15) and the U.S. Army agreed.",
        "Dr. Smith left!",
        'Was it "over"?',
        "Yes.",
    ]


def test_next_sentence_is_deterministic_and_its_distractors_come_from_other_paragraphs():
    paras = paragraphs(12)
    records = next_sentence_records(paras, seed=0)
    assert records == next_sentence_records(paras, seed=0)
    assert records != next_sentence_records(paras, seed=1)
    assert len(records) == 12
    assert {r["label"] for r in records} == {0, 1, 2, 3}  # the answer's position varies
    for r in records:
        own = r["paragraph"]
        answer = r["choices"][r["label"]]
        assert r["context"].startswith(f"Part {own} line 0") and answer.startswith(f"Part {own} line 2")
        assert r["choices"].count(answer) == 1 and len(set(r["choices"])) == 4
        for choice, source in zip(r["choices"], r["choice_paragraphs"], strict=True):
            assert choice in paras[source]
            assert (source == own) == (choice == answer)
            assert choice == answer or choice not in paras[own]


def test_next_sentence_never_repeats_the_answer_even_when_another_paragraph_has_it():
    paras = paragraphs(6)
    copy = split_sentences(paras[0])
    paras.append(" ".join(["A new start.", "Another line.", copy[2]]))  # its answer is paragraph 0's too
    for seed in range(5):
        for r in next_sentence_records(paras, seed=seed):
            answer = r["choices"][r["label"]]
            assert r["choices"].count(answer) == 1


def test_next_sentence_refuses_a_text_too_short():
    with pytest.raises(ValueError, match="at least 4 paragraphs"):
        next_sentence_records(paragraphs(3))


def test_social_iqa_conversion_and_rendered_yaml(tmp_path):
    task = {"examples": [{"input": " Q? ", "target_scores": {"a": 0, "b": 1, "c": 0}}]}
    assert social_iqa_records(task) == [{"context": "Q?", "choices": ["a", "b", "c"], "label": 1}]
    with pytest.raises(ValueError, match="exactly one correct"):
        social_iqa_records({"examples": [{"input": "Q", "target_scores": {"a": 1, "b": 1}}]})
    data = tmp_path / 'odd "dir"' / "social_iqa.jsonl"
    config = yaml.safe_load(render_yaml("social_iqa", data))
    assert config["task"] == HARNESS_PREFIX + "social_iqa"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(data)
    assert config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]


# ----------------------------------------------------------------------------------- perplexity


@pytest.mark.integration
def test_perplexity_through_evaluate_equals_the_perplexity_module(tiny_tokenizer):
    lm = loaded(tiny_tokenizer)
    result = evaluate(lm, ppl=[str(HELDOUT_TXT)], ppl_seq_len=24, ppl_windows=0, progress=False)  # 0: all
    got = result["perplexity"][str(HELDOUT_TXT)]
    windows = eval_windows(tiny_tokenizer, load_text(str(HELDOUT_TXT), "evaluation"), 24)
    assert got["ppl"] == pytest.approx(perplexity(lm.model, windows), rel=1e-9)
    assert got["windows"] == windows.shape[0] > 3 and got["seq_len"] == 24
    assert got["predicted_tokens"] == windows.shape[0] * 23
    assert result["model"]["num_blocks"] == 6 and result["tasks"] == {}
    assert result["model"]["pruning"] is None  # not a miprun output folder
    first = evaluate(lm, ppl=[str(HELDOUT_TXT)], ppl_seq_len=24, ppl_windows=3, batch_size=2, progress=False)
    assert first["perplexity"][str(HELDOUT_TXT)]["windows"] == 3
    assert first["perplexity"][str(HELDOUT_TXT)]["ppl"] == pytest.approx(
        perplexity(lm.model, windows[:3]), rel=1e-9
    )
    with pytest.raises(
        InvalidOptionError, match="nothing to evaluate"
    ):  # issue #19: it returned an empty result
        evaluate(lm, no_ppl=True, progress=False)


def test_evaluate_checks_its_options_before_loading_anything(monkeypatch):
    import miprun.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "as_loaded", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(
        InvalidOptionError, match=r"unknown option 'seq_len' for EvaluateOptions\. Did you mean 'ppl_seq_len'"
    ):
        evaluate("tiny", seq_len=24)
    with pytest.raises(InvalidOptionError, match=r"ppl_windows \(--ppl-windows\) must be at least 0, got -1"):
        evaluate("tiny", ppl_windows=-1)
    with pytest.raises(InvalidOptionError, match=r"limit \(--limit\) must be at least 1, got 0"):
        evaluate("tiny", limit=0)
    with pytest.raises(InvalidTypeError, match=r"ppl_seq_len \(--ppl-seq-len\) must be int, got 24.5"):
        evaluate("tiny", ppl_seq_len=24.5)
    with pytest.raises(InvalidOptionError, match=r"dtype \(--dtype\) must be auto or one of"):
        evaluate("tiny", dtype="fp8")


# ------------------------------------------------------------------------------------- lm-eval


def _choice_loglik(model, tokenizer, context: str, choice: str) -> float:
    """Sum log-probability of " choice" after ``context``, tokenized as lm-eval's HFLM does."""
    whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def _expected_accuracy(model, tokenizer, records: list[dict]) -> tuple[float, float]:
    acc = acc_norm = 0
    for r in records:
        scores = [_choice_loglik(model, tokenizer, r["context"], c) for c in r["choices"]]
        normed = [s / len(c) for s, c in zip(scores, r["choices"], strict=True)]
        acc += max(range(len(scores)), key=scores.__getitem__) == r["label"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == r["label"]
    return acc / len(records), acc_norm / len(records)


@pytest.mark.integration
def test_lm_eval_scores_our_offline_tasks_on_the_in_memory_model(
    tiny_tokenizer, paragraph_file, social_iqa_file
):
    lm = loaded(tiny_tokenizer)
    tasks = ["social_iqa", "next_sentence"]
    result = evaluate(lm, no_ppl=True, tasks=tasks, limit=5, task_text=str(paragraph_file), progress=False)
    assert list(result["tasks"]) == tasks and result["perplexity"] == {}
    folder = write_tasks(tasks, source=str(paragraph_file), seed=0)  # the same files evaluate used
    for name in tasks:
        got = result["tasks"][name]
        assert got["examples"] == 5 and got["available"] == (8 if name == "social_iqa" else 10)
        records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()][:5]
        # the harness really scored this model: its accuracy equals our own log-likelihood argmax
        assert (got["acc"], got["acc_norm"]) == pytest.approx(
            _expected_accuracy(lm.model, tiny_tokenizer, records)
        )
        assert 0.0 <= got["acc"] <= 1.0 and 0.0 <= got["acc_norm"] <= 1.0


HUB_TASK = """task: hub_task
dataset_path: miprun-test/not-on-this-machine
output_type: multiple_choice
test_split: test
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
"""


@pytest.mark.integration
def test_unknown_and_hub_tasks_fail_with_a_clear_message(tiny_tokenizer, tmp_path, monkeypatch, hub_offline):
    from lm_eval.tasks import TaskManager

    (tmp_path / "hub_task.yaml").write_text(HUB_TASK)
    # lm-eval's own index takes 10-30 s to build: a one-task index stands in for it (the slow test uses it)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr("miprun.evaluation.evaluate._default_manager", lambda: manager)
    lm = loaded(tiny_tokenizer)
    with pytest.raises(UnknownNameError, match="Did you mean 'hub_task'"):
        evaluate(lm, no_ppl=True, tasks=["hub_tsk"], progress=False)
    with pytest.raises(UnknownNameError, match="Did you mean 'social_iqa'"):
        evaluate(lm, no_ppl=True, tasks=["next_sentence", "social_iq"], progress=False)
    assert not (Path(os.environ["MIPRUN_CACHE"]) / "tasks").exists()  # failed before any task was built
    with pytest.raises(HubUnreachableError, match=r"hub_task .*unreachable.*social_iqa, next_sentence"):
        evaluate(lm, no_ppl=True, tasks=["hub_task"], limit=2, progress=False)


@pytest.mark.integration
def test_eval_through_the_cli(tiny_tokenizer, tmp_path, paragraph_file, capsys):
    folder = tmp_path / "tiny-llama"
    model, _ = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    pruning = {"removed": [1, 4], "num_blocks_before": 8, "num_blocks_after": 6}  # as if miprun wrote it
    (folder / "miprun.json").write_text(json.dumps({"schema_version": 2, **pruning}))
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model",
        str(folder),
        "--ppl",
        str(HELDOUT_TXT),
        "--ppl-seq-len",
        "24",
        "--ppl-windows",
        "2",
    ]
    args += [
        "-t",
        "next_sentence",
        "--task-text",
        str(paragraph_file),
        "--limit",
        "3",
        "--json",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "next_sentence acc_norm" in printed and "perplexity" in printed
    data = json.loads(out.read_text())
    ppl = data["perplexity"][str(HELDOUT_TXT)]
    assert ppl["windows"] == 2 and ppl["seq_len"] == 24 and math.isfinite(ppl["ppl"])
    assert data["tasks"]["next_sentence"]["examples"] == 3
    assert data["model"]["path"] == str(folder) and data["versions"]["lm_eval"]
    assert data["model"]["pruning"] == pruning and data["model"]["num_blocks"] == 6


@pytest.mark.slow
def test_social_iqa_runs_on_smollm2():
    from miprun.assets import AssetError

    try:
        result = evaluate("smollm2-135m", no_ppl=True, tasks=["social_iqa"], limit=20, progress=False)
    except AssetError as err:  # the package index no longer offers bigbench 1.0.0 (December 2026)
        assert "MIPRUN_BIGBENCH_ARCHIVE=PATH" in str(err)
        pytest.skip("the BIG-bench source archive cannot be had here; the error says how to supply it")
    got = result["tasks"]["social_iqa"]
    assert got["examples"] == 20 and 0.0 <= got["acc"] <= 1.0 and 0.0 <= got["acc_norm"] <= 1.0


@pytest.mark.slow
def test_lm_eval_own_tasks_are_passed_through_and_fail_offline_with_a_clear_message(
    tiny_tokenizer, hub_offline
):
    with pytest.raises(HubUnreachableError, match="social_iqa download their data"):
        evaluate(loaded(tiny_tokenizer), no_ppl=True, tasks=["lm-eval:social_iqa"], limit=2, progress=False)


@pytest.mark.integration
def test_compare_scores_each_block_set_once_and_skips_broken_models(
    tiny_tokenizer, social_iqa_file, monkeypatch
):
    import miprun.evaluation.evaluate as ev
    from miprun.options import CalibrationConfig, CompareOptions, HeldoutOptions
    from miprun.output.comparison_report import markdown
    from miprun.pipeline.compare import compare

    calls: list[list[str]] = []
    real = ev.run_tasks

    def counted(lm, tasks, **kwargs):
        calls.append(list(tasks))
        return real(lm, tasks, **kwargs)

    monkeypatch.setattr(ev, "run_tasks", counted)
    options = CompareOptions(
        num_blocks=[1, 2],
        methods=["mi-prun", "mi-optimal", "angular", "last-n"],
        calibration=CalibrationConfig(source=str(HELDOUT_TXT), samples=2, seq_len=16),
        heldout=HeldoutOptions(eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=16),
        tasks=["social_iqa"],
        limit=3,
        task_max_ppl=1.5,
        forward_repeats=1,
        progress=False,
    )
    result = compare(loaded(tiny_tokenizer), options)
    assert len(result.rows) == 4 * 2 and {r.repair for r in result.rows} == {"none"}
    dense = result.dense_ppl
    evaluated = {tuple(r.removed) for r in result.rows if r.ppl <= 1.5 * dense}
    assert len(calls) == 1 + len(evaluated)  # the dense model, then each distinct block set once
    for row in result.rows:
        assert (row.tasks is not None) == (row.ppl <= 1.5 * dense) == ("tasks" in row.to_json())
        if row.tasks is not None:
            assert row.tasks["social_iqa"]["examples"] == 3
    assert result.dense_tasks["social_iqa"]["examples"] == 3
    assert "exceeds 1.5x dense" in markdown(result) and "social_iqa acc_norm" in markdown(result)
