"""Capture: hooks see the right taps, statistics are exact, bounded, batch-invariant and mergeable."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from miprun.capture.engine import capture
from miprun.capture.statistic import CapturedStats, Statistic, Tap
from miprun.capture.statistics import CoordinateMoments, Moments, TokenSample
from miprun.capture.statistics.sample import even_rows
from miprun.capture.taps import block_state_hooks, role_module
from miprun.errors import NonFiniteError
from miprun.model.layouts import decoder_layers
from miprun.options import CalibrationConfig

WINDOWS = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(0))
pytestmark = pytest.mark.integration


def cal(batch_size: int = 4, seed: int = 0, exclude_first_token: bool = False) -> CalibrationConfig:
    return CalibrationConfig(batch_size=batch_size, seed=seed, exclude_first_token=exclude_first_token)


def reference_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input and the last block's output, taken by plain hooks, flattened to (tokens, hidden)."""
    states: dict[int, torch.Tensor] = {}
    with torch.no_grad(), block_state_hooks(decoder_layers(model), lambda s, h: states.__setitem__(s, h)):
        model(input_ids=ids)
    return [states[s].reshape(-1, states[s].shape[-1]).double() for s in sorted(states)]


@pytest.mark.parametrize("arch", ARCHS)
def test_moments_equal_the_covariance_of_the_hooked_states(arch):
    model, _config = tiny_model(arch)
    stats = capture(model, WINDOWS, [Moments(proj_dim=0)], cal(), progress=False)
    moments = stats.get(Moments(proj_dim=0))
    states = reference_states(model, WINDOWS)
    assert stats.num_states == len(decoder_layers(model)) + 1 == len(states)
    assert stats.num_tokens == WINDOWS.numel()
    for a, b in [(0, 1), (2, 5), (0, stats.num_states - 1)]:
        expected = torch.cov(torch.cat([states[a], states[b]], dim=1).T)
        # float32 forward passes of different batch shapes differ in the last bits (MoE routing too)
        assert torch.allclose(moments.covariance(a, b), expected, rtol=1e-5, atol=1e-5)


def test_last_state_is_the_last_block_output_not_the_final_norm():
    model, _ = tiny_model("llama")
    states = reference_states(model, WINDOWS[:1])
    with torch.no_grad():
        hf = model(input_ids=WINDOWS[:1], output_hidden_states=True).hidden_states
    assert torch.allclose(states[0], hf[0][0].double(), atol=1e-6)
    assert torch.allclose(states[3], hf[3][0].double(), atol=1e-5)
    # HF's last entry has the final norm applied; ours is the raw block output
    assert not torch.allclose(states[-1], hf[-1][0].double(), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "mixtral"])
def test_module_role_taps_see_the_module_output(arch):
    """A statistic reading the MLP output of block 1 gets exactly what that module returns."""

    class MlpOut(CoordinateMoments):
        def taps(self, ctx):
            return [Tap(block=1, role="mlp"), Tap(state=2)]

        def update(self, parts, batch):
            self.seen = [*getattr(self, "seen", []), [p.clone() for p in parts]]

    model, _ = tiny_model(arch)
    seen: list[torch.Tensor] = []
    handle = role_module(model, 1, "mlp").register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        stats = capture(model, WINDOWS[:2], [MlpOut()], cal(batch_size=2), progress=False)
    finally:
        handle.remove()
    got = stats.statistics[0].seen  # type: ignore[attr-defined]
    assert len(got) == 1 and len(seen) == 1
    expected = (seen[0][0] if isinstance(seen[0], tuple) else seen[0]).reshape(-1, got[0][0].shape[-1])
    assert torch.equal(got[0][0], expected.float())


def test_batch_size_does_not_change_statistics():
    model, _ = tiny_model("qwen2")
    requests: list[Statistic] = [Moments(proj_dim=16), TokenSample(capacity=30)]
    one = capture(model, WINDOWS, requests, cal(batch_size=1, seed=3), progress=False)
    many = capture(model, WINDOWS, requests, cal(batch_size=4, seed=3), progress=False)
    m1, m4 = one.get(Moments(proj_dim=16)), many.get(Moments(proj_dim=16))
    # per-batch products are float32 (accumulated in float64): equal to float32 precision
    assert torch.allclose(m1.covariance(0, 4), m4.covariance(0, 4), rtol=1e-5, atol=1e-6)
    s1, s4 = one.get(TokenSample(capacity=30)), many.get(TokenSample(capacity=30))
    assert torch.allclose(s1.state(2), s4.state(2), atol=1e-6)


