"""Weights changed for the length of a ``with`` block: how a repair is tried without copying the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def edited(model: nn.Module, edits: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the ``with`` block the named parameters hold ``edits``; afterwards exactly their old values."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in edits}
    try:
        with torch.no_grad():
            for name, value in edits.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
