"""Methods: the contract every registered method keeps, each baseline's defining behaviour on tiny models
checked against a direct computation, and the API and CLI paths every method shares."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from miprun import methods
from miprun.api import prune, score, select
from miprun.capture.engine import capture
from miprun.capture.statistics import CoordinateMoments, CosineSums, Moments
from miprun.capture.taps import block_state_hooks
from miprun.cli import main
from miprun.errors import InvalidOptionError, MissingEvidenceError, UnknownNameError
from miprun.methods import forward as fw
from miprun.methods import naive
from miprun.methods import similarity as sim
from miprun.model.layouts import decoder_layers, num_blocks
from miprun.model.loading import LoadedModel
from miprun.model.perplexity import mean_nll
from miprun.model.surgery import remove_blocks
from miprun.options import CalibrationConfig
from miprun.scores import ScoreResult

BASELINES = ["shortgpt", "angular", "angular-mean", "sleb", "ppl-oneshot", "last-n", "random"]
pytestmark = pytest.mark.integration
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


# ----------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def qwen2(tiny_tokenizer) -> LoadedModel:
    return loaded(tiny_tokenizer, "qwen2")


@pytest.fixture(scope="module")
def full_scores(qwen2) -> ScoreResult:
    """Scores holding every method's evidence: MI spans, both cosine matrices, the SLEB path, one-shot losses."""
    lm = qwen2
    result = score(
        lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="sleb", max_blocks=3
    )
    for name in ("shortgpt", "angular", "ppl-oneshot"):
        extra = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method=name)
        result.evidence.update(extra.evidence)
    return result


@pytest.mark.parametrize("name", methods.REGISTRY.names())
def test_every_method_keeps_the_contract(name, full_scores, qwen2):
    """Built with defaults, each method removes N distinct blocks in range, the same each time, and declares
    the evidence it reads (and nothing captured for it is left unread). Live evidence (a method that
    measures candidates with the model) is attached as the pipeline attaches it."""
    from miprun.options import RuntimeOptions
    from miprun.pipeline import RunSettings, attach_live

    method = methods.build(name)
    assert method.name == name and method.summary

    def evidence() -> methods.Evidence:
        found = methods.Evidence(6, full_scores.table, dict(full_scores.evidence))
        attach_live(qwen2, method, found, None, RunSettings(CAL, RuntimeOptions(), progress=False))
        assert set(method.live_keys) <= set(found.extras)
        return found

    for n in (1, 2, 3):
        first, info = methods.run(method, evidence(), n, 0)
        again, _ = methods.run(method, evidence(), n, 0)
        assert first == again == sorted(set(first)) and len(first) == n and all(0 <= b < 6 for b in first)
        assert info.method == name and info.num_evaluations >= 0 and info.loss is not None
    for key in method.evidence_keys:
        assert methods.evidence_type(key) is method.evidence_types[key]  # a scores file can carry it
    if method.uses_mi:
        with pytest.raises(MissingEvidenceError):
            methods.run(method, methods.Evidence(6), 2, 0)
    for key in (*method.evidence_keys, *method.live_keys):
        without = {k: v for k, v in evidence().extras.items() if k != key}
        with pytest.raises(MissingEvidenceError, match=f"--method {name}"):
            methods.run(method, methods.Evidence(6, full_scores.table, without), 3, 0)


def test_method_parameters_are_typed_and_checked():
    assert methods.build("mi-prun", {"k": "7", "rank": "mi"}).params() == {"k": 7, "rank": "mi"}
    with pytest.raises(InvalidOptionError, match=r"no parameter 'kk'.*Did you mean 'k'"):
        methods.build("mi-prun", {"kk": 3})
    with pytest.raises(InvalidOptionError, match=r"k .*at least 0"):
        methods.build("mi-prun", {"k": -3})
    with pytest.raises(UnknownNameError, match="Did you mean 'shortgpt'"):
        methods.build("shortgtp")


# ----------------------------------------------------------------------------- cosine-based


def test_cosine_sums_equal_the_hooked_states_and_do_not_depend_on_batching():
    model, _ = tiny_model("qwen2")
    one = capture(model, WINDOWS, [CosineSums()], CalibrationConfig(batch_size=1), progress=False)
    many = capture(
        model, WINDOWS, [Moments(8), CosineSums()], CalibrationConfig(batch_size=3), progress=False
    )
    states = hooked_states(model, WINDOWS)
    ones, manys = one.get(CosineSums()), many.get(CosineSums())
    assert ones.count == WINDOWS.numel() and ones.cos.shape == (7, 7)  # bounded: S x S, any token count
    for a, b in [(0, 1), (2, 3), (0, 6), (1, 5)]:
        cos = direct_cos(states[a], states[b])
        assert ones.mean_cos()[a, b] == pytest.approx(float(cos.mean()), abs=1e-5)
        angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
        assert ones.mean_angle()[a, b] == pytest.approx(float(angle.mean()), abs=1e-4)
    assert torch.allclose(ones.mean_cos(), manys.mean_cos(), atol=1e-6)


