"""Baselines (shortgpt, angular, sleb, ppl-oneshot, last-n, random): each one's defining behaviour on tiny
models, checked against a direct computation, plus the API and CLI paths every method shares."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from miprun import baselines as bl
from miprun.api import CalibrationConfig, ScoreResult, prune, score, select
from miprun.architectures import decoder_layers, num_blocks
from miprun.capture import block_state_hooks, capture
from miprun.cli import main
from miprun.loading import LoadedModel
from miprun.methods import METHODS, MissingEvidenceError
from miprun.perplexity import mean_nll
from miprun.stats import CaptureSpec
from miprun.surgery import remove_blocks

BASELINES = ["shortgpt", "angular", "sleb", "ppl-oneshot", "last-n", "random"]
WINDOWS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24, seed=0, batch_size=2)
GAUSS = {"proj_dim": 16}


def loaded(tokenizer, arch: str = "llama") -> LoadedModel:
    return LoadedModel(model=tiny_model(arch)[0], tokenizer=tokenizer, name=f"tiny-{arch}", path=None)


def hooked_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input and the last block's output, ``(tokens, hidden)`` float64, by plain hooks."""
    states: dict[int, torch.Tensor] = {}
    with torch.no_grad(), block_state_hooks(decoder_layers(model), lambda s, h: states.__setitem__(s, h)):
        model(input_ids=ids)
    return [states[s].reshape(-1, states[s].shape[-1]).double() for s in sorted(states)]


def direct_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (tokens,)


def loss_without(model: torch.nn.Module, removed: list[int]) -> float:
    """Calibration loss of a pruned deep copy: independent of ``skip_blocks``."""
    pruned = remove_blocks(copy.deepcopy(model), removed)
    return mean_nll(pruned, WINDOWS, batch_size=2)[0]


# ----------------------------------------------------------------------------- cosine-based


def test_cosine_sums_equal_the_hooked_states_and_do_not_depend_on_batching():
    model, _ = tiny_model("qwen2")
    one = capture(model, WINDOWS, CaptureSpec(cosine=True), batch_size=1, progress=False)
    many = capture(model, WINDOWS, CaptureSpec(moments_dim=8, cosine=True), batch_size=3, progress=False)
    states = hooked_states(model, WINDOWS)
    assert one.cosine is not None and many.cosine is not None and one.cosine.count == WINDOWS.numel()
    assert one.cosine.cos is not None and one.cosine.cos.shape == (7, 7)  # bounded: S x S, any token count
    for a, b in [(0, 1), (2, 3), (0, 6), (1, 5)]:
        cos = direct_cos(states[a], states[b])
        assert one.cosine.mean_cos()[a, b] == pytest.approx(float(cos.mean()), abs=1e-5)
        angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
        assert one.cosine.mean_angle()[a, b] == pytest.approx(float(angle.mean()), abs=1e-4)
    assert torch.allclose(one.cosine.mean_cos(), many.cosine.mean_cos(), atol=1e-6)
    assert CaptureSpec(moments_dim=4).merge(CaptureSpec(cosine=True)).cosine


def test_shortgpt_removes_the_lowest_block_influence_from_direct_states(tiny_tokenizer):
    lm = loaded(tiny_tokenizer)
    states = hooked_states(lm.model, WINDOWS)
    direct = [1.0 - float(direct_cos(states[i], states[i + 1]).mean()) for i in range(len(states) - 1)]
    stats = capture(lm.model, WINDOWS, CaptureSpec(cosine=True), progress=False)
    assert stats.cosine is not None
    influence = bl.block_influence(stats.cosine.mean_cos())
    assert influence == pytest.approx(direct, abs=1e-5)
    for n in (1, 2, 4):
        expected = sorted(sorted(range(len(direct)), key=lambda i: direct[i])[:n])
        assert bl.shortgpt_select(influence, n) == expected
    result = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="shortgpt")
    removed, info = select(result, 2, method="shortgpt")
    bi = info.params["scores"]
    assert removed == sorted(sorted(range(6), key=lambda i: bi[i])[:2]) and info.num_evaluations == 6


