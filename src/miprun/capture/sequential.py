"""Capture layer by layer, with one decoder layer's weights on the compute device at a time.

This is how SparseGPT and Wanda calibrate a 70B model on one GPU. The model stays on the CPU (or
offloaded by accelerate). First the body runs over a group of batches with every decoder layer replaced
by a pass-through stand-in that records what the layer would have received (the hidden states, and the
masks and position embeddings the body computes per layer); no exception stops the pass. Then each
layer in turn goes to the device, runs over those batches, and comes back: one sweep.

The statistics are those :func:`miprun.capture.engine.capture` builds, bit for bit on the same hardware.
Most statistics pair every state with every other, so each batch's reduced taps wait on the CPU until its
last layer has run, then feed the accumulators in batch order.
That costs ``tokens x (layers + 1) x kept width x 4`` bytes per sweep, so sweeps are sized to a budget:
CPU memory stays bounded whatever the number of calibration tokens, at the price of moving the weights
once per sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.capture.engine import Reducer, prepare
from miprun.capture.statistic import BatchInfo, CapturedStats, Statistic, Tap
from miprun.capture.taps import hidden_of, tap_hooks
from miprun.model.layouts import base_model, decoder_layers, layers_parent
from miprun.model.placement import is_dispatched

if TYPE_CHECKING:
    from miprun.options import CalibrationConfig

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
PARK_BYTES = 4 << 30  # reduced states a sweep may keep on the CPU before the weights move again

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # what a layer was called with, besides its input


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index``: records the call, returns the hidden states unchanged.

    The real layer is held outside the module tree, so moving the body does not move it; attributes the
    body reads off a layer (Gemma's ``attention_type``, say) are looked up on it.
    """

    def __init__(self, layer: nn.Module, index: int, record: Callable[[int, Any, LayerCall], None]):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self.index = index
        self.record = record

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.record(self.index, hidden, (args[1:], kwargs))
        return hidden


