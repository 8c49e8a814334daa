"""One suite run over every architecture family: layouts, block removal, skipping, generation, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS, NUM_LAYERS, SLIDING_WINDOW, VOCAB, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, BertConfig, PretrainedConfig, T5Config

from miprun.capture.taps import block_state_hooks
from miprun.errors import InvalidOptionError, InvalidTypeError, MiprunError
from miprun.model.layouts import (
    SUPPORTED,
    UnsupportedArchitectureError,
    base_model,
    decoder_layers,
    has_part,
    layer_part,
    layout_for,
    mlp_adds_to_residual,
    num_blocks,
    text_config,
)
from miprun.model.surgery import remove_blocks, skip_blocks

REMOVED = [1, 3]
KEPT = [i for i in range(NUM_LAYERS) if i not in REMOVED]
ATOL = 1e-5


def _input_ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)  # no special tokens


@torch.no_grad()
def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def _generate(model: torch.nn.Module, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0
    )


def _layer_indices(model: torch.nn.Module) -> list[list[int]]:
    """For each decoder layer, the `layer_idx` values found in it and its submodules."""
    return [
        [m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        for layer in decoder_layers(model)
    ]


def _per_layer_lists(config: PretrainedConfig, length: int) -> dict[str, list]:
    return {
        k: list(v)
        for k, v in vars(text_config(config)).items()
        if isinstance(v, (list, tuple)) and len(v) == length and not k.startswith("_")
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and on a busy machine extra threads spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


# --- layouts ----------------------------------------------------------------------------------------


def test_the_per_family_suite_runs_over_the_whole_layout_table() -> None:
    """The `arch` fixture is the layout table itself; each of its families has a tiny model to test."""
    from tiny_models import _BUILDERS

    assert sorted(ARCHS) == SUPPORTED
    missing = sorted(set(SUPPORTED) - set(_BUILDERS))
    assert not missing, f"layout families with no tiny config in tests/tiny_models.py: {missing}"


@pytest.mark.integration
def test_every_tiny_arch_has_a_layout(arch: str) -> None:
    model, config = tiny_model(arch)
    assert arch in SUPPORTED
    assert layout_for(config) is layout_for(model.config)
    assert num_blocks(model) == NUM_LAYERS == text_config(config).num_hidden_layers
    assert all(isinstance(layer, torch.nn.Module) for layer in decoder_layers(model))


@pytest.mark.integration
def test_base_model_runs_every_layer_and_has_no_head(arch: str) -> None:
    model, _ = tiny_model(arch)
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            out = base_model(model)(input_ids=_input_ids(), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(NUM_LAYERS))
    assert out.last_hidden_state.shape[-1] != VOCAB  # hidden states, not logits


@pytest.mark.parametrize(
    "config",
    [T5Config(), BertConfig(), PretrainedConfig()],
    ids=["t5", "bert", "no-model-type"],
)
def test_unknown_architecture_names_what_is_supported(config: PretrainedConfig) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        layout_for(config)
    message = str(info.value)
    assert repr(config.model_type) in message
    assert all(name in message for name in SUPPORTED)
    assert "Layout" in message and "issue" in message


def test_made_up_model_type_is_refused_with_a_valueerror() -> None:
    class MadeUpConfig(PretrainedConfig):
        model_type = "made_up_lm"

    with pytest.raises(ValueError, match="made_up_lm") as info:
        layout_for(MadeUpConfig())
    assert isinstance(info.value, MiprunError)


def _zero_block_outputs(model: torch.nn.Module) -> None:
    """Zero each block's attention and MLP output projections (and their biases), found through the roles."""
    roles = layout_for(model.config).roles
    with torch.no_grad():
        for layer in decoder_layers(model):
            mlp_out = [p for p in roles.mlp_out_proj if has_part(layer, p)]
            assert mlp_out, f"no MLP output projection among {roles.mlp_out_proj}"
            for path in (roles.attn_out_proj, mlp_out[0]):
                layer_part(layer, path).zero_()
                bias = path.removesuffix(".weight") + ".bias"
                if path.endswith(".weight") and has_part(layer, bias) and layer_part(layer, bias) is not None:
                    layer_part(layer, bias).zero_()