def test_angular_removes_the_contiguous_window_of_least_angular_distance(tiny_tokenizer):
    lm = loaded(tiny_tokenizer, "mistral")
    states = hooked_states(lm.model, WINDOWS)
    stats = capture(lm.model, WINDOWS, CaptureSpec(cosine=True), progress=False)
    assert stats.cosine is not None
    angle = stats.cosine.mean_angle()
    for n in range(1, 6):
        brute = {
            start: float(
                (torch.arccos(direct_cos(states[start], states[start + n]).clamp(-1, 1)) / math.pi).mean()
            )
            for start in range(6 - n + 1)
        }
        best = min(brute, key=lambda s: brute[s])
        removed = bl.angular_select(angle, n)
        assert removed == list(range(best, best + n))  # contiguous, and the brute-force argmin
        assert bl.window_distances(angle, n) == pytest.approx([brute[s] for s in sorted(brute)], abs=1e-4)
    result = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="angular")
    for n in (2, 3):
        removed, info = select(result, n, method="angular")
        assert removed == list(range(removed[0], removed[0] + n)) and info.num_evaluations == 6 - n + 1


def test_mi_scores_do_not_capture_cosine_and_say_how_to_get_it(tiny_tokenizer):
    """Cosine sums cost a batch of full-width unit vectors per layer: only captured for methods that read them."""
    lm = loaded(tiny_tokenizer, "llama")
    result = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, cache=False)
    assert result.baselines.cosine is None
    with pytest.raises(MissingEvidenceError, match="miprun score --method shortgpt"):
        select(result, 2, method="shortgpt")


# ----------------------------------------------------------------------------- model-driven


def test_sleb_matches_brute_force_for_one_block_and_greedy_for_two():
    model, _ = tiny_model("llama")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        before = model(ids).logits
    path = bl.sleb_path(model, WINDOWS, 2, batch_size=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # skip_blocks restored the model exactly
    single = {b: loss_without(model, [b]) for b in range(6)}
    first = min(single, key=lambda b: single[b])
    assert path.order[0] == first and path.losses[0] == pytest.approx(single[first], rel=1e-5)
    pairs = {b: loss_without(model, [first, b]) for b in range(6) if b != first}
    second = min(pairs, key=lambda b: pairs[b])
    assert path.order[1] == second and path.losses[1] == pytest.approx(pairs[second], rel=1e-5)
    assert path.forward_passes == [6, 5] and path.removed(2) == sorted([first, second])
    with pytest.raises(ValueError, match="holds 1 to 2"):
        path.removed(3)


def test_ppl_oneshot_equals_the_loss_of_each_block_removed_alone():
    model, _ = tiny_model("qwen3")
    one = bl.ppl_oneshot_losses(model, WINDOWS, batch_size=2)
    direct = [loss_without(model, [b]) for b in range(6)]
    assert one.losses == pytest.approx(direct, rel=1e-5) and one.forward_passes == 6
    for n in (1, 3):
        assert bl.lowest(one.losses, n) == sorted(sorted(range(6), key=lambda b: direct[b])[:n])


# ----------------------------------------------------------------------------- naive references


def test_last_n_never_removes_the_final_block():
    for total in range(3, 12):
        for n in range(1, total - 1):
            removed = bl.last_n(total, n)
            assert len(removed) == n and total - 1 not in removed and removed[-1] == total - 2
            assert removed == list(range(removed[0], removed[0] + n))
        with pytest.raises(ValueError, match="keeps the final block"):
            bl.last_n(total, total - 1)


def test_registry_declares_what_each_method_needs():
    assert set(BASELINES) | {"mi-prun", "mi-optimal"} == set(METHODS)
    for method in METHODS.values():
        assert (method.gather is not None) == (method.needs == "model"), method.name


def test_random_is_seeded_and_differs_across_seeds():
    assert bl.random_select(30, 5, seed=7) == bl.random_select(30, 5, seed=7)
    sets = {tuple(bl.random_select(30, 5, seed=s)) for s in range(5)}
    assert len(sets) > 1 and all(len(set(s)) == 5 and all(0 <= b < 30 for b in s) for s in sets)


# ----------------------------------------------------------------------------- API and CLI


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_prunes_to_a_checkpoint_that_reloads(method, tiny_tokenizer, tmp_path):
    out = tmp_path / method
    result = prune(
        loaded(tiny_tokenizer),
        num_blocks=2,
        method=method,
        calibration=CAL,
        estimator="gaussian",
        estimator_params=GAUSS,
        out=out,
        progress=False,
    )
    search = result.plan.search
    assert search.method == method and len(result.plan.removed) == 2
    expected_evaluations = {
        "shortgpt": 6,
        "angular": 5,
        "sleb": 6 + 5,
        "ppl-oneshot": 6,
        "last-n": 0,
        "random": 0,
    }
    assert search.num_evaluations == expected_evaluations[method]
    assert search.gap is not None and search.gap >= -1e-12  # every method is placed against the MI optimum
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(reloaded) == 4
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)
    assert json.loads((out / "miprun.json").read_text())["search"]["method"] == method


