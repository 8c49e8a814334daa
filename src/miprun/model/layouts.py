"""Where each architecture family keeps its decoder blocks and their parts: the one seam to Hugging Face.

Everything architecture-specific is data in `LAYOUTS`, keyed by `config.model_type` (never by a model
name): where the blocks live, which config fields are per-layer, and the *roles* of the modules inside a
block (the MLP and its output projection, the attention output projection, the norms around them), so
that a repair finds them on every family. The rest of miprun reaches blocks only through the functions
here and never names a Hugging Face class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from miprun.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Roles:
    """Dotted paths, relative to one decoder layer, of the modules a repair reads or edits.

    Attributes:
        mlp: the module whose output is the MLP's contribution *before* any post-MLP norm (the sparse
            MoE block for MoE families).
        mlp_out_proj: parameter paths of the projection(s) that produce that output, in the order tried;
            a path may name a fused 3-D experts tensor ``(experts, out, in)``.
        attn_out_proj: the attention output projection's weight.
        post_mlp_norm: the norm applied to the MLP output before the residual add (Gemma 2/3), if any.
        pre_mlp_norm: the norm the MLP reads through.
        input_norm: the norm the attention reads through.
        post_attn_norm: the norm applied to the attention output before the add (Gemma 2/3), if any.
    """

    mlp: str = "mlp"
    mlp_out_proj: tuple[str, ...] = ("mlp.down_proj.weight", "mlp.experts.down_proj")
    attn_out_proj: str = "self_attn.o_proj.weight"
    post_mlp_norm: str | None = None
    pre_mlp_norm: str = "post_attention_layernorm"
    input_norm: str = "input_layernorm"
    post_attn_norm: str | None = None


LLAMA_ROLES = Roles()
GEMMA_ROLES = Roles(
    post_mlp_norm="post_feedforward_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
)


@dataclass(frozen=True)
class GgufFacts:
    """How llama.cpp stores a family in a GGUF file: what miprun's GGUF writer needs to know about it.

    Attributes:
        arch: llama.cpp's architecture name (``general.architecture``), e.g. "llama" for Mistral too.
        on_load: how transformers' GGUF loader changes a tensor on load, which the writer inverts for a
            repaired tensor: "none", "plus_one_norms" (norms stored as w + 1), "permuted_qk" (llama.cpp's
            RoPE row order for Q and K) or "transposed" (the tensors ending in ``transposed``); None when
            not known, so a repaired tensor cannot be written (plain pruning still works).
        transposed: GGUF tensor-name endings Hugging Face stores transposed (GPT-2's Conv1D weights).
        period: the positional period of layer roles that no GGUF key states (llama.cpp hard-codes it):
            the layer at index i is the odd one out when (i + 1) % period == 0.
        wrapper_prefix: the Hugging Face prefix of the text decoder inside a multimodal wrapper (a GGUF
            holds only that decoder, named as ``model.``).
    """

    arch: str
    on_load: str | None = "none"
    transposed: tuple[str, ...] = ()
    period: int | None = None
    wrapper_prefix: str = ""


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
        roles: where the parts of a block are (see :class:`Roles`).
        residual_mlp: whether the MLP output is added straight to the residual stream after the block's
            other work (pre-norm blocks), so a linear map folded into its output projection adds to
            what the block passes on. False for post-norm variants (OPT with do_layer_norm_before=False).
    """

    layers_path: str
    num_layers_field: str = "num_hidden_layers"
    layer_count_fields: tuple[str, ...] = ()
    layer_index_fields: tuple[str, ...] = ()
    layer_idx_attrs: tuple[str, ...] = ("layer_idx",)
    exact_only_if: tuple[tuple[str, Any], ...] = ()
    base_path: str = "base_model"
    roles: Roles = field(default=LLAMA_ROLES)
    residual_mlp_if: tuple[tuple[str, Any], ...] = ()
    gguf: GgufFacts | None = None  # None: llama.cpp has no such architecture (or miprun does not know it)


LLAMA_LIKE = Layout(layers_path="model.layers", gguf=GgufFacts("llama", on_load="permuted_qk"))
_GEMMA2_GGUF = GgufFacts("gemma2", on_load="plus_one_norms", period=2)
_GEMMA3_GGUF = GgufFacts("gemma3", on_load="plus_one_norms", period=6)

LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,  # llama.cpp stores Mistral and Mixtral as "llama"
    "mixtral": LLAMA_LIKE,
    "qwen2": Layout(
        layers_path="model.layers", layer_count_fields=("max_window_layers",), gguf=GgufFacts("qwen2")
    ),
    "qwen3": Layout(
        layers_path="model.layers", layer_count_fields=("max_window_layers",), gguf=GgufFacts("qwen3")
    ),
    # The MoE/dense choice is `layer_idx not in mlp_only_layers and (layer_idx + 1) % decoder_sparse_step
    # == 0`; with a step of 1 it is fully stated by `mlp_only_layers`, which is renumbered.
    "qwen3_moe": Layout(
        layers_path="model.layers",
        layer_index_fields=("mlp_only_layers",),
        exact_only_if=(("decoder_sparse_step", 1),),
        gguf=GgufFacts("qwen3moe", on_load=None),
    ),
    # its per-layer `no_rope_layers` list is trimmed like `layer_types`
    "smollm3": Layout(layers_path="model.layers", gguf=GgufFacts("smollm3", on_load=None, period=4)),
    "gemma2": Layout(layers_path="model.layers", roles=GEMMA_ROLES, gguf=_GEMMA2_GGUF),
    "gemma3_text": Layout(layers_path="model.layers", roles=GEMMA_ROLES, gguf=_GEMMA3_GGUF),
    # multimodal: the decoder layers and their per-layer config fields live in the text part
    "gemma3": Layout(
        layers_path="model.language_model.layers",
        roles=GEMMA_ROLES,
        gguf=GgufFacts("gemma3", on_load="plus_one_norms", period=6, wrapper_prefix="model.language_model."),
    ),
    "phi3": Layout(layers_path="model.layers", gguf=GgufFacts("phi3")),
    "gpt2": Layout(
        layers_path="transformer.h",
        exact_only_if=(("scale_attn_by_inverse_layer_idx", False),),
        roles=Roles(
            mlp_out_proj=("mlp.c_proj.weight",),  # a Conv1D: weight is (in, out)
            attn_out_proj="attn.c_proj.weight",
            pre_mlp_norm="ln_2",
            input_norm="ln_1",
        ),
        gguf=GgufFacts(
            "gpt2",
            on_load="transposed",
            transposed=("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight"),
        ),
    ),
    "opt": Layout(
        layers_path="model.decoder.layers",
        roles=Roles(
            mlp="fc2",
            mlp_out_proj=("fc2.weight",),
            attn_out_proj="self_attn.out_proj.weight",
            pre_mlp_norm="final_layer_norm",
            input_norm="self_attn_layer_norm",
        ),
        residual_mlp_if=(("do_layer_norm_before", True),),  # post-norm OPT normalises after the add
    ),
    "gpt_neox": Layout(
        layers_path="gpt_neox.layers",
        roles=Roles(
            mlp_out_proj=("mlp.dense_4h_to_h.weight",),
            attn_out_proj="attention.dense.weight",
        ),
        gguf=GgufFacts("gptneox", on_load=None),
    ),
}

