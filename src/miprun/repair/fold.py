"""Folding a linear map into existing weights, so a repaired model stays a stock checkpoint.

``fold_into_mlp_output(model, block, T)`` returns new values for the parameters that produce block
``block``'s MLP output ``M`` such that the block then produces ``M @ T`` instead (row vectors, ``T`` is
``(d, d)``). It handles every layout of the output projection miprun supports: ``nn.Linear`` weights
``(out, in)``, GPT-2's ``Conv1D`` weights ``(in, out)``, fused expert tensors ``(experts, out, in)``, and
their biases. ``fold_into_embedding`` does the same for the state entering block 0 (a run that starts there):
the token embedding and any learned position table, checked for exactness by ``embedding_fold_error``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from miprun.errors import UnsupportedArchitectureError
from miprun.model.edits import edited
from miprun.model.layouts import decoder_layers, has_part, is_conv1d, layer_part, layout_for, model_config


def parameter_name(model: nn.Module, param: torch.Tensor) -> str:
    """The name of ``param`` inside ``model`` (the first, for tied weights)."""
    for name, p in model.named_parameters():
        if p is param:
            return name
    raise KeyError("the parameter is not part of the model")


def _owner(layer: nn.Module, path: str) -> nn.Module:
    parent, _, _ = path.rpartition(".")
    return layer_part(layer, parent) if parent else layer


def mlp_output_projection(model: nn.Module, block: int) -> tuple[str, nn.Module, str]:
    """``(path inside the layer, owning module, parameter name)`` of block ``block``'s MLP output projection."""
    layer = decoder_layers(model)[block]
    roles = layout_for(model_config(model)).roles
    for path in roles.mlp_out_proj:
        if has_part(layer, path):
            return path, _owner(layer, path), path.rpartition(".")[2]
    raise UnsupportedArchitectureError(
        f"block {block} has none of the MLP output projections {roles.mlp_out_proj} its layout names"
    )


def folded(
    weight: torch.Tensor, bias: torch.Tensor | None, T: torch.Tensor, owner: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight', bias')`` such that the projection's output ``y`` becomes ``y @ T``; computed in float64."""
    t = T.to(torch.float64)
    w = weight.detach().to(torch.float64)
    if w.ndim == 3:  # fused experts (experts, out, in): y_e = z W_e^T
        new_w = torch.einsum("io,eip->eop", t, w)
    elif is_conv1d(owner):  # GPT-2: y = z W + b with W (in, out)
        new_w = w @ t
    else:  # nn.Linear: y = z W^T + b with W (out, in)
        new_w = t.T @ w
    new_b = None if bias is None else bias.detach().to(torch.float64) @ t
    return new_w.to(weight.dtype), None if new_b is None else new_b.to(bias.dtype)  # type: ignore[union-attr]


def fold_into_mlp_output(model: nn.Module, block: int, T: torch.Tensor) -> dict[str, torch.Tensor]:
    """New values (by parameter name) that make block ``block``'s MLP output ``M @ T``."""
    _path, owner, local = mlp_output_projection(model, block)
    weight = getattr(owner, local)
    bias_name = "bias" if local == "weight" else local.replace("down_proj", "down_proj_bias")
    bias = getattr(owner, bias_name, None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    new_w, new_b = folded(weight, bias, T, owner)
    edits = {parameter_name(model, weight): new_w}
    if bias is not None and new_b is not None:
        edits[parameter_name(model, bias)] = new_b
    return edits


def embeddings_tied(model: Any) -> bool:
    """Whether the input embedding shares its weight with the LM head (changing one changes both)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings()
    return out is not None and out.weight is emb.weight


def fold_into_embedding(model: Any, T: torch.Tensor) -> dict[str, torch.Tensor]:
    """New embedding weights so that the state entering block 0, ``e`` (the token embedding plus any learned
    absolute position embedding, as in GPT-2 and OPT), becomes ``e @ T``: every such table is mapped.

    Untied embeddings only. Whether the result is exact for the family is checked by :func:`embedding_fold_error`.
    """
    edits = {}
    for weight in [model.get_input_embeddings().weight, *_position_tables(model)]:
        edits[parameter_name(model, weight)] = (weight.detach().to(torch.float64) @ T.to(torch.float64)).to(
            weight.dtype
        )
    return edits


def _position_tables(model: Any) -> list[torch.Tensor]:
    """Learned absolute position tables added to the token embedding (GPT-2's ``wpe``, OPT's
    ``embed_positions``): embeddings outside the decoder layers, of the hidden width, other than the tokens'."""
    tokens = model.get_input_embeddings()
    hidden = tokens.weight.shape[1]
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and module is not tokens
        and id(module) not in inside
        and module.weight.shape[1] == hidden
        and "vision" not in name
    ]


@torch.no_grad()
def embedding_fold_error(model: Any, edits: dict[str, torch.Tensor], T: torch.Tensor) -> float:
    """Relative error of the folded state 0 against the intended ``(state 0) @ T``, on a few probe tokens:
    about 1e-7 when the fold is exact for this family, large when something else enters the state (a norm
    on the embedding, a table the fold missed)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(1, 1 + min(16, vocab - 1)).remainder(vocab)[None, :]
    seen: list[torch.Tensor] = []
    first = decoder_layers(model)[0]

    def keep(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().to(torch.float64))

    handle = first.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        device = model.get_input_embeddings().weight.device
        model(input_ids=ids.to(device), use_cache=False)
        with edited(model, edits):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    before, after = seen
    expected = before @ T.to(before.device, torch.float64)
    return float((after - expected).norm() / expected.norm().clamp_min(1e-300))