def _no_forward(*_args, **_kwargs):
    raise AssertionError("the model must not run when scores are reused")


@pytest.mark.parametrize("method", ["shortgpt", "angular", "sleb", "ppl-oneshot"])
def test_scores_file_serves_baselines_without_a_forward_pass(method, tiny_tokenizer, tmp_path):
    lm = loaded(tiny_tokenizer, "qwen2")
    first = score(
        lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method=method, max_blocks=3
    )
    path = tmp_path / "scores.json"
    first.write(path)
    again = ScoreResult.read(path)
    for n in (1, 2, 3):
        assert select(again, n, method=method)[0] == select(first, n, method=method)[0]
    handle = decoder_layers(lm.model)[0].register_forward_pre_hook(_no_forward)
    try:
        result = prune(lm, num_blocks=2, method=method, scores=path, out=tmp_path / "p2", progress=False)
    finally:
        handle.remove()
    assert result.plan.removed == select(first, 2, method=method)[0]


def test_missing_evidence_names_the_command_that_makes_it(tiny_tokenizer):
    result = score(
        loaded(tiny_tokenizer),
        calibration=CAL,
        estimator="gaussian",
        estimator_params=GAUSS,
        method="sleb",
        max_blocks=2,
    )
    with pytest.raises(MissingEvidenceError, match="--method sleb --max-blocks 3"):
        select(result, 3, method="sleb")
    with pytest.raises(MissingEvidenceError, match="--method ppl-oneshot"):
        select(result, 2, method="ppl-oneshot")
    with pytest.raises(ValueError, match="Did you mean 'shortgpt'"):
        select(result, 2, method="shortgtp")
    # methods that need nothing, or only the capture pass, work from any scores
    assert select(result, 2, method="last-n")[0] == [3, 4]
    assert select(result, 2, method="random", seed=3)[0] == bl.random_select(6, 2, 3)


def test_cli_score_and_prune_with_a_baseline(tiny_tokenizer, tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama")[0].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert main(["prune", "--help"]) == 0 and main(["score", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(text.count(name) >= 2 for name in METHODS)  # listed in both commands' help
    tiny = ["--calib", str(CALIBRATION_TXT), "--samples", "4", "--seq-len", "24", "--quiet"]
    scores = tmp_path / "scores.json"
    assert (
        main(
            [
                "score",
                "--model",
                str(folder),
                "--method",
                "sleb",
                "--max-blocks",
                "2",
                "-o",
                str(scores),
                *tiny,
            ]
        )
        == 0
    )
    assert len(json.loads(scores.read_text())["baselines"]["sleb"]["order"]) == 2
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        str(folder),
        "--scores",
        str(scores),
        "--method",
        "sleb",
        "-n",
        "2",
        "-o",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    assert json.loads((out / "miprun.json").read_text())["search"]["method"] == "sleb"