SUPPORTED: list[str] = sorted(LAYOUTS)


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
            "can be added with one `Layout` entry in miprun/model/layouts.py (the path to that list and "
            "any config fields that are per-layer); please open an issue or a pull request with it."
        )
    return layout


def gguf_facts(arch: str) -> list[GgufFacts]:
    """The GGUF facts of every family llama.cpp stores under architecture ``arch`` (several: Mistral is "llama")."""
    return list(dict.fromkeys(x.gguf for x in LAYOUTS.values() if x.gguf is not None and x.gguf.arch == arch))


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


def layer_part(layer: nn.Module, path: str) -> Any:
    """The module or parameter at dotted ``path`` inside one decoder layer (see :class:`Roles`)."""
    return _get_path(layer, path)


def has_part(layer: nn.Module, path: str) -> bool:
    """Whether one decoder layer has the module or parameter at ``path``."""
    try:
        _get_path(layer, path)
    except AttributeError:
        return False
    return True


def mlp_adds_to_residual(model: nn.Module) -> bool:
    """Whether every block adds its MLP output to the residual stream (what a linear fold relies on)."""
    layout = layout_for(model_config(model))
    config = text_config(model_config(model))
    return all(getattr(config, name, value) == value for name, value in layout.residual_mlp_if)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings``), if the config says."""
    value = getattr(text_config(model_config(model)), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def is_conv1d(module: nn.Module) -> bool:
    """Whether a module is GPT-2's ``Conv1D``: a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """Whether a module is a linear layer: ``nn.Linear``, or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
