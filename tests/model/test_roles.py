"""Module roles are data in every layout: a repair finds each block's MLP, its output projection and the
norms around it on every supported family, and the MLP module's output is exactly what the block adds."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from miprun.capture.taps import role_module
from miprun.model.layouts import decoder_layers, has_part, layer_part, layout_for, mlp_adds_to_residual

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", ARCHS)
def test_every_role_resolves_in_every_block(arch):
    model, config = tiny_model(arch)
    roles = layout_for(config).roles
    for layer in decoder_layers(model):
        assert isinstance(layer_part(layer, roles.mlp), torch.nn.Module)
        projections = [p for p in roles.mlp_out_proj if has_part(layer, p)]
        assert len(projections) == 1, projections  # exactly one candidate names this block's projection
        assert isinstance(layer_part(layer, projections[0]), torch.nn.Parameter)
        assert isinstance(layer_part(layer, roles.attn_out_proj), torch.nn.Parameter)
        for norm in (roles.pre_mlp_norm, roles.input_norm, roles.post_mlp_norm, roles.post_attn_norm):
            assert norm is None or isinstance(layer_part(layer, norm), torch.nn.Module)
    gemma = config.model_type in ("gemma2", "gemma3_text", "gemma3")
    assert (roles.post_mlp_norm is not None) == gemma  # the MLP output is normalised before the add
    assert mlp_adds_to_residual(model)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gemma2", "gemma3_text", "gemma3")])
def test_the_mlp_output_is_what_the_block_adds_after_attention(arch):
    """Block output = (its input + attention part) + MLP output: removing the MLP's output by a hook
    changes the block output by exactly that output (the fact a linear fold relies on)."""
    model, _ = tiny_model(arch)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    block, seen = decoder_layers(model)[2], {}
    mlp = role_module(model, 2, "mlp")

    def keep(_m, _a, out):
        seen["mlp"] = out[0] if isinstance(out, tuple) else out

    def zero(_m, _a, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    def capture_block(_m, _a, out):
        seen.setdefault("outs", []).append(out[0] if isinstance(out, tuple) else out)

    handles = [mlp.register_forward_hook(keep), block.register_forward_hook(capture_block)]
    with torch.no_grad():
        model(input_ids=ids)
        handles.append(mlp.register_forward_hook(zero))
        model(input_ids=ids)
    for h in handles:
        h.remove()
    full, without = seen["outs"]
    assert torch.allclose(full - without, seen["mlp"], atol=1e-5)