@contextmanager
def _catchers(model: nn.Module, record: Callable[[int, Any, LayerCall], None]) -> Iterator[None]:
    """Swap the decoder-layer list for pass-through catchers; always put the real layers back."""
    layers = decoder_layers(model)
    parent, attr = layers_parent(model)
    setattr(parent, attr, nn.ModuleList(_Catcher(layer, i, record) for i, layer in enumerate(layers)))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def _to(value: Any, device: torch.device, memo: dict[int, tuple[Any, Any]]) -> Any:
    """``value`` (tensors inside tuples, lists and dicts) on ``device``; a tensor shared by layers moves once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:  # the original is kept in the memo, so its id cannot be reused meanwhile
            memo[id(value)] = (value, value.to(device))
        return memo[id(value)][1]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


def _param_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), CPU)


@torch.inference_mode()
def catch_layer_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    spans: list[tuple[int, int]],
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """The input of layer 0 for each batch ``start:stop``, and what every layer is called with besides it.

    Runs the body without its decoder layers on ``device``; both results are kept on the CPU.

    Returns:
        ``inputs[b]`` ``(batch, seq, hidden)`` and ``calls[layer][b]``.
    """
    body = base_model(model)
    num_layers = len(decoder_layers(model))
    inputs: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in range(num_layers)]
    memo: dict[int, tuple[Any, Any]] = {}

    def record(index: int, hidden: torch.Tensor, call: LayerCall) -> None:
        if index == 0:
            inputs.append(hidden.to(CPU))
        calls[index].append(_to(call, CPU, memo))

    movable = not is_dispatched(model)
    with _catchers(model, record):  # the layers are out of the tree: only the rest moves
        home = _param_device(body)
        if movable:
            body.to(device)
        try:
            for start, stop in spans:
                memo.clear()
                ids = windows[start:stop].to(device)
                am = None if attention_mask is None else attention_mask[start:stop].to(device)
                body(input_ids=ids, attention_mask=am, use_cache=False)
        finally:
            if movable:
                body.to(home)
    memo.clear()
    return inputs, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, device: torch.device) -> torch.Tensor:
    args, kwargs = _to(call, device, {})
    hidden = hidden.to(device)
    if "hidden_states" in kwargs:
        return hidden_of(layer(**{**kwargs, "hidden_states": hidden}))
    return hidden_of(layer(hidden, *args, **kwargs))


def _sweep(
    model: nn.Module,
    windows: torch.Tensor,
    reducers: list[Reducer],
    current: list[Reducer],
    device: torch.device,
    attention_mask: torch.Tensor | None,
) -> int:
    """Run the reducers' batches through every layer, one layer on ``device`` at a time; returns bytes parked.

    The tap hooks (block states and module roles) fire as each layer runs, into the batch's reducer, which
    ``current`` holds while its batch runs.
    """
    spans = [(r.batch.start, r.batch.stop) for r in reducers]
    states, calls = catch_layer_inputs(model, windows, spans, device, attention_mask)
    for reducer, state in zip(reducers, states, strict=True):
        reducer.feed(Tap(state=0), state.to(device), model)
    movable = not is_dispatched(model)
    for i, layer in enumerate(decoder_layers(model)):
        home = _param_device(layer)
        if movable:
            layer.to(device)
        try:
            for b, reducer in enumerate(reducers):
                current[:] = [reducer]
                out = _run_layer(layer, states[b], calls[i][b], device)  # (batch, seq, hidden)
                states[b] = out.to(CPU)
        finally:
            current.clear()
            if movable:
                layer.to(home)
        calls[i] = []  # this layer's masks and position embeddings are no longer needed
    return sum(r.parked_bytes() for r in reducers) + sum(s.numel() * s.element_size() for s in states)


@torch.inference_mode()
def capture_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    requests: Sequence[Statistic],
    calibration: CalibrationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    attention_mask: torch.Tensor | None = None,
    share: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> CapturedStats:
    """The statistics of :func:`miprun.capture.engine.capture`, computed one decoder layer at a time on ``device``.

    The model's weights stay where they are (CPU, or placed by accelerate); each layer visits ``device``
    for its turn. Batches go through the layers in sweeps: the first sweep is one batch, which measures
    what a batch keeps on the CPU; later sweeps take as many batches as fit in :data:`PARK_BYTES` (at
    least one). More sweeps move the weights more often; the statistics do not change.
    """
    from miprun.options import CalibrationConfig

    dev = torch.device(device)
    stats, taps, batches = prepare(
        model, windows, requests, calibration or CalibrationConfig(), attention_mask, share
    )
    all_taps = [t for per in taps for t in per if t.state != 0]  # state 0 is fed from the caught inputs
    per_sweep, done, sweeps = 1, 0, 0
    bar = tqdm(total=len(batches), desc="calibration (sequential)", unit="batch", disable=not progress)
    current: list[Reducer] = []  # the reducer of the batch a layer is running on, for the tap hooks
    with bar, tap_hooks(model, all_taps, lambda tap, h: current[0].feed(tap, h, model)):
        while done < len(batches):
            group: list[BatchInfo] = batches[done : done + per_sweep]
            reducers = [Reducer(stats.statistics, taps, batch, device=dev, park=CPU) for batch in group]
            parked = _sweep(model, windows, reducers, current, dev, attention_mask)
            for reducer in reducers:  # in batch order, as the whole-model pass accumulates
                reducer.finish()
                stats.num_tokens += reducer.batch.num_tokens
            if sweeps == 0:
                per_sweep = max(1, PARK_BYTES // max(1, parked))
            done, sweeps = done + len(group), sweeps + 1
            bar.update(len(group))
    log.info(
        "captured %d tokens over %d blocks, one layer at a time on %s (%d sweeps over the layers)",
        stats.num_tokens,
        stats.num_blocks,
        dev,
        sweeps,
    )
    return stats
