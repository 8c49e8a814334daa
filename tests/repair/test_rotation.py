"""The scaled-rotation map: its fit recovers a planted map, never does worse than changing nothing, and its
fold through Gemma's post-MLP norm equals the map applied to the norm's output."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CAL, logits, with_edits
from tiny_models import tiny_model

from miprun.model.layouts import decoder_layers, layer_part, layout_for
from miprun.model.loading import LoadedModel
from miprun.options import RuntimeOptions
from miprun.repair.linear import LinearRepair, _adds_one
from miprun.repair.rotation import as_map, fit_scaled_rotation, polar

GEN = torch.Generator().manual_seed(0)


def planted(n: int = 3000, d: int = 24, noise: float = 0.01):
    z = torch.randn(n, d, generator=GEN, dtype=torch.float64) * torch.linspace(
        0.5, 2.0, d, dtype=torch.float64
    )
    s = 1.0 + 0.3 * torch.rand(d, generator=GEN, dtype=torch.float64)
    q = polar(torch.randn(d, d, generator=GEN, dtype=torch.float64))
    scale = 0.5 + torch.rand(d, generator=GEN, dtype=torch.float64)
    r = z @ q * scale + noise * torch.randn(n, d, generator=GEN, dtype=torch.float64)
    return z * s, r, s


def test_the_fit_recovers_a_planted_scaled_rotation():
    p, r, s = planted()
    fit = fit_scaled_rotation(p.T @ p, p.T @ r, s, ridge=0.0, iterations=300)
    assert torch.allclose(
        fit.rotation.T @ fit.rotation, torch.eye(p.shape[1], dtype=torch.float64), atol=1e-9
    )
    unexplained = (p @ as_map(fit, s) - r).pow(2).sum() / r.pow(2).sum()
    assert unexplained < 1e-3  # the noise's share is ~1e-4
    assert fit.error == pytest.approx(float((p @ as_map(fit, s) - r).pow(2).sum() - r.pow(2).sum()), rel=1e-6)


def test_the_fit_is_never_worse_than_the_map_that_changes_nothing():
    p, _, s = planted()
    r = torch.randn(p.shape, generator=GEN, dtype=torch.float64)  # nothing to explain
    fit = fit_scaled_rotation(p.T @ p, p.T @ r, s, ridge=1e-4)
    unchanged = float((p - r).pow(2).sum() - r.pow(2).sum())
    assert fit.error <= unchanged


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "gemma3"])
def test_a_scaled_rotation_folds_exactly_through_the_post_mlp_norm(arch):
    model, config = tiny_model(arch)
    d = model.get_input_embeddings().weight.shape[1]
    block = 2
    norm = layer_part(decoder_layers(model)[block], layout_for(config).roles.post_mlp_norm)
    s = norm.weight.detach().double() + (1.0 if _adds_one(norm) else 0.0)
    q = polar(torch.randn(d, d, generator=GEN, dtype=torch.float64))
    scale = 0.5 + torch.rand(d, generator=GEN, dtype=torch.float64)
    m = (1.0 / s)[:, None] * q * scale[None, :]  # the map diag(s)^-1 Q D on the norm's output
    reference = copy.deepcopy(model)
    ref_norm = layer_part(decoder_layers(reference)[block], layout_for(config).roles.post_mlp_norm)
    handle = ref_norm.register_forward_hook(lambda _m, _a, out: (out.double() @ m).to(out.dtype))
    expected = logits(reference)
    handle.remove()
    repair = LinearRepair()
    from miprun.repair.fold import fold_into_mlp_output

    edits = {**fold_into_mlp_output(model, block, q), **repair._fold_into_norm(model, block, scale / s)}
    folded = logits(with_edits(model, edits))
    assert torch.allclose(folded, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(folded, logits(model), atol=1e-3)  # the map did something


@pytest.mark.integration
def test_gemma_repairs_by_a_scaled_rotation_by_default_and_it_beats_the_diagonal_fold(tiny_tokenizer):
    from miprun.pipeline import RunSettings, fit_repair

    model = tiny_model("gemma3_text")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-gemma3", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    rotation, record = fit_repair(loaded, LinearRepair(tokens=0, guard=0), [3, 4], run)
    _, diagonal = fit_repair(loaded, LinearRepair(tokens=0, guard=0, fold="diagonal"), [3, 4], run)
    (run_record,) = record.runs
    assert run_record["fold"] == "mlp output projection (rotation) and post-mlp norm (scale)"
    assert sorted(rotation) == [
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.post_feedforward_layernorm.weight",
    ]
    # the diagonal maps are scaled rotations with Q = I: the fit can only explain more
    assert run_record["unexplained"] <= diagonal.runs[0]["unexplained"] + 1e-9


@pytest.mark.integration
def test_a_scaled_rotation_folds_into_the_output_projection_where_there_is_no_norm(tiny_tokenizer):
    from miprun.pipeline import RunSettings, fit_repair

    model = tiny_model("llama")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    edits, record = fit_repair(loaded, LinearRepair(tokens=0, guard=0, fold="rotation"), [3, 4], run)
    assert record.runs[0]["fold"] == "mlp output projection (scaled rotation)"
    assert list(edits) == ["model.layers.2.mlp.down_proj.weight"]
