"""Property-based checks of block removal over random tiny configs and random removal sets.

The oracle is independent of miprun's surgery: the dense model is run with forward hooks that make the
removed layers pass their input through unchanged.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, tiny_variant
from transformers import AutoModelForCausalLM

from miprun.model.layouts import decoder_layers, num_blocks, text_config
from miprun.model.surgery import remove_blocks

ARCHS = ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox"]  # mixed layer types included
ATOL = 1e-5


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, int, int, list[int]]:
    """(arch, layers, width, removed): at least one block removed and at least one kept."""
    arch = draw(st.sampled_from(ARCHS))
    layers = draw(st.integers(min_value=2, max_value=6))
    width = draw(st.sampled_from([32, 64]))
    removed = draw(st.sets(st.integers(0, layers - 1), min_size=1, max_size=layers - 1))
    return arch, layers, width, sorted(removed)


@contextmanager
def pass_through(model: torch.nn.Module, removed: list[int]) -> Iterator[None]:
    """Inside the block, the layers ``removed`` return their input hidden states unchanged."""

    def identity(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in removed]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_indices(model: torch.nn.Module) -> list[set[int]]:
    """For each decoder layer, the set of ``layer_idx`` values held by it and its submodules."""
    return [
        {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        for layer in decoder_layers(model)
    ]


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0
    )


@pytest.mark.integration  # builds, prunes, saves and reloads 20 models
@settings(max_examples=20, deadline=None)
@given(case=cases(), seed=st.integers(0, 2**16))
def test_removal_matches_skipping_and_survives_save_reload(case, seed):
    arch, layers, width, removed = case
    torch.set_num_threads(1)
    dense = tiny_variant(arch, layers, width, seed=seed % 7)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    with pass_through(dense, removed):
        expected = logits(dense, ids)

    pruned = remove_blocks(copy.deepcopy(dense), removed)
    kept = layers - len(removed)
    assert num_blocks(pruned) == kept == text_config(pruned.config).num_hidden_layers
    assert torch.allclose(logits(pruned, ids), expected, atol=ATOL)

    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        )
    reloaded.eval()
    assert num_blocks(reloaded) == kept
    for model in (pruned, reloaded):
        assert layer_indices(model) == [{j} for j in range(kept)]  # layer_idx runs 0..kept-1
    assert torch.allclose(logits(reloaded, ids), expected, atol=ATOL)
    prompt = ids[:1, :5]
    assert torch.equal(greedy(reloaded, prompt, use_cache=True), greedy(reloaded, prompt, use_cache=False))