@pytest.mark.integration
def test_roles_name_the_parts_that_write_to_the_residual_stream(arch: str) -> None:
    model, _ = tiny_model(arch)
    roles = layout_for(model.config).roles
    for layer in decoder_layers(model):
        for name in ("mlp", "pre_mlp_norm", "input_norm", "post_mlp_norm", "post_attn_norm"):
            path = getattr(roles, name)
            if path is not None:
                assert isinstance(layer_part(layer, path), torch.nn.Module), (name, path)
        assert isinstance(layer_part(layer, roles.attn_out_proj), torch.nn.Parameter)
        mlp_out = [p for p in roles.mlp_out_proj if has_part(layer, p)]
        assert mlp_out and mlp_out[0].startswith(roles.mlp + "."), (
            "the projection must produce the MLP's output"
        )
        assert isinstance(layer_part(layer, mlp_out[0]), torch.nn.Parameter)
    assert mlp_adds_to_residual(model)  # every tiny model is pre-norm

    # With both output projections zeroed every block passes its input through unchanged: the roles
    # account for everything a block adds to the residual stream (what a repair edits).
    def block_states() -> dict[int, torch.Tensor]:
        states: dict[int, torch.Tensor] = {}
        with torch.no_grad(), block_state_hooks(decoder_layers(model), lambda s, h: states.setdefault(s, h)):
            base_model(model)(input_ids=_input_ids(), use_cache=False)
        assert sorted(states) == list(range(NUM_LAYERS + 1))
        return states

    dense = block_states()
    assert all((dense[s] - dense[0]).abs().max() > 1e-3 for s in range(1, NUM_LAYERS + 1))
    _zero_block_outputs(model)
    states = block_states()
    for s in range(1, NUM_LAYERS + 1):
        torch.testing.assert_close(states[s], states[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(states[0], dense[0], atol=0, rtol=0)  # the embeddings are untouched


# --- remove_blocks ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_remove_blocks_fixes_structure_and_config(arch: str) -> None:
    model, config = tiny_model(arch)
    before = _per_layer_lists(config, NUM_LAYERS)
    kept_layers = [decoder_layers(model)[i] for i in KEPT]

    assert remove_blocks(model, REMOVED) is model

    assert num_blocks(model) == NUM_LAYERS - 2 == text_config(model.config).num_hidden_layers
    assert all(a is b for a, b in zip(decoder_layers(model), kept_layers, strict=True))
    after = _per_layer_lists(model.config, NUM_LAYERS - 2)
    for name, values in before.items():
        assert after.get(name) == [values[i] for i in KEPT], name
    indices = _layer_indices(model)
    assert all(indices), "every layer keeps at least one layer_idx"
    assert indices == [[new] * len(found) for new, found in enumerate(indices)]


@pytest.mark.integration
def test_remove_blocks_recounts_and_renumbers_layer_fields() -> None:
    model, _ = tiny_model("qwen2")  # max_window_layers=3: layers 0..2 full attention
    remove_blocks(model, REMOVED)
    assert model.config.max_window_layers == 2  # kept layers 0 and 2 lay below 3
    model, _ = tiny_model("qwen3_moe")  # mlp_only_layers=[0, 3]
    remove_blocks(model, REMOVED)
    assert model.config.mlp_only_layers == [0]


@pytest.mark.integration
def test_pruned_logits_equal_dense_with_blocks_skipped(arch: str) -> None:
    dense, _ = tiny_model(arch)
    pruned = remove_blocks(copy.deepcopy(dense), REMOVED)
    ids = _input_ids()
    full = _logits(dense, ids)
    with skip_blocks(dense, REMOVED) as skipped:
        assert num_blocks(skipped) == NUM_LAYERS - 2
        reference = _logits(skipped, ids)
    torch.testing.assert_close(_logits(pruned, ids), reference, atol=ATOL, rtol=0)
    assert (full - reference).abs().max() > 1e-2, "removing two blocks should change the logits"
    torch.testing.assert_close(_logits(dense, ids), full, atol=0, rtol=0)  # restored exactly
    assert num_blocks(dense) == NUM_LAYERS
    assert _layer_indices(dense) == [[i] * len(f) for i, f in enumerate(_layer_indices(dense))]


@torch.no_grad()
def _logits_with_identity_blocks(
    model: torch.nn.Module, input_ids: torch.Tensor, removed: list[int]
) -> torch.Tensor:
    """Logits of the dense model with blocks `removed` replaced by the identity: an independent reference.

    Unlike `skip_blocks`, this keeps every layer, config field and attention mask of the dense model, so it
    catches a surgery that changes what the kept layers do (a mis-trimmed `layer_types`, say).
    """
    inputs: dict[int, torch.Tensor] = {}

    def remember(layer, args, kwargs):
        inputs[id(layer)] = args[0] if args else kwargs["hidden_states"]

    def pass_through(layer, args, kwargs, output):
        if isinstance(output, tuple):
            return (inputs[id(layer)], *output[1:])
        return inputs[id(layer)]

    handles = []
    for i in removed:
        layer = decoder_layers(model)[i]
        handles.append(layer.register_forward_pre_hook(remember, with_kwargs=True))
        handles.append(layer.register_forward_hook(pass_through, with_kwargs=True))
    try:
        return _logits(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.integration
def test_pruned_logits_equal_dense_with_identity_blocks(arch: str) -> None:
    dense, _ = tiny_model(arch)
    pruned = remove_blocks(copy.deepcopy(dense), REMOVED)
    ids = _input_ids(length=3 * SLIDING_WINDOW)  # long enough for sliding and full attention to differ
    reference = _logits_with_identity_blocks(dense, ids, REMOVED)
    torch.testing.assert_close(_logits(pruned, ids), reference, atol=ATOL, rtol=0)


@pytest.mark.integration
def test_cached_generation_equals_uncached_after_removal(arch: str) -> None:
    model, _ = tiny_model(arch)
    remove_blocks(model, REMOVED)
    prompt = _input_ids(batch=1, length=2 * SLIDING_WINDOW, seed=1)  # longer than the sliding window
    cached = _generate(model, prompt, use_cache=True)
    assert cached.shape[1] == prompt.shape[1] + 8
    assert torch.equal(cached, _generate(model, prompt, use_cache=False))


@pytest.mark.integration
def test_save_and_reload_gives_same_model(arch: str, tmp_path) -> None:
    model, _ = tiny_model(arch)
    remove_blocks(model, REMOVED)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    reloaded.eval()
    assert num_blocks(reloaded) == NUM_LAYERS - 2
    assert _per_layer_lists(reloaded.config, NUM_LAYERS - 2) == _per_layer_lists(model.config, NUM_LAYERS - 2)
    ids = _input_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("removed", "error", "message"),
    [
        ([1, 1], InvalidOptionError, r"unique; \[1\] appear more than once"),
        ([NUM_LAYERS], InvalidOptionError, rf"must lie in \[0, {NUM_LAYERS - 1}\].*got \[{NUM_LAYERS}\]"),
        ([-1], InvalidOptionError, "Negative indices are not accepted"),
        (list(range(NUM_LAYERS)), InvalidOptionError, f"Cannot remove all {NUM_LAYERS} blocks"),
        ([0.5], InvalidTypeError, r"must be integers, got 0\.5 \(float\)"),
        ([True], InvalidTypeError, "must be integers, got the bool True"),
    ],
    ids=["duplicate", "out-of-range", "negative", "all", "float", "bool"],
)
@pytest.mark.integration
def test_invalid_removal_sets_raise_and_leave_model_alone(removed: list, error: type, message: str) -> None:
    model, _ = tiny_model("llama")
    layers = decoder_layers(model)
    with pytest.raises(error, match=message):
        remove_blocks(model, removed)
    with pytest.raises(error, match=message), skip_blocks(model, removed):
        pass
    assert decoder_layers(model) is layers
    assert num_blocks(model) == NUM_LAYERS == model.config.num_hidden_layers


@pytest.mark.integration
def test_removal_refused_when_layers_depend_on_their_index() -> None:
    config = tiny_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(model, REMOVED)
    config = tiny_config("qwen3_moe")
    config.decoder_sparse_step = 2
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        remove_blocks(model, REMOVED)


@pytest.mark.integration
def test_skip_blocks_restores_on_exception() -> None:
    model, config = tiny_model("gemma2")
    layers, layer_types = decoder_layers(model), config.layer_types
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(model, REMOVED):
        assert len(model.config.layer_types) == NUM_LAYERS - 2
        raise RuntimeError("boom")
    assert decoder_layers(model) is layers
    assert model.config.layer_types is layer_types
    assert model.config.num_hidden_layers == NUM_LAYERS
    assert _layer_indices(model) == [[i] * len(f) for i, f in enumerate(_layer_indices(model))]


@pytest.mark.integration
def test_stale_layer_idx_breaks_cached_generation() -> None:
    """Why `layer_idx` is renumbered: with the old indices the KV cache is read from the wrong slots."""
    model, _ = tiny_model("llama")
    stale = {id(m): m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")}
    remove_blocks(model, [0, 2])
    for module in model.modules():
        if id(module) in stale:
            module.layer_idx = stale[id(module)]
    prompt = _input_ids(batch=1, length=8, seed=1)
    uncached = _generate(model, prompt, use_cache=False)  # does not touch the cache, so still right
    try:
        cached = _generate(model, prompt, use_cache=True)
    except IndexError:
        # transformers 5 sizes the cache from the config, so the highest stale index points past its end.
        return
    assert not torch.equal(cached, uncached)  # a cache that grows on demand silently mixes up slots


# --- random removal sets ----------------------------------------------------------------------------

_removal_sets = st.sets(st.integers(0, NUM_LAYERS - 1), max_size=NUM_LAYERS - 1).map(sorted)


@pytest.mark.integration  # 8 random removal sets per family, each pruned and generated from
@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@settings(max_examples=8, deadline=None)
@given(removed=_removal_sets)
def test_random_removals_match_skipping(name: str, removed: list[int]) -> None:
    dense, _ = tiny_model(name)
    ids = _input_ids(batch=1, length=2 * SLIDING_WINDOW)
    with skip_blocks(dense, removed):
        reference = _logits(dense, ids)
        skipped_generation = _generate(dense, ids, use_cache=True)
    torch.testing.assert_close(
        _logits_with_identity_blocks(dense, ids, removed), reference, atol=ATOL, rtol=0
    )
    pruned = remove_blocks(dense, removed)
    assert num_blocks(pruned) == NUM_LAYERS - len(removed)
    torch.testing.assert_close(_logits(pruned, ids), reference, atol=ATOL, rtol=0)
    assert torch.equal(_generate(pruned, ids, use_cache=True), skipped_generation)
    assert torch.equal(skipped_generation, _generate(pruned, ids, use_cache=False))