def test_last_token_cosine_reads_each_windows_last_token_only():
    model, _ = tiny_model("llama")
    last = capture(
        model, WINDOWS, [CosineSums(positions="last")], CalibrationConfig(batch_size=3), progress=False
    )
    sums = last.get(CosineSums(positions="last"))
    assert sums.count == len(WINDOWS)
    with torch.no_grad():
        hidden = model(input_ids=WINDOWS, output_hidden_states=True).hidden_states
    direct = direct_cos(hidden[1][:, -1].double(), hidden[4][:, -1].double())
    angle = torch.arccos(direct.clamp(-1, 1)) / math.pi
    assert sums.mean_angle()[1, 4] == pytest.approx(float(angle.mean()), abs=1e-5)


def test_shortgpt_removes_the_lowest_block_influence_from_direct_states(tiny_tokenizer):
    lm = loaded(tiny_tokenizer)
    states = hooked_states(lm.model, WINDOWS)
    direct = [1.0 - float(direct_cos(states[i], states[i + 1]).mean()) for i in range(len(states) - 1)]
    stats = capture(lm.model, WINDOWS, [CosineSums()], progress=False)
    influence = sim.block_influence(stats.get(CosineSums()).mean_cos())
    assert influence == pytest.approx(direct, abs=1e-5)
    for n in (1, 2, 4):
        expected = sorted(sorted(range(len(direct)), key=lambda i: direct[i])[:n])
        assert sim.shortgpt_select(influence, n) == expected
    result = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="shortgpt")
    removed, info = select(result, 2, method="shortgpt")
    bi = info.params["scores"]
    assert removed == sorted(sorted(range(6), key=lambda i: bi[i])[:2]) and info.num_evaluations == 6


def test_angular_removes_the_contiguous_window_of_least_angular_distance(tiny_tokenizer):
    lm = loaded(tiny_tokenizer, "mistral")
    states = hooked_states(lm.model, WINDOWS)
    stats = capture(lm.model, WINDOWS, [CosineSums()], progress=False)
    angle = stats.get(CosineSums()).mean_angle()
    for n in range(1, 6):
        brute = {
            start: float(
                (torch.arccos(direct_cos(states[start], states[start + n]).clamp(-1, 1)) / math.pi).mean()
            )
            for start in range(6 - n + 1)
        }
        best = min(brute, key=lambda s: brute[s])
        removed = sim.angular_select(angle, n)
        assert removed == list(range(best, best + n))  # contiguous, and the brute-force argmin
        assert sim.window_distances(angle, n) == pytest.approx([brute[s] for s in sorted(brute)], abs=1e-4)
    result = score(lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="angular-mean")
    for n in (2, 3):
        removed, info = select(result, n, method="angular-mean")
        assert removed == list(range(removed[0], removed[0] + n)) and info.num_evaluations == 6 - n + 1


def test_mi_scores_do_not_capture_cosine_and_say_how_to_get_it(tiny_tokenizer):
    """Cosine sums cost a batch of full-width unit vectors per layer: only captured for methods that read them."""
    lm = loaded(tiny_tokenizer, "llama")
    result = score(
        lm, calibration=CAL, estimator="gaussian", estimator_params=GAUSS, method="mi-prun", cache=False
    )
    assert result.evidence == {}
    with pytest.raises(MissingEvidenceError, match="miprun score --method shortgpt"):
        select(result, 2, method="shortgpt")


