"""Forward hooks that hand every tap of the forward pass (block states, module roles) to a callback.

Hooks sit on the decoder layers themselves (never ``output_hidden_states``, whose last entry is after the
final norm) and on the role modules inside them; they are kept as handles and always removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from miprun.capture.statistic import Tap
from miprun.model.layouts import decoder_layers, layer_part, layout_for, model_config

OnTap = Callable[[Tap, torch.Tensor], None]


def hidden_of(value: Any) -> torch.Tensor:
    """The hidden-states tensor from a layer's output, which is a tensor or a tuple starting with one."""
    return value[0] if isinstance(value, (tuple, list)) else value


def role_module(model: nn.Module, block: int, role: str) -> nn.Module:
    """The module playing ``role`` (a field of :class:`~miprun.model.layouts.Roles`) in decoder layer ``block``."""
    path = getattr(layout_for(model_config(model)).roles, role)
    return layer_part(decoder_layers(model)[block], path)


@contextmanager
def tap_hooks(model: nn.Module, taps: Sequence[Tap], on_tap: OnTap) -> Iterator[None]:
    """Call ``on_tap(tap, tensor)`` for every tap in ``taps`` whenever the forward pass produces it."""
    layers = decoder_layers(model)
    handles = []

    def state_hook(_m: nn.Module, _args: Any, out: Any, tap: Tap) -> None:
        on_tap(tap, hidden_of(out))

    def first_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        on_tap(Tap(state=0), args[0] if args else kwargs["hidden_states"])

    try:
        for tap in dict.fromkeys(taps):
            if tap.state == 0:
                handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
            elif tap.state is not None:
                hook = lambda m, a, o, t=tap: state_hook(m, a, o, t)  # noqa: E731
                handles.append(layers[tap.state - 1].register_forward_hook(hook))
            else:
                assert tap.block is not None and tap.role is not None
                hook = lambda m, a, o, t=tap: state_hook(m, a, o, t)  # noqa: E731
                handles.append(role_module(model, tap.block, tap.role).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def block_state_hooks(layers: nn.ModuleList | Sequence[nn.Module], on_state: Any) -> Iterator[None]:
    """Call ``on_state(s, hidden)`` for state 0 (input of block 0) and state ``i+1`` (output of block ``i``)."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        on_state(0, args[0] if args else kwargs["hidden_states"])

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda _m, _a, out, s=i + 1: on_state(s, hidden_of(out))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
