"""The Python API end to end on tiny models: score, select, prune, save, reload, reuse scores, re-apply."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import miprun
from miprun.api import CalibrationConfig, ScoreResult, prune, score, select
from miprun.model.layouts import decoder_layers, num_blocks
from miprun.model.loading import LoadedModel
from miprun.output.manifest import MANIFEST_NAME, PrunePlan

pytestmark = pytest.mark.integration
CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, seed=0, batch_size=3)


def loaded(arch: str, tokenizer) -> LoadedModel:
    model, _ = tiny_model(arch)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{arch}", path=None)


@pytest.mark.parametrize("estimator", ["coordinate", "gaussian", "renyi", "binned"])
def test_score_gives_every_block_and_span(tiny_tokenizer, estimator):
    params = {"coordinate": {}, "gaussian": {"proj_dim": 16}}.get(estimator, {"sample_tokens": 100})
    result = score(
        loaded("llama", tiny_tokenizer), calibration=CAL, estimator=estimator, estimator_params=params
    )
    t = result.table.num_blocks
    assert len(result.table.spans) == t * (t + 1) // 2
    assert all(0.0 <= s.nmi <= 1.0 and s.mi >= 0.0 for s in result.table.spans.values())
    assert result.calibration.tokens == CAL.samples * CAL.seq_len
    assert result.estimator.params()["name"] == estimator


def test_prune_saves_a_checkpoint_that_transformers_loads(tiny_tokenizer, tmp_path):
    lm = loaded("llama", tiny_tokenizer)
    dense = tiny_model("llama")[0]
    out = tmp_path / "pruned"
    result = prune(
        lm,
        num_blocks=2,
        method="mi-prun",  # MI-PRUN's one pass: its plan records the optimum it is compared against
        repair="none",
        calibration=CAL,
        estimator="gaussian",
        estimator_params={"proj_dim": 16},
        out=out,
        evaluate=True,
        eval_source=str(HELDOUT_TXT),
        eval_samples=2,
        eval_seq_len=24,
        progress=False,
    )
    plan = result.plan
    assert len(plan.removed) == 2 and plan.num_blocks_after == 4
    assert plan.search.optimal_loss is not None and plan.search.gap is not None and plan.search.gap >= -1e-12
    assert plan.evaluation.pruned_ppl > 0 and plan.evaluation.dense_ppl > 0
    for name in (
        "model.safetensors",
        "config.json",
        MANIFEST_NAME,
        "report.png",
        "report.md",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["removed"] == plan.removed and manifest["num_blocks_after"] == 4
    assert manifest["calibration"]["fingerprint"] and manifest["model"]["fingerprint"]
    assert {"capture", "selection", "surgery", "save"} <= set(manifest["timings"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(reloaded) == 4
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)
    # re-applying the manifest to the dense model gives the same network
    miprun.apply_plan(dense, out / MANIFEST_NAME)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, reloaded(ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("the age of wisdom")["input_ids"]


def test_scores_file_is_reused_without_a_forward_pass(tiny_tokenizer, tmp_path):
    lm = loaded("qwen2", tiny_tokenizer)
    first = score(lm, calibration=CAL, estimator="gaussian", estimator_params={"proj_dim": 16})
    path = tmp_path / "scores.json"
    first.write(path)
    again = ScoreResult.read(path)
    for n in (1, 2, 3):
        assert select(again, n)[0] == select(first, n)[0]

    def no_forward(*_args, **_kwargs):
        raise AssertionError("the model must not run when scores are reused")

    layers = decoder_layers(lm.model)
    handle = layers[0].register_forward_pre_hook(no_forward)
    try:
        # MI-PRUN without a repair: the default (mi-search + linear) measures and repairs with the model
        result = prune(
            lm,
            num_blocks=2,
            scores=path,
            method="mi-prun",
            repair="none",
            out=tmp_path / "p2",
            progress=False,
        )
    finally:
        handle.remove()
    assert result.plan.removed == select(first, 2)[0]


def test_scores_for_another_model_are_refused(tiny_tokenizer, tmp_path):
    path = tmp_path / "scores.json"
    score(
        loaded("llama", tiny_tokenizer),
        calibration=CAL,
        estimator="gaussian",
        estimator_params={"proj_dim": 16},
    ).write(path)
    other = LoadedModel(tiny_model("llama", seed=1)[0], tiny_tokenizer, "tiny-llama-seed1", None)
    with pytest.raises(ValueError, match="made for model"):
        prune(other, num_blocks=2, scores=path, progress=False)


def test_mi_optimal_reaches_the_optimum_and_mi_prun_reports_its_gap(tiny_tokenizer):
    result = score(
        loaded("llama", tiny_tokenizer),
        calibration=CAL,
        estimator="gaussian",
        estimator_params={"proj_dim": 16},
    )
    removed, info = select(result, 3, method="mi-optimal")
    assert info.gap == 0.0 and info.optimal_removed == removed
    _, fbs = select(result, 3, method="mi-prun")
    assert fbs.loss >= info.loss - 1e-12 and fbs.num_evaluations >= result.table.num_blocks


def test_ratio_and_budget_errors(tiny_tokenizer):
    result = score(
        loaded("llama", tiny_tokenizer),
        calibration=CAL,
        estimator="gaussian",
        estimator_params={"proj_dim": 16},
    )
    assert len(select(result, ratio=0.34)[0]) == 3  # ceil(6 * 0.34)
    for bad in ({"num_blocks": 0}, {"num_blocks": 6}, {"ratio": 1.0}, {"ratio": 0.0}, {}):
        with pytest.raises(ValueError):
            select(result, **bad)
    with pytest.raises(ValueError, match="Did you mean 'mi-prun'"):
        select(result, 2, method="mi-prune")


def test_existing_output_is_refused_before_any_work(tiny_tokenizer, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prune(loaded("llama", tiny_tokenizer), num_blocks=1, calibration=CAL, out=out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


def test_plan_round_trips(tiny_tokenizer, tmp_path):
    result = prune(loaded("llama", tiny_tokenizer), num_blocks=2, calibration=CAL, progress=False)
    path = tmp_path / MANIFEST_NAME
    result.plan.write(path)
    again = PrunePlan.read(path)
    assert again.to_json() == result.plan.to_json()  # every field, not a sample of them
    assert json.loads(path.read_text())["kind"] == "miprun-plan"
    assert again.search.method == "mi-search" and again.repair.name == "linear"  # the defaults
    assert again.repair.changed == result.plan.repair.changed


def test_an_options_object_and_flat_overrides_are_the_same_run(tiny_tokenizer):
    from miprun.options import PruneOptions

    opts = PruneOptions(num_blocks=2, calibration=CAL, progress=False)
    by_object = prune(loaded("llama", tiny_tokenizer), opts)
    by_keywords = prune(loaded("llama", tiny_tokenizer), num_blocks=2, calibration=CAL, progress=False)
    assert by_object.plan.removed == by_keywords.plan.removed
    assert by_object.plan.scores == by_keywords.plan.scores


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_blocks": True}, TypeError, r"num_blocks \(--num-blocks\) must be int"),
        ({"num_blocks": 2.7}, TypeError, r"num_blocks \(--num-blocks\) must be int"),
        ({"num_blocks": 0}, ValueError, r"num_blocks \(--num-blocks\) must be at least 1"),
        ({"num_blocks": 2, "k": -3}, ValueError, r"k \(--k\) must be at least 0"),
        ({"num_blocks": 2, "batch_size": 0}, ValueError, r"batch_size \(--batch-size\) must be at least 1"),
        ({"num_blocks": 2, "samples": "8"}, TypeError, r"samples \(--samples\) must be int"),
        ({"ratio": 1.5}, ValueError, r"ratio \(--ratio\) must be less than 1"),
        ({"num_blocks": 2, "sampels": 8}, ValueError, r"unknown option 'sampels'.*Did you mean 'samples'"),
        ({"num_blocks": 2, "method": "shortgtp"}, ValueError, r"Did you mean 'shortgpt'"),
        ({"num_blocks": 2, "estimator_params": {"center": "maybe"}}, ValueError, r"center.*true/false"),
        (
            {"num_blocks": 2, "estimator": "gaussian", "estimator_params": {"proj_dim": -5}},
            ValueError,
            "proj_dim",
        ),
    ],
)
def test_bad_options_raise_typed_errors_before_any_work(tiny_tokenizer, overrides, error, match):
    from miprun.errors import MiprunError

    lm = loaded("llama", tiny_tokenizer)
    handle = decoder_layers(lm.model)[0].register_forward_pre_hook(lambda *_: pytest.fail("the model ran"))
    try:
        with pytest.raises(error, match=match) as caught:
            prune(lm, calibration=CAL, progress=False, **overrides)
    finally:
        handle.remove()
    assert isinstance(caught.value, MiprunError)


# ----------------------------------------------------------------------------- wrong arguments (issue #19)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: prune(model=123, num_blocks=1), r"prune\(\): model must be .* got 123 \(int\)"),
        (lambda: select(None, 2), r"select\(\): scores must be a ScoreResult"),
        (lambda: prune(options="x"), r"prune\(\): options must be a PruneOptions or None, got 'x'"),
        (lambda: prune(scores={"spans": []}, num_blocks=1), r"prune\(\): scores must be a ScoreResult"),
        (lambda: miprun.PruneOptions(seed=2**70), r"seed \(--seed\) must be at most"),
        (
            lambda: miprun.PruneOptions(ratoi=0.2),
            r"unknown option 'ratoi' for PruneOptions. Did you mean 'ratio'",
        ),
        (lambda: score(5), r"score\(\): model must be"),
        (lambda: miprun.apply_plan("model", "plan.json"), r"apply_plan\(\): model must be a torch.nn.Module"),
    ],
)
def test_wrong_api_arguments_are_miprun_errors_naming_the_argument(call, named):
    with pytest.raises(miprun.errors.MiprunError, match=named):
        call()


def test_a_truthy_string_is_not_overwrite(tiny_tokenizer, tmp_path):
    from miprun.atomic import write_steps

    out = tmp_path / "out"
    earlier = {"schema_version": 2, "removed": [1], "num_blocks_before": 6}
    write_steps(
        out,
        [("manifest", lambda d: (d / MANIFEST_NAME).write_text(json.dumps(earlier)))],
        overwrite=False,
        progress=False,
    )
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises(miprun.errors.InvalidTypeError, match=r"overwrite must be True or False, got 'no'"):
        prune(
            loaded("llama", tiny_tokenizer),
            num_blocks=1,
            calibration=CAL,
            cache=False,
            out=out,
            overwrite="no",
        )
    assert (out / MANIFEST_NAME).read_text() == before


def test_the_documented_options_objects_work():
    readme = miprun.PruneOptions(num_blocks=6, repair="linear")  # README.md
    docstring = miprun.PruneOptions(ratio=0.2, method="shortgpt")  # miprun.api's docstring
    assert (readme.num_blocks, readme.repair_config.repair) == (6, "linear")
    assert (docstring.ratio, docstring.scoring.method) == (0.2, "shortgpt")
    assert miprun.PruneOptions(samples=8, calibration=CAL).calibration.samples == 8  # flat name over a group
    assert (
        callable(miprun.heal) and miprun.HealOptions(tokens=256).config.tokens == 256
    )  # README's miprun.heal


def test_a_plan_is_checked_against_the_model_it_is_applied_to(tiny_tokenizer, tmp_path):
    result = prune(
        loaded("llama", tiny_tokenizer),
        num_blocks=2,
        repair="none",  # a repaired plan is refused for another reason (its weights are not in it)
        calibration=CAL,
        cache=False,
        progress=False,
    )
    plan = result.plan
    qwen2 = tiny_model("qwen2")[0]
    assert num_blocks(qwen2) == plan.num_blocks_before  # only the architecture tells them apart
    with pytest.raises(miprun.errors.InvalidOptionError, match=r"a llama model; this model is a qwen2"):
        miprun.apply_plan(qwen2, plan)
    other = tiny_model("llama", seed=1)[0]
    with pytest.raises(miprun.errors.InvalidOptionError, match=r"this model's fingerprint is"):
        miprun.apply_plan(other, plan)
    assert num_blocks(other) == plan.num_blocks_before  # refused before any change
    assert num_blocks(miprun.apply_plan(other, plan, strict=False)) == plan.num_blocks_after
    assert num_blocks(miprun.apply_plan(tiny_model("llama")[0], plan)) == plan.num_blocks_after


def test_an_option_changed_after_it_was_built_is_checked_again(tiny_tokenizer):
    import dataclasses

    from miprun.options import with_overrides

    opts = with_overrides(
        miprun.PruneOptions(num_blocks=1), calibration=dataclasses.replace(CAL), cache=False
    )
    opts.calibration.samples = 0  # after construction: no __post_init__ ran
    with pytest.raises(
        miprun.errors.InvalidOptionError, match=r"samples \(--samples\) must be at least 1, got 0"
    ):
        prune(loaded("llama", tiny_tokenizer), opts)


def test_results_are_never_written_over_what_they_were_computed_from(tiny_tokenizer, tmp_path):
    """The writers' own check, for the Python API (the CLI refuses the same before any work)."""
    from miprun.atomic import UnsafeOutputError
    from miprun.evaluation.evaluate import evaluate, write_result

    folder = tmp_path / "tiny"
    tiny_model("llama")[0].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    config = (folder / "config.json").read_bytes()
    result = score(str(folder), calibration=CAL, cache=False, progress=False)
    with pytest.raises(UnsafeOutputError, match=r"lies inside the input .*tiny that this run reads"):
        result.write(folder / "config.json")
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT_TXT.read_text())
    evaluation = evaluate(str(folder), ppl=[str(text)], ppl_seq_len=16, ppl_windows=2, progress=False)
    with pytest.raises(UnsafeOutputError, match=r"is the input .*heldout.txt"):
        write_result(text, evaluation)
    assert (folder / "config.json").read_bytes() == config and text.read_text() == HELDOUT_TXT.read_text()
