"""Capture: hooks see the right states, statistics are exact, bounded, batch-invariant and mergeable."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from miprun.architectures import decoder_layers
from miprun.capture import NonFiniteHiddenStateError, block_state_hooks, capture
from miprun.stats import CaptureSpec, Moments

WINDOWS = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(0))


def reference_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input and the last block's output, taken by plain hooks, flattened to (tokens, hidden)."""
    states: dict[int, torch.Tensor] = {}
    with torch.no_grad(), block_state_hooks(decoder_layers(model), lambda s, h: states.__setitem__(s, h)):
        model(input_ids=ids)
    return [states[s].reshape(-1, states[s].shape[-1]).double() for s in sorted(states)]


@pytest.mark.parametrize("arch", ARCHS)
def test_moments_equal_the_covariance_of_the_hooked_states(arch):
    model, _config = tiny_model(arch)
    stats = capture(model, WINDOWS, CaptureSpec(moments_dim=0), batch_size=4, progress=False)
    states = reference_states(model, WINDOWS)
    assert stats.num_states == len(decoder_layers(model)) + 1 == len(states)
    assert stats.num_tokens == WINDOWS.numel()
    assert stats.moments is not None
    for a, b in [(0, 1), (2, 5), (0, stats.num_states - 1)]:
        expected = torch.cov(torch.cat([states[a], states[b]], dim=1).T)
        # float32 forward passes of different batch shapes differ in the last bits (MoE routing too)
        assert torch.allclose(stats.moments.covariance(a, b), expected, rtol=1e-5, atol=1e-5)


def test_last_state_is_the_last_block_output_not_the_final_norm():
    model, _ = tiny_model("llama")
    states = reference_states(model, WINDOWS[:1])
    with torch.no_grad():
        hf = model(input_ids=WINDOWS[:1], output_hidden_states=True).hidden_states
    assert torch.allclose(states[0], hf[0][0].double(), atol=1e-6)
    assert torch.allclose(states[3], hf[3][0].double(), atol=1e-5)
    # HF's last entry has the final norm applied; ours is the raw block output
    assert not torch.allclose(states[-1], hf[-1][0].double(), atol=1e-3)


def test_batch_size_does_not_change_statistics():
    model, _ = tiny_model("qwen2")
    spec = CaptureSpec(moments_dim=16, sample_tokens=30)
    one = capture(model, WINDOWS, spec, batch_size=1, seed=3, progress=False)
    many = capture(model, WINDOWS, spec, batch_size=4, seed=3, progress=False)
    assert one.moments is not None and many.moments is not None
    # per-batch products are float32 (accumulated in float64): equal to float32 precision
    assert torch.allclose(one.moments.covariance(0, 4), many.moments.covariance(0, 4), rtol=1e-5, atol=1e-6)
    assert one.sample is not None and many.sample is not None
    assert torch.allclose(one.sample.state(2), many.sample.state(2), atol=1e-6)


def test_memory_is_bounded_by_the_spec_not_the_token_count():
    model, _ = tiny_model("llama")
    spec = CaptureSpec(moments_dim=8, sample_tokens=20)
    small = capture(model, WINDOWS[:2], spec, progress=False)
    large = capture(model, WINDOWS, spec, progress=False)
    assert large.num_tokens == 3 * small.num_tokens
    assert small.moments is not None and large.moments is not None and large.moments.gram is not None
    assert small.moments.gram is not None and large.moments.gram.shape == small.moments.gram.shape == (56, 56)
    assert large.sample is not None and large.sample.count == 20


def test_first_token_can_be_excluded():
    model, _ = tiny_model("llama")
    stats = capture(model, WINDOWS, CaptureSpec(moments_dim=8), exclude_first_token=True, progress=False)
    assert stats.num_tokens == WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)


def test_padding_is_not_sampled():
    model, _ = tiny_model("llama")
    mask = torch.ones_like(WINDOWS)
    mask[:, 9:] = 0  # right padding
    stats = capture(model, WINDOWS, CaptureSpec(moments_dim=8), attention_mask=mask, progress=False)
    assert stats.num_tokens == int(mask.sum())


def test_moments_merge_is_exact():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(300, 6, generator=gen, dtype=torch.float64) * 3 + 10
    whole, left, right = Moments(2, 3), Moments(2, 3), Moments(2, 3)
    whole.update(z)
    left.update(z[:120])
    right.update(z[120:])
    left.merge_(right)
    assert left.count == whole.count
    # merging re-centres exactly in float64; the per-batch float32 products bound the agreement
    assert torch.allclose(left.covariance(0, 1), whole.covariance(0, 1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(whole.covariance(0, 1), torch.cov(z.T), rtol=1e-6, atol=1e-6)


def test_non_finite_states_name_the_block():
    model, _ = tiny_model("llama")
    layer = decoder_layers(model)[2]
    handle = layer.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    try:
        with pytest.raises(NonFiniteHiddenStateError, match=r"block 2.*--dtype float32"):
            capture(model, WINDOWS, CaptureSpec(moments_dim=8), progress=False)
    finally:
        handle.remove()
