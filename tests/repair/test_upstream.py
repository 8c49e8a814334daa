"""The linear repair fitted on the model already cut and repaired upstream (``activations=repaired``)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CAL
from tiny_models import tiny_model

from miprun.capture.statistic import Tap
from miprun.capture.statistics import LinearFitSums
from miprun.capture.taps import role_module
from miprun.model.layouts import decoder_layers
from miprun.model.loading import LoadedModel
from miprun.model.surgery import remove_blocks
from miprun.options import RuntimeOptions
from miprun.repair import RepairContext
from miprun.repair.fold import fold_into_mlp_output
from miprun.repair.linear import LinearRepair
from miprun.repair.upstream import upstream_sums

pytestmark = pytest.mark.integration


def _windows(tiny_tokenizer) -> torch.Tensor:
    from miprun.pipeline.scoring import calibration_windows

    loaded = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    return calibration_windows(loaded, CAL)[1]


def _outputs(
    model: torch.nn.Module, modules: list[torch.nn.Module], windows: torch.Tensor
) -> list[torch.Tensor]:
    """What each of ``modules`` puts out over ``windows`` in one forward pass, as (tokens, hidden) float64."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, m in enumerate(modules)
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return [seen[i].reshape(-1, seen[i].shape[-1]).double() for i in range(len(modules))]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_upstream_sums_pair_the_cut_and_repaired_models_inputs_with_the_dense_models_targets(
    arch, tiny_tokenizer
):
    dense = tiny_model(arch)[0]
    windows = _windows(tiny_tokenizer)
    role = "post_mlp_norm" if arch.startswith("gemma") else "mlp"
    # block 1 removed upstream, and block 0's MLP output remapped (any edit of the upstream model)
    d = dense.config.hidden_size
    edits = fold_into_mlp_output(
        dense, 0, torch.eye(d) + 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    )
    sums = LinearFitSums(Tap(block=2, role=role), base=3, target=5)  # the run [3..4]
    got = upstream_sums(dense, windows, sums, [1], edits, CAL)

    cut = copy.deepcopy(dense)
    with torch.no_grad():
        for name, value in edits.items():
            dict(cut.named_parameters())[name].copy_(value)
    remove_blocks(cut, [1])  # block 2 is now the cut model's block 1
    x, base = _outputs(cut, [role_module(cut, 1, role), decoder_layers(cut)[1]], windows)
    (y,) = _outputs(dense, [decoder_layers(dense)[4]], windows)
    assert got.count == x.shape[0]
    assert torch.allclose(got.xtx, x.T @ x, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got.xtd, x.T @ (y - base), rtol=1e-4, atol=1e-6)
    assert torch.allclose(got.dtd, ((y - base) ** 2).sum(0), rtol=1e-4, atol=1e-6)
    # the dense model is as it was
    assert all(
        torch.equal(a, b)
        for a, b in zip(dense.state_dict().values(), tiny_model(arch)[0].state_dict().values(), strict=True)
    )


def test_fitted_where_it_runs_a_later_runs_map_restores_the_state_it_will_see_at_least_as_well(
    tiny_tokenizer,
):
    from miprun.pipeline import RunSettings, fit_repair

    loaded = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    run = RunSettings(CAL, RuntimeOptions(), progress=False)
    removed = [1, 3, 4]  # two runs: [1] and [3..4]
    dense_fit, dense_record = fit_repair(
        loaded, LinearRepair(tokens=0, guard=0, activations="dense"), removed, run
    )
    upstream_fit, record = fit_repair(
        loaded, LinearRepair(tokens=0, guard=0, activations="repaired"), removed, run
    )
    assert (
        "activations" not in record.runs[0] and record.runs[1]["activations"] == "cut and repaired upstream"
    )
    assert "activations" not in dense_record.runs[1]
    first = [name for name in dense_fit if ".layers.0." in name]
    assert first and all(
        torch.equal(dense_fit[n], upstream_fit[n]) for n in first
    )  # the first run: the same fit
    assert any(not torch.equal(dense_fit[n], upstream_fit[n]) for n in dense_fit if ".layers.2." in n)

    # on the windows it was fitted on, the cut model's state after block 2 against the dense state after block 4:
    # least squares on exactly that error, so no other map of block 2's MLP output does better
    windows = _windows(tiny_tokenizer)
    (target,) = _outputs(loaded.model, [decoder_layers(loaded.model)[4]], windows)

    def error(edits: dict[str, torch.Tensor]) -> float:
        cut = copy.deepcopy(loaded.model)
        with torch.no_grad():
            for name, value in edits.items():
                dict(cut.named_parameters())[name].copy_(value)
        remove_blocks(cut, removed)  # block 2 is the cut model's block 1
        (state,) = _outputs(cut, [decoder_layers(cut)[1]], windows)
        return float((state - target).pow(2).sum())

    assert error(upstream_fit) <= error(dense_fit) * (1 + 1e-6)


def test_a_methods_measurement_keeps_the_dense_fit(tiny_tokenizer):
    from miprun.pipeline.scoring import calibration_windows

    model = tiny_model("llama")[0]
    loaded = LoadedModel(model, tiny_tokenizer, "tiny-llama", None)
    _, windows = calibration_windows(loaded, CAL)
    removed = [1, 3]
    repair = LinearRepair(tokens=0, guard=0, activations="repaired")
    from miprun.pipeline import RunSettings
    from miprun.pipeline.scoring import capture_pass

    stats = capture_pass(
        loaded, windows, repair.statistics(model, removed), RunSettings(CAL, RuntimeOptions(), progress=False)
    )
    measured, _ = repair.fit(RepairContext(model, removed, stats, windows, calibration=CAL, measuring=True))
    plain, _ = LinearRepair(tokens=0, guard=0, activations="dense").fit(
        RepairContext(model, removed, stats, windows, calibration=CAL)
    )
    final, _ = repair.fit(RepairContext(model, removed, stats, windows, calibration=CAL))
    assert measured.keys() == plain.keys() and all(torch.equal(measured[k], plain[k]) for k in plain)
    assert any(not torch.equal(final[k], plain[k]) for k in plain)
