"""Where a model's weights and computation live, from public placement information only.

A model loaded with an accelerate device map carries ``hf_device_map`` (module name -> device index,
``"cpu"`` or ``"disk"``); accelerate moves inputs and offloaded weights itself, so miprun never moves
such a model and starts its passes on the device of the input embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from miprun.model.layouts import base_model


def device_map(model: nn.Module) -> dict[str, Any] | None:
    """The accelerate device map the model was loaded with, or None when it sits on one device."""
    mapping = getattr(model, "hf_device_map", None)
    return dict(mapping) if isinstance(mapping, dict) and mapping else None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate places the model's weights (a device map; possibly offloaded to CPU or disk)."""
    return device_map(model) is not None


def _as_device(value: Any) -> torch.device | None:
    if isinstance(value, int):
        return torch.device("cuda", value)
    if isinstance(value, str) and value not in ("cpu", "disk"):
        return torch.device(value)
    return None


def execution_device(model: nn.Module, module_name: str) -> torch.device:
    """Where ``module_name`` runs under the model's device map; offloaded modules run on the main device."""
    mapping = device_map(model) or {}
    best = ""
    for name in mapping:
        if (module_name == name or module_name.startswith(name + ".") or name == "") and len(name) >= len(
            best
        ):
            best = name
    placed = _as_device(mapping.get(best))
    if placed is not None:
        return placed
    # cpu- or disk-offloaded: accelerate runs it on the first accelerator of the map, else on the CPU
    accelerators = [d for d in map(_as_device, mapping.values()) if d is not None]
    return accelerators[0] if accelerators else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the forward pass starts (the input embeddings): inputs go there, and statistics live there."""
    body: Any = base_model(model)
    embeddings: nn.Module = body.get_input_embeddings()
    if is_dispatched(model):
        name = next(n for n, m in model.named_modules() if m is embeddings)
        return execution_device(model, name)
    for p in [*embeddings.parameters(), *model.parameters()]:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
