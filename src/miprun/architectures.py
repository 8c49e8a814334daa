"""Where each architecture family keeps its decoder blocks: the one seam between miprun and Hugging Face.

Everything architecture-specific is data in `LAYOUTS`, keyed by `config.model_type` (never by a model
name). The rest of miprun reaches blocks only through `decoder_layers`, `num_blocks` and `base_model`,
and never names a Hugging Face class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Layout:
    """The facts block surgery needs about one architecture family.

    Attributes:
        layers_path: dotted attribute path from the causal-LM object to the `nn.ModuleList` of decoder
            layers, e.g. "model.layers" or "transformer.h".
        num_layers_field: config field holding the layer count. Configs that name it differently (GPT-2's
            `n_layer`) alias it through `attribute_map`, so "num_hidden_layers" works for every family here.
        layer_count_fields: int fields that count layers from the bottom (Qwen2's `max_window_layers`:
            layers below it use full attention). After surgery they hold how many kept layers lay below.
        layer_index_fields: list fields whose entries are layer *indices* (Qwen3-MoE's `mlp_only_layers`);
            they are renumbered, and never trimmed as if they were per-layer lists.
        layer_idx_attrs: module attributes that hold a layer's own index (the KV-cache slot it uses).
        exact_only_if: (config field, required value) pairs. A layer whose behaviour depends on its index
            in a way the config cannot restate (GPT-2's `scale_attn_by_inverse_layer_idx`) cannot be moved
            to a new index exactly, so surgery refuses unless the field has the required value.
        base_path: dotted path to the transformer body without the LM head (Hugging Face's `base_model`
            property finds it for every family here).
    """

    layers_path: str
    num_layers_field: str = "num_hidden_layers"
    layer_count_fields: tuple[str, ...] = ()
    layer_index_fields: tuple[str, ...] = ()
    layer_idx_attrs: tuple[str, ...] = ("layer_idx",)
    exact_only_if: tuple[tuple[str, Any], ...] = ()
    base_path: str = "base_model"


LLAMA_LIKE = Layout(layers_path="model.layers")
_QWEN_WINDOWED = Layout(layers_path="model.layers", layer_count_fields=("max_window_layers",))

LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "mixtral": LLAMA_LIKE,
    "qwen2": _QWEN_WINDOWED,
    "qwen3": _QWEN_WINDOWED,
    # The MoE/dense choice is `layer_idx not in mlp_only_layers and (layer_idx + 1) % decoder_sparse_step
    # == 0`; with a step of 1 it is fully stated by `mlp_only_layers`, which is renumbered.
    "qwen3_moe": Layout(
        layers_path="model.layers",
        layer_index_fields=("mlp_only_layers",),
        exact_only_if=(("decoder_sparse_step", 1),),
    ),
    "smollm3": LLAMA_LIKE,  # its per-layer `no_rope_layers` list is trimmed like `layer_types`
    "gemma2": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "gemma3": Layout(layers_path="model.language_model.layers"),  # multimodal: edits go to text_config
    "phi3": LLAMA_LIKE,
    "gpt2": Layout(layers_path="transformer.h", exact_only_if=(("scale_attn_by_inverse_layer_idx", False),)),
    "opt": Layout(layers_path="model.decoder.layers"),
    "gpt_neox": Layout(layers_path="gpt_neox.layers"),
}

SUPPORTED: list[str] = sorted(LAYOUTS)


class UnsupportedArchitectureError(ValueError):
    """The model's `model_type` has no entry in `LAYOUTS`."""


def layout_for(config: Any) -> Layout:
    """The layout for a model config, looked up by its `model_type`.

    Raises:
        UnsupportedArchitectureError: the model_type is not in `LAYOUTS`.
    """
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        raise UnsupportedArchitectureError(
            f"miprun does not know where the decoder blocks of model_type {model_type!r} live. "
            f"Supported model_types: {', '.join(SUPPORTED)}. "
            "A decoder-only model whose causal-LM object holds its decoder layers in one nn.ModuleList "
            "can be added with one `Layout` entry in miprun/architectures.py (the path to that list and "
            "any config fields that are per-layer); please open an issue or a pull request with it."
        )
    return layout


def _get_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def layers_parent(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that owns the decoder-layer list, and the attribute name it is stored under."""
    parent_path, _, attr = layout_for(model_config(model)).layers_path.rpartition(".")
    return (_get_path(model, parent_path) if parent_path else model), attr


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of decoder layers ("blocks") of a causal LM, bottom first."""
    config = model_config(model)
    layout = layout_for(config)
    try:
        layers = _get_path(model, layout.layers_path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"model_type {config.model_type!r} is expected to keep its decoder layers at "
            f"`model.{layout.layers_path}`, but {type(model).__name__} has no such attribute ({err}). "
            "Pass the causal-LM object (the one with the LM head), not its body."
        ) from err
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"`model.{layout.layers_path}` is a {type(layers).__name__}, expected an nn.ModuleList of layers."
        )
    return layers


def num_blocks(model: nn.Module) -> int:
    """How many decoder layers the model currently runs."""
    return len(decoder_layers(model))


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head; calling it with `input_ids` runs every decoder layer."""
    body: nn.Module = _get_path(model, layout_for(model_config(model)).base_path)
    return body


def model_config(model: nn.Module) -> Any:
    """The model's Hugging Face config (`model.config`)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `config`; miprun works on Hugging Face causal-LM objects "
            "such as those from AutoModelForCausalLM.from_pretrained."
        )
    return config


def text_config(config: Any) -> Any:
    """The config that holds the layer count and per-layer fields (the text part of a multimodal one)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config
