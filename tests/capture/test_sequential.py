"""Layer-by-layer capture gives the statistics of the whole-model pass, for every architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import CALIBRATION_TXT
from helpers import EVERY_STATISTIC, assert_same_stats
from tiny_models import ARCHS, tiny_model

from miprun.api import prune, score
from miprun.capture import sequential
from miprun.capture.engine import capture
from miprun.capture.sequential import capture_sequential, catch_layer_inputs
from miprun.capture.statistics import CosineSums, Moments, TokenSample
from miprun.model.layouts import decoder_layers
from miprun.model.loading import LoadedModel
from miprun.options import CalibrationConfig

WINDOWS = torch.randint(3, 128, (7, 12), generator=torch.Generator().manual_seed(0))
SPEC = EVERY_STATISTIC
CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, seed=0, batch_size=4)
pytestmark = pytest.mark.integration


def cal(**kw) -> CalibrationConfig:
    return CalibrationConfig(**kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_equals_the_whole_model_pass(arch):
    model, _ = tiny_model(arch)
    # 7 windows in batches of 3: a short last batch, and the global token sample spans batches
    whole = capture(model, WINDOWS, SPEC, cal(batch_size=3, seed=2), progress=False)
    layered = capture_sequential(model, WINDOWS, SPEC, cal(batch_size=3, seed=2), progress=False)
    assert_same_stats(whole, layered)


def test_sweep_size_changes_nothing_but_the_weight_traffic(monkeypatch):
    model, _ = tiny_model("gpt_neox")
    moves = []
    layer = decoder_layers(model)[0]
    original_to = layer.to
    layer.to = lambda *a, **k: (moves.append(a), original_to(*a, **k))[1]  # type: ignore[method-assign]
    monkeypatch.setattr(sequential, "PARK_BYTES", 1)
    one_per_sweep = capture_sequential(model, WINDOWS, SPEC, cal(batch_size=2), progress=False)
    assert len(moves) == 2 * 4  # 4 batches, one sweep each: to the device and back
    moves.clear()
    monkeypatch.undo()
    two_sweeps = capture_sequential(model, WINDOWS, SPEC, cal(batch_size=2), progress=False)
    assert len(moves) == 2 * 2  # a first one-batch sweep measures, the rest fit in the budget
    assert_same_stats(one_per_sweep, two_sweeps)
    assert_same_stats(one_per_sweep, capture(model, WINDOWS, SPEC, cal(batch_size=2), progress=False))


def test_sequential_respects_padding_and_the_first_token_option():
    model, _ = tiny_model("qwen2")
    mask = torch.ones_like(WINDOWS)
    mask[:3, 8:] = 0  # right padding in some windows
    settings = cal(batch_size=4, seed=1, exclude_first_token=True)
    whole = capture(model, WINDOWS, SPEC, settings, attention_mask=mask, progress=False)
    layered = capture_sequential(model, WINDOWS, SPEC, settings, attention_mask=mask, progress=False)
    assert whole.num_tokens == int(mask.sum()) - len(WINDOWS)
    assert_same_stats(whole, layered)


def test_catching_leaves_the_model_untouched_and_records_per_layer_masks():
    model, _ = tiny_model("gemma3_text")  # sliding and full attention layers get different masks
    layers = list(decoder_layers(model))
    inputs, calls = catch_layer_inputs(model, WINDOWS, [(0, 4), (4, 7)], torch.device("cpu"))
    assert list(decoder_layers(model)) == layers  # the real layers are back, in order
    assert [x.shape for x in inputs] == [(4, 12, 64), (3, 12, 64)]
    assert len(calls) == len(layers) and all(len(c) == 2 for c in calls)
    masks = [calls[i][0][1]["attention_mask"] for i in range(len(layers))]
    types = model.config.layer_types
    same = [torch.equal(masks[0], m) for m in masks]
    assert same == [t == types[0] for t in types]  # each layer got the mask of its own kind
    with torch.no_grad():
        expected = model(input_ids=WINDOWS[:4], output_hidden_states=True).hidden_states[0]
    assert torch.allclose(inputs[0], expected, atol=1e-6)  # the (scaled) embeddings


def test_layers_are_put_back_even_if_a_layer_fails():
    model, _ = tiny_model("llama")
    layers = decoder_layers(model)
    handle = layers[3].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_sequential(model, WINDOWS, SPEC, progress=False)
    finally:
        handle.remove()
    assert decoder_layers(model) is layers
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_api_sequential_gives_the_same_scores_and_blocks(tiny_tokenizer):
    def run(sequential: bool):
        lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
        kw = dict(
            calibration=CAL,
            estimator="gaussian",
            estimator_params={"proj_dim": 16},
            cache=False,
            progress=False,
        )
        scored = score(lm, sequential=sequential, **kw)
        pruned = prune(lm, num_blocks=2, method="mi-optimal", sequential=sequential, **kw)
        return scored, pruned.plan.removed

    (plain, removed_plain), (layered, removed_layered) = run(False), run(True)
    assert layered.table.to_json() == plain.table.to_json()
    assert removed_layered == removed_plain


@pytest.mark.slow
def test_sequential_equals_the_whole_model_pass_on_smollm2():
    from miprun.data import load_text, token_windows
    from miprun.model.loading import load_model

    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    windows = token_windows(lm.tokenizer, load_text("novel", "calibration"), 4, 32, seed=0)
    spec = [Moments(proj_dim=64), TokenSample(capacity=50), CosineSums()]
    whole = capture(lm.model, windows, spec, cal(batch_size=2), progress=False)
    layered = capture_sequential(lm.model, windows, spec, cal(batch_size=2), progress=False)
    assert whole.num_states == 31
    assert_same_stats(whole, layered, exact=True)
