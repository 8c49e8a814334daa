"""Repairs: a folded map equals the unfolded reference on every family, the identity map changes nothing,
the least-squares fit is the least-squares fit, and a repaired checkpoint is a stock one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CALIBRATION_TXT
from helpers import CAL, logits, with_edits
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

import miprun
from miprun.capture.taps import role_module
from miprun.errors import InvalidOptionError, UnsupportedArchitectureError
from miprun.model.layouts import decoder_layers, layer_part, layout_for, num_blocks
from miprun.model.loading import LoadedModel
from miprun.options import CalibrationConfig, RuntimeOptions
from miprun.repair import RepairContext, build
from miprun.repair.fold import embeddings_tied, fold_into_embedding, fold_into_mlp_output
from miprun.repair.linear import LinearRepair, residual_fraction, solve_diagonal, solve_map

GEMMA = ("gemma2", "gemma3_text", "gemma3")


def block_output(model: torch.nn.Module, block: int, windows: torch.Tensor) -> torch.Tensor:
    """The output of decoder layer ``block`` over ``windows``, float64."""
    seen = []
    handle = decoder_layers(model)[block].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return seen[0].double()


def random_map(d: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) / d**0.5


@pytest.mark.integration
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in GEMMA])
def test_a_folded_map_equals_the_map_applied_to_the_mlp_output(arch):
    model, _ = tiny_model(arch)
    d = model.get_input_embeddings().weight.shape[1]
    T = random_map(d)
    reference = copy.deepcopy(model)

    def apply_map(_m, _a, out):
        if isinstance(out, tuple):
            return (out[0] @ T, *out[1:])
        return out @ T

    handle = role_module(reference, 2, "mlp").register_forward_hook(apply_map)
    expected = logits(reference)
    handle.remove()
    folded = with_edits(model, fold_into_mlp_output(model, 2, T))
    assert torch.allclose(logits(folded), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(folded), logits(model), atol=1e-3)  # the map did something


@pytest.mark.integration
@pytest.mark.parametrize("arch", ARCHS)
def test_the_identity_map_changes_nothing(arch):
    model, _ = tiny_model(arch)
    d = model.get_input_embeddings().weight.shape[1]
    edits = fold_into_mlp_output(model, 1, torch.eye(d))
    params = dict(model.named_parameters())
    assert edits and all(torch.allclose(v, params[k], atol=1e-6) for k, v in edits.items())


@pytest.mark.integration
@pytest.mark.parametrize("arch", GEMMA)
def test_gemma_folds_a_per_coordinate_map_into_the_post_mlp_norm(arch):
    model, config = tiny_model(arch)
    d = model.get_input_embeddings().weight.shape[1]
    t = 1.0 + 0.2 * torch.randn(d, generator=torch.Generator().manual_seed(2))
    repair = LinearRepair()
    with pytest.raises(UnsupportedArchitectureError, match="full map does not fold"):
        LinearRepair(fold="full").statistics(model, [3])
    reference = copy.deepcopy(model)
    norm = layer_part(decoder_layers(reference)[2], layout_for(config).roles.post_mlp_norm)
    handle = norm.register_forward_hook(lambda _m, _a, out: out * t)
    expected = logits(reference)
    handle.remove()
    folded = with_edits(model, repair._fold_into_norm(model, 2, t))
    assert torch.allclose(logits(folded), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_a_run_at_block_zero_folds_into_an_untied_embedding():
    model, _ = tiny_model("llama")
    assert not embeddings_tied(model)
    d = model.get_input_embeddings().weight.shape[1]
    T = random_map(d, seed=3)
    reference = copy.deepcopy(model)
    handle = reference.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out @ T)
    expected = logits(reference)
    handle.remove()
    assert torch.allclose(logits(with_edits(model, fold_into_embedding(model, T))), expected, atol=1e-4)


def test_solve_map_is_least_squares_and_the_ridge_shrinks_it():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    true = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    y = x @ true + 0.01 * torch.randn(500, 6, generator=gen, dtype=torch.float64)
    T = solve_map(x.T @ x, x.T @ y, ridge=0.0)
    assert torch.allclose(T, torch.linalg.lstsq(x, y).solution, atol=1e-10)
    assert residual_fraction(x.T @ x, x.T @ y, (y * y).sum(0), T) == pytest.approx(
        float(((x @ T - y) ** 2).sum() / (y**2).sum()), rel=1e-9
    )
    assert solve_map(x.T @ x, x.T @ y, ridge=10.0).norm() < T.norm()
    t = solve_diagonal(x.T @ x, x.T @ y, ridge=0.0)
    assert torch.allclose(t, (x * y).sum(0) / (x * x).sum(0), atol=1e-12)


def test_linear_repair_parameters_are_checked():
    given = {"tokens": "4096", "ridge": "0.01", "weighting": "relative", "activations": "repaired"}
    assert build("linear", given).params() == {
        "tokens": 4096,
        "ridge": 0.01,
        "fold": "auto",
        "weighting": "relative",
        "guard": 8,
        "activations": "repaired",
    }
    bad_values = ({"tokens": -1}, {"ridge": -1.0}, {"fold": "half"}, {"weighting": "loud"}, {"guard": -1})
    for bad in (*bad_values, {"activations": "cut"}):
        with pytest.raises(InvalidOptionError):
            build("linear", bad)


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe", "gemma3_text"])
def test_linear_repair_lowers_the_loss_it_was_fitted_on_and_saves_a_stock_checkpoint(
    arch, tiny_tokenizer, tmp_path
):
    from miprun.data import load_text, token_windows
    from miprun.model.surgery import remove_blocks

    dense = tiny_model(arch)[0]
    out = tmp_path / "out"
    result = miprun.prune(
        LoadedModel(copy.deepcopy(dense), tiny_tokenizer, f"tiny-{arch}", None),
        miprun.PruneOptions(num_blocks=2, calibration=CAL, progress=False),
        out=out,
        method="last-n",
        repair="linear",
        # fit on the calibration windows themselves; unguarded: on a random tiny model the loss moves by noise
        repair_params={"tokens": 0, "guard": 0},
    )
    plan = result.plan
    assert plan.removed == [3, 4] and plan.repair.name == "linear" and plan.repair.changed
    assert all(run["unexplained"] < 1.0 for run in plan.repair.runs)
    # on the windows it was fitted on, the stream after the cut is closer to what the dense model passed on
    windows = token_windows(tiny_tokenizer, load_text(str(CALIBRATION_TXT), "calibration"), 4, 24, 0)
    plain = remove_blocks(copy.deepcopy(dense), plan.removed)
    target = block_output(dense, 4, windows)  # what the dense model's last removed block passed on
    repaired_error = (block_output(result.model, 2, windows) - target).pow(2).sum()
    plain_error = (block_output(plain, 2, windows) - target).pow(2).sum()
    # (a per-coordinate map, all that folds on Gemma, restores less than a full one)
    assert repaired_error < (0.99 if arch in GEMMA else 0.9) * plain_error
    # a stock checkpoint: the plain cut's parameters, reloaded with identical logits
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(reloaded) == num_blocks(dense) - 2
    assert reloaded.num_parameters() == plain.num_parameters() == result.model.num_parameters()
    assert [n for n, _ in reloaded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)
    manifest = json.loads((out / "miprun.json").read_text())
    assert manifest["repair"]["name"] == "linear" and manifest["repair"]["replay"] == "refit"
    with pytest.raises(InvalidOptionError, match="load the pruned folder itself"):
        miprun.apply_plan(copy.deepcopy(dense), out / "miprun.json")


def test_relative_weighting_weighs_each_token_by_its_target_scale():
    from miprun.capture.statistic import BatchInfo, Tap
    from miprun.capture.statistics import LinearFitSums

    gen = torch.Generator().manual_seed(0)
    x, base, y = (torch.randn(40, 5, generator=gen) for _ in range(3))
    y[:5] *= 100.0  # a few high-norm tokens
    batch = BatchInfo(0, 1, torch.ones(40, dtype=torch.bool), 0, torch.tensor([39]))
    sums = LinearFitSums(Tap(state=0), base=1, target=2, relative=True)
    sums.update([x, base, y], batch)
    w = 1.0 / y.double().pow(2).mean(-1, keepdim=True)
    assert torch.allclose(sums.xtx, (x.double() * w).T @ x.double(), rtol=1e-9)
    assert torch.allclose(sums.xtd, (x.double() * w).T @ (y.double() - base.double()), rtol=1e-9)


@pytest.mark.integration
def test_a_diagonal_map_folds_into_the_output_projection_where_there_is_no_post_mlp_norm(tiny_tokenizer):
    from miprun.pipeline import RunSettings, fit_repair
    from miprun.repair.fold import mlp_output_projection

    model = tiny_model("llama")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    edits, record = fit_repair(loaded, LinearRepair(fold="diagonal", tokens=0), [3, 4], run)
    _path, owner, local = mlp_output_projection(model, 2)
    weight = getattr(owner, local)
    (name,) = edits
    ratio = edits[name].double() / weight.detach().double()  # nn.Linear (out, in): row j scaled by t_j
    assert record.runs[0]["fold"] == "mlp output projection (per coordinate)"
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-6)  # one scale per output row
    assert not torch.allclose(ratio, torch.ones_like(ratio))


@pytest.mark.integration
def test_the_guard_keeps_a_fold_only_where_it_lowers_the_cut_models_loss(tiny_tokenizer, monkeypatch):
    import miprun.repair.linear as linear
    from miprun.model.edits import edited
    from miprun.model.perplexity import mean_nll
    from miprun.model.surgery import skip_blocks
    from miprun.pipeline import RunSettings, fit_repair

    model = tiny_model("llama")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)

    from miprun.pipeline.scoring import calibration_windows

    guarded = LinearRepair(tokens=0, guard=3)
    _, drawn = calibration_windows(loaded, guarded.calibration(CAL))
    fit_windows, check = guarded.split(drawn)
    _, scoring = calibration_windows(loaded, CAL)
    assert (
        check is not None and torch.equal(fit_windows, scoring) and check.shape[0] == 3
    )  # left out of the fit
    unguarded, _ = fit_repair(loaded, LinearRepair(tokens=0, guard=0), [3, 4], run)
    edits, record = fit_repair(loaded, guarded, [3, 4], run)
    guard = record.runs[0]["guard"]
    with skip_blocks(model, [3, 4]):
        assert guard["loss_without"] == pytest.approx(mean_nll(model, check)[0], rel=1e-6)
    with edited(model, unguarded), skip_blocks(model, [3, 4]):  # the loss of the cut model with the fold
        assert guard["loss_with"] == pytest.approx(mean_nll(model, check)[0], rel=1e-6)
    kept = guard["loss_with"] < guard["loss_without"]
    assert (edits == unguarded) if kept else (edits == {} and "reverted" in record.runs[0])

    # a fold that makes the cut model confidently wrong (its logits x1000) is reverted; guard=0 keeps it
    name = "model.norm.weight"
    harmful = {name: dict(model.named_parameters())[name].detach() * 1000.0}
    fitted = [({"first": 3, "last": 4}, harmful)]
    context = RepairContext(model, [3, 4], None, fit_windows, check=check)
    assert LinearRepair(guard=3)._guarded(context, fitted) == {}
    assert "raised the cut model's loss" in fitted[0][0]["reverted"]
    monkeypatch.setattr(linear, "solve_map", lambda *a: 1e-3 * torch.eye(a[0].shape[0], dtype=a[0].dtype))
    edits, record = fit_repair(loaded, LinearRepair(tokens=0, guard=0), [1, 3, 4], run)
    assert len(edits) == 2 and "guard" not in record.runs[0]  # guard=0 keeps every fold, unchecked


def untied(arch: str) -> torch.nn.Module:
    from tiny_models import tiny_config

    config = tiny_config(arch)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not embeddings_tied(model)
    return model


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_a_block_zero_fold_maps_the_whole_state_zero_position_embeddings_included(arch):
    from miprun.repair.fold import embedding_fold_error

    model = untied(arch)
    d = model.get_input_embeddings().weight.shape[1]
    T = random_map(d, seed=4)
    reference = copy.deepcopy(model)
    handle = decoder_layers(reference)[0].register_forward_pre_hook(
        lambda _m, args, kwargs: (
            ((args[0] @ T, *args[1:]), kwargs)
            if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ T})
        ),
        with_kwargs=True,
    )
    expected = logits(reference)
    handle.remove()
    edits = fold_into_embedding(model, T)
    assert len(edits) == (1 if arch == "llama" else 2)  # GPT-2's wpe and OPT's embed_positions are mapped too
    assert embedding_fold_error(model, edits, T) < 1e-5
    assert torch.allclose(logits(with_edits(model, edits)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_a_block_zero_fold_that_would_not_be_exact_is_refused_with_the_reason(tiny_tokenizer, monkeypatch):
    import miprun.repair.fold as fold
    from miprun.pipeline import RunSettings, fit_repair

    model = untied("gpt2")
    monkeypatch.setattr(fold, "_position_tables", lambda _model: [])  # the old fold: token embedding only
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-gpt2", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    edits, record = fit_repair(loaded, LinearRepair(tokens=0, guard=0), [0, 1], run)
    assert edits == {} and "does not give (state 0) @ T" in record.runs[0]["skipped"]


def test_a_rank_deficient_fit_is_regularised_and_says_so():
    from miprun.repair.linear import RANK_FLOOR, effective_ridge

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    x[:, 5] = x[:, 2]  # two equal coordinates: X^T X is singular
    y = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    ridge, note = effective_ridge(x.T @ x, 0.0)
    assert ridge == RANK_FLOOR and "rank-deficient" in note
    assert effective_ridge(x.T @ x, 1e-4) == (1e-4, None)  # the default ridge already regularises
    assert effective_ridge(x[:, :5].T @ x[:, :5], 0.0) == (0.0, None)  # full rank: ridge 0 stays 0
    assert solve_map(x.T @ x, x.T @ y, ridge).abs().max() < 10  # no huge entries in the null direction


@pytest.mark.integration
def test_ridge_zero_on_a_rank_deficient_calibration_is_recorded_and_the_guard_without_windows_says_so(
    tiny_tokenizer, monkeypatch
):
    from miprun.pipeline import RunSettings, fit_repair

    model = tiny_model("llama")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    # 4 windows x 24 tokens = 96 tokens for a 64-wide X: with one window only, X^T X has rank <= 24
    one = CalibrationConfig(source=str(CALIBRATION_TXT), samples=1, seq_len=24, batch_size=1)
    run = RunSettings(one, RuntimeOptions(), progress=False)
    edits, record = fit_repair(loaded, LinearRepair(tokens=0, guard=0, ridge=0.0), [3, 4], run)
    assert "rank-deficient" in record.runs[0]["regularised"]
    assert edits and all(bool(torch.isfinite(v).all()) for v in edits.values())
    unchecked = LinearRepair(tokens=0, guard=8)
    monkeypatch.setattr(unchecked, "split", lambda windows: (windows, None))  # fit() given no check windows
    _, unchecked_record = fit_repair(loaded, unchecked, [3, 4], run)
    assert unchecked_record.runs[0]["guard"].startswith("not run: no calibration windows were left out")


def test_ridge_must_be_sane():
    with pytest.raises(InvalidOptionError, match="ridge must be a number from 0 to"):
        LinearRepair(ridge=1e308)


@pytest.mark.integration
def test_a_text_shorter_than_the_repairs_tokens_gives_it_every_window_it_holds_and_says_so(
    tiny_tokenizer, caplog
):
    """The default 32,768 fitting tokens are more than a short --calib holds: the fit reads all of it."""
    from miprun.data import available_windows, load_text
    from miprun.pipeline import RunSettings, fit_repair

    loaded = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    held = available_windows(tiny_tokenizer, load_text(str(CALIBRATION_TXT), "calibration"), CAL.seq_len)
    repair = LinearRepair(guard=2)  # tokens at the default
    assert held < repair.tokens // CAL.seq_len  # the text is shorter than the repair asks for
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    with caplog.at_level("WARNING"):
        edits, record = fit_repair(loaded, repair, [3, 4], run)
    assert record.tokens == (held - 2) * CAL.seq_len  # every window but the guard's two
    assert (
        edits
        and record.runs[0].get("guard")
        != "not run: no calibration windows were left out of the fit to check it on"
    )
    assert f"the calibration text holds {held}" in caplog.text