def test_a_baseline_pays_only_for_what_it_reads(tiny_tokenizer, monkeypatch):
    """prune --method shortgpt captures cosine sums only: no MI statistics, no MI optimum."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the MI statistics must not be captured for a method that does not read them")

    monkeypatch.setattr(CoordinateMoments, "update", refuse)
    result = prune(
        loaded(tiny_tokenizer), num_blocks=2, method="shortgpt", calibration=CAL, cache=False, progress=False
    )
    plan = result.plan
    assert plan.estimator is None and plan.scores is None and plan.search.loss is None
    assert plan.search.params["scores"] and len(plan.removed) == 2


# ----------------------------------------------------------------------------- model-driven


def test_sleb_matches_brute_force_for_one_block_and_greedy_for_two():
    model, _ = tiny_model("llama")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        before = model(ids).logits
    path = fw.sleb_path(model, WINDOWS, 2, batch_size=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # skip_blocks restored the model exactly
    single = {b: loss_without(model, [b]) for b in range(6)}
    first = min(single, key=lambda b: single[b])
    assert path.order[0] == first and path.losses[0] == pytest.approx(single[first], rel=1e-5)
    pairs = {b: loss_without(model, [first, b]) for b in range(6) if b != first}
    second = min(pairs, key=lambda b: pairs[b])
    assert path.order[1] == second and path.losses[1] == pytest.approx(pairs[second], rel=1e-5)
    assert path.forward_passes == [6, 5] and path.removed(2) == sorted([first, second])
    with pytest.raises(MissingEvidenceError, match="it holds 2 steps"):
        path.removed(3)


def test_a_nan_measurement_never_wins(monkeypatch):
    """min() keeps a NaN that comes first, since nothing compares lower than it (issue #19's rule)."""
    from miprun.errors import NonFiniteError

    def loss(_model, _windows, removed, batch_size=4):
        return math.nan if removed[-1] == 0 else float(removed[-1])

    monkeypatch.setattr(fw, "calibration_loss", loss)
    path = fw.sleb_path(tiny_model("llama")[0], WINDOWS, 2, batch_size=2)
    assert path.order == [1, 2] and all(math.isfinite(x) for x in path.losses)
    assert sim.lowest([math.nan, 2.0, 1.0, 3.0], 2) == [1, 2]
    assert sim.angular_select(torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.2], [0.0, 0.0, 0.0]]), 1) == [
        1
    ]
    with pytest.raises(NonFiniteError, match="1 of them are NaN or infinite"):
        sim.lowest([math.nan, 2.0, math.inf], 2)


def test_ppl_oneshot_equals_the_loss_of_each_block_removed_alone():
    model, _ = tiny_model("qwen3")
    one = fw.ppl_oneshot_losses(model, WINDOWS, batch_size=2)
    direct = [loss_without(model, [b]) for b in range(6)]
    assert one.losses == pytest.approx(direct, rel=1e-5) and one.forward_passes == 6
    for n in (1, 3):
        assert sim.lowest(one.losses, n) == sorted(sorted(range(6), key=lambda b: direct[b])[:n])


# ----------------------------------------------------------------------------- naive references


def test_last_n_never_removes_the_final_block():
    for total in range(3, 12):
        for n in range(1, total - 1):
            removed = naive.last_n(total, n)
            assert len(removed) == n and total - 1 not in removed and removed[-1] == total - 2
            assert removed == list(range(removed[0], removed[0] + n))
        with pytest.raises(ValueError, match="keeps the final block"):
            naive.last_n(total, total - 1)


def test_random_is_seeded_and_differs_across_seeds():
    assert naive.random_select(30, 5, seed=7) == naive.random_select(30, 5, seed=7)
    sets = {tuple(naive.random_select(30, 5, seed=s)) for s in range(5)}
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
        "angular-mean": 5,
        "sleb": 6 + 5,
        "ppl-oneshot": 6,
        "last-n": 0,
        "random": 0,
    }
    assert search.num_evaluations == expected_evaluations[method]
    assert search.gap is None and result.plan.estimator is None  # no MI capture for a baseline
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(reloaded) == 4
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-5)
    assert json.loads((out / "miprun.json").read_text())["search"]["method"] == method


def _no_forward(*_args, **_kwargs):
    raise AssertionError("the model must not run when scores are reused")


@pytest.mark.parametrize("method", ["shortgpt", "angular", "angular-mean", "sleb", "ppl-oneshot"])
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
        result = prune(
            lm, num_blocks=2, method=method, repair="none", scores=path, out=tmp_path / "p2", progress=False
        )
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
    assert select(result, 2, method="random", seed=3)[0] == naive.random_select(6, 2, 3)


def test_cli_score_and_prune_with_a_baseline(tiny_tokenizer, tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama")[0].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert main(["list", "methods"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in methods.REGISTRY)  # every method with its summary
    assert main(["prune", "--help"]) == 0 and "miprun list methods" in capsys.readouterr().out
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
                "--json",
                str(scores),
                *tiny,
            ]
        )
        == 0
    )
    assert len(json.loads(scores.read_text())["evidence"]["sleb"]["order"]) == 2
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