def test_memory_is_bounded_by_the_requests_not_the_token_count():
    model, _ = tiny_model("llama")
    requests: list[Statistic] = [Moments(proj_dim=8), TokenSample(capacity=20)]
    small = capture(model, WINDOWS[:2], requests, progress=False)
    large = capture(model, WINDOWS, requests, progress=False)
    assert large.num_tokens == 3 * small.num_tokens
    gram_small, gram_large = small.get(Moments(proj_dim=8)).gram, large.get(Moments(proj_dim=8)).gram
    assert gram_large.shape == gram_small.shape == (56, 56)
    assert large.get(TokenSample(capacity=20)).count == 20


def test_equal_requests_are_captured_once_and_a_larger_sample_serves_a_smaller_one():
    model, _ = tiny_model("llama")
    stats = capture(
        model, WINDOWS, [TokenSample(capacity=10), Moments(8), Moments(8), TokenSample(capacity=40)]
    )
    assert len(stats.statistics) == 2
    sample = stats.get(TokenSample(capacity=10))
    assert sample.capacity == 40 and sample.count == 40
    # an estimator asking for 10 tokens reads 10 spread over every window, not the first 10
    rows = even_rows(40, 10)
    assert rows.tolist() == [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]
    assert torch.equal(sample.state(2, 10), sample.state(2)[rows])


def test_first_token_can_be_excluded():
    model, _ = tiny_model("llama")
    stats = capture(model, WINDOWS, [Moments(proj_dim=8)], cal(exclude_first_token=True), progress=False)
    assert stats.num_tokens == WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)


def test_padding_is_not_sampled():
    model, _ = tiny_model("llama")
    mask = torch.ones_like(WINDOWS)
    mask[:, 9:] = 0  # right padding
    stats = capture(model, WINDOWS, [Moments(proj_dim=8)], attention_mask=mask, progress=False)
    assert stats.num_tokens == int(mask.sum())


def test_an_empty_first_batch_leaves_the_statistics_finite():
    model, _ = tiny_model("llama")
    mask = torch.ones_like(WINDOWS)
    mask[:2] = 0  # the whole first batch is padding: no sample tokens
    requests: list[Statistic] = [Moments(proj_dim=8), CoordinateMoments()]
    stats = capture(model, WINDOWS, requests, cal(batch_size=2), attention_mask=mask, progress=False)
    assert stats.num_tokens == int(mask.sum())
    assert torch.isfinite(stats.get(Moments(proj_dim=8)).covariance(0, 3)).all()
    assert all(torch.isfinite(m).all() for m in stats.get(CoordinateMoments()).moments(0, 3))


def test_non_finite_states_name_the_block_and_the_right_fix():
    model, _ = tiny_model("llama")
    layer = decoder_layers(model)[2]
    handle = layer.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    try:
        with pytest.raises(NonFiniteError, match=r"block 2 in torch.float32") as err:
            capture(model, WINDOWS, [Moments(proj_dim=8)], progress=False)
        assert "--dtype float32" not in str(err.value)  # already float32: lower precision is not the cause
    finally:
        handle.remove()


def test_non_finite_weights_are_named():
    model, _ = tiny_model("llama")
    with torch.no_grad():
        decoder_layers(model)[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite weights: model\.layers\.1\.mlp\.down_proj\.weight"):
        capture(model, WINDOWS, [Moments(proj_dim=8)], progress=False)


def test_half_precision_overflow_advises_float32():
    model, _ = tiny_model("llama")
    model = model.to(torch.bfloat16)
    handle = decoder_layers(model)[0].register_forward_hook(lambda _m, _a, out: out * float("inf"))
    try:
        with pytest.raises(NonFiniteError, match=r"overflows in torch.bfloat16.*--dtype float32"):
            capture(model, WINDOWS, [Moments(proj_dim=8)], progress=False)
    finally:
        handle.remove()


def test_captured_stats_say_what_is_missing():
    stats = CapturedStats(num_blocks=2, hidden_size=4)
    with pytest.raises(ValueError, match="did not record"):
        stats.get(Moments(proj_dim=8), "the gaussian estimator")


def test_capture_leaves_the_requests_it_is_given_untouched():
    """Calling it twice with the same list gives the same statistics (issue #19: the count doubled)."""
    from helpers import EVERY_STATISTIC, assert_same_stats

    model, _ = tiny_model("llama")
    requests = [Moments(proj_dim=0), *EVERY_STATISTIC]
    configs = [r.config() for r in requests]
    first = capture(model, WINDOWS, requests, cal(), progress=False)
    second = capture(model, WINDOWS, requests, cal(), progress=False)
    assert first.get(Moments(proj_dim=0)).count == WINDOWS.numel()
    assert_same_stats(first, second, exact=True)
    assert [r.config() for r in requests] == configs
    assert all(first.find(r) is not r for r in requests)  # the result holds its own statistics
