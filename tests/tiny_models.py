"""Tiny random-weight causal LMs, one per supported architecture family, built in memory (no hub).

Each has 6 decoder layers so that removing two still leaves a model worth comparing. The weights are
drawn with a larger initialiser range than the library default so that every layer visibly changes the
logits: a test that removes or mis-wires a layer then fails loudly instead of within noise.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SmolLM3Config,
)

from miprun.model.layouts import SUPPORTED

NUM_LAYERS = 6
VOCAB = 128
SLIDING_WINDOW = 4  # shorter than the test prompts, so the sliding-window caches really roll over

# Fields every tiny config shares; token ids stay inside the tiny vocabulary.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MIXED = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
_MIXED.append("sliding_attention")  # six entries: sliding and full layers both on each side of a cut


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, num_key_value_heads=2)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=SLIDING_WINDOW)


def _mixtral() -> PretrainedConfig:
    return MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def _qwen2() -> PretrainedConfig:
    # Layers >= max_window_layers use sliding attention: a per-layer pattern that is counted from the bottom.
    return Qwen2Config(
        **_COMMON,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=3,
    )


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(
        **_COMMON,
        num_key_value_heads=2,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=2,
    )


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(
        **_COMMON,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[0, 3],  # dense MLP in these layers: a list of layer *indices*
    )


def _smollm3() -> PretrainedConfig:
    return SmolLM3Config(**_COMMON, num_key_value_heads=2, no_rope_layer_interval=2)


def _gemma2() -> PretrainedConfig:
    return Gemma2Config(
        **_COMMON,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(_MIXED),
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def _gemma3_text() -> PretrainedConfig:
    return Gemma3TextConfig(
        **_COMMON,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(_MIXED),
    )


def _gemma3() -> PretrainedConfig:
    # The multimodal wrapper: the decoder layers and their per-layer fields live in `text_config`.
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    text = _gemma3_text().to_dict()
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)


def _phi3() -> PretrainedConfig:
    return Phi3Config(**_COMMON, num_key_value_heads=2, original_max_position_embeddings=128)


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=NUM_LAYERS,
        n_head=4,
        n_positions=128,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )


def _opt() -> PretrainedConfig:
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
        init_std=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _gpt_neox() -> PretrainedConfig:
    return GPTNeoXConfig(
        **{k: v for k, v in _COMMON.items() if k != "pad_token_id"},
        rotary_pct=0.5,
    )


_BUILDERS = {
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "smollm3": _smollm3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
}

# Every family of the layout table (miprun.model.layouts.LAYOUTS), so a new entry there runs through every
# per-family test (tests/model/test_architectures.py, tests/capture/test_capture.py) with no line of its own
# in them.
ARCHS: list[str] = list(SUPPORTED)


def tiny_config(arch: str) -> PretrainedConfig:
    """The tiny config for `arch` (a `model_type`), with eager attention so results are reproducible."""
    if arch not in _BUILDERS:
        raise KeyError(
            f"the layout table has {arch!r}, which tests/tiny_models.py cannot build: add a tiny config for it "
            "(a `_{arch}()` builder in _BUILDERS), so the per-family suite tests the new family"
        )
    config = _BUILDERS[arch]()
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, seed: int = 0) -> tuple[PreTrainedModel, PretrainedConfig]:
    """A float32, eval-mode, random-weight causal LM of family `arch`, and its config."""
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model, model.config


def tiny_variant(arch: str, num_layers: int, hidden_size: int, seed: int = 0) -> PreTrainedModel:
    """`tiny_model(arch)` with another depth and width; per-layer config lists are cycled to the new depth.

    For the flat (non-multimodal) families without layer-index lists: not gemma3 or qwen3_moe.
    """
    config = tiny_config(arch)
    data = config.to_dict()
    for key, value in (("num_hidden_layers", num_layers), ("hidden_size", hidden_size)):
        data[config.attribute_map.get(key, key)] = value
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == NUM_LAYERS and key != "architectures":
            data[key] = [value[i % NUM_LAYERS] for i in range(num_layers)]
    variant = type(config).from_dict(data)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(variant, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
