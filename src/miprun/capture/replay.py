"""Running a pruned variant of a model from its first changed block onward, from cached dense states.

Blocks before the first removed (or repaired) block ``s`` compute exactly what the dense model computes,
so a candidate only needs the dense state entering block ``s``. :class:`BoundaryCache` keeps the dense
states at a bounded set of block boundaries for a few windows (every boundary when they fit the memory
budget, else evenly spaced checkpoints; a candidate then starts at the nearest checkpoint at or before
``s``), and :func:`logits_from` runs the rest: the model's own body and head, with the layers before the
checkpoint skipped and the last of them replaced by a stand-in that returns the cached state. Masks,
position embeddings and final norms are the model's own, so the result equals a full forward pass of
the pruned model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.capture.taps import block_state_hooks
from miprun.model.layouts import decoder_layers, layers_parent
from miprun.model.placement import input_device
from miprun.model.surgery import skip_blocks

_NO_POSITIONS = torch.zeros(0, dtype=torch.long)  # the body only: the output layer runs on no position


class _Replay(nn.Module):
    """Stands in for decoder layer ``index``: returns the cached state of the batch being run.

    Attributes the body reads off a layer (Gemma's ``attention_type``) come from the real layer.
    """

    def __init__(self, layer: nn.Module, state: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self.state = state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.state.to(hidden.device, hidden.dtype)


class StateCache:
    """Block-boundary states of a few windows at checkpoints chosen to fit ``budget_bytes``: ``states[s]``
    holds, per batch, the state entering block ``s`` (``s >= 1``)."""

    def __init__(self, model: Any, windows: torch.Tensor, budget_bytes: int, batch_size: int = 4) -> None:
        self.windows, self.batch_size = windows, batch_size
        total = len(decoder_layers(model))
        hidden = model.get_input_embeddings().weight.shape[1]
        per_state = windows.numel() * hidden * 4  # float32
        keep = max(1, min(total, budget_bytes // max(per_state, 1)))
        step = max(1, math.ceil(total / keep))
        self.checkpoints = sorted({*range(1, total, step)})  # state s = input of block s (s >= 1)
        self.states: dict[int, list[torch.Tensor]] = {s: [] for s in self.checkpoints}
        self.bytes = per_state * len(self.checkpoints)

    def batches(self, device: torch.device) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.windows), self.batch_size):
            yield self.windows[start : start + self.batch_size].to(device)

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def prefix(self, rows: int) -> StateCache:
        """The same checkpoints' states for the first ``rows`` windows only (no model run)."""
        part = StateCache.__new__(StateCache)
        part.windows, part.batch_size, part.checkpoints = (
            self.windows[:rows],
            self.batch_size,
            self.checkpoints,
        )
        part.states = {s: first_rows(batches, rows, self.batch_size) for s, batches in self.states.items()}
        part.bytes = self.bytes * rows // max(len(self.windows), 1)
        return part

    def start_for(self, first_changed: int) -> int:
        """The checkpoint a variant whose first changed block is ``first_changed`` starts from (0: from scratch)."""
        usable = [s for s in self.checkpoints if s <= first_changed]
        return max(usable) if usable else 0


class BoundaryCache(StateCache):
    """Dense block-boundary states of ``windows`` at checkpoints chosen to fit ``budget_bytes`` (one dense pass,
    with a progress bar when ``progress``)."""

    def __init__(
        self,
        model: Any,
        windows: torch.Tensor,
        budget_bytes: int,
        batch_size: int = 4,
        progress: bool = False,
    ) -> None:
        super().__init__(model, windows, budget_bytes, batch_size)
        batches = self.batches(input_device(model))
        bar = tqdm(batches, total=self.num_batches, desc="dense states", unit="batch", disable=not progress)
        with torch.inference_mode(), block_state_hooks(decoder_layers(model), self._keep):
            for ids in bar:
                _logits(model, ids, _NO_POSITIONS)  # the states only

    def _keep(self, s: int, hidden: torch.Tensor) -> None:
        if s in self.states:
            self.states[s].append(hidden.detach().float().cpu())


class CutCache(StateCache):
    """Block-boundary states of the model *without* ``removed`` (the state entering each block), so a variant
    that removes one block more runs only from that block on; :meth:`advance` removes it for good.

    ``states[s]`` is the state that enters original block ``s`` in the cut model; for a removed ``s`` that is
    the state the next kept block reads.
    """

    def __init__(
        self,
        model: Any,
        windows: torch.Tensor,
        budget_bytes: int,
        batch_size: int = 4,
        dense: StateCache | None = None,
    ) -> None:
        """The dense model's states of ``windows``: copied from ``dense`` (a cache of the same windows) when
        given, else one pass."""
        super().__init__(model, windows, budget_bytes, batch_size)
        self.removed: list[int] = []
        if dense is not None and dense.windows.shape == windows.shape:
            self.checkpoints = dense.checkpoints
            self.states = {s: list(batches) for s, batches in dense.states.items()}
            self.bytes = dense.bytes
            self.ran_dense = False  # copied: no model run
        else:
            self._record(model, 0, [])
            self.ran_dense = True  # one dense pass

    def prefix(self, rows: int) -> CutCache:
        """The same cut's states for the first ``rows`` windows only (no model run)."""
        part = CutCache.__new__(CutCache)
        part.__dict__.update(vars(StateCache.prefix(self, rows)))
        part.removed, part.ran_dense = list(self.removed), False
        return part

    def advance(self, model: Any, block: int) -> int:
        """Remove ``block`` too and refresh the states after it; returns the decoder layers that ran."""
        removed = sorted({*self.removed, block})
        start = self.start_for(block)
        self._record(model, start, removed)
        self.removed = removed
        return layers_run(len(decoder_layers(model)), removed, start)

    @torch.inference_mode()
    def _record(self, model: Any, start: int, removed: list[int]) -> None:
        """Run the model without ``removed`` from checkpoint ``start`` and keep the states after it."""
        layers = decoder_layers(model)
        kept = [j for j in range(start, len(layers)) if j not in set(removed)]
        seen: dict[int, torch.Tensor] = {}

        def keep(j: int) -> Any:
            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                seen[j] = (args[0] if args else kwargs["hidden_states"]).detach().float().cpu()

            return pre_hook

        fresh: dict[int, list[torch.Tensor]] = {s: [] for s in self.checkpoints if s > start}
        handles = [layers[j].register_forward_pre_hook(keep(j), with_kwargs=True) for j in kept]
        try:
            for _ in logits_from(model, self, removed, start, positions=_NO_POSITIONS):
                for s, batches in fresh.items():
                    first_kept = next((j for j in kept if j >= s), None)
                    if first_kept is not None:  # none: every block from s on is removed, never a start
                        batches.append(seen[first_kept])
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        self.states.update(fresh)


@contextmanager
def _replaying(model: nn.Module, start: int, removed: Sequence[int], state: torch.Tensor) -> Iterator[None]:
    """The model without ``removed`` and without blocks ``0 .. start-2``; the slot of block ``start-1``
    (removed or not) returns ``state``, the state entering block ``start``."""
    skipped = sorted((set(range(start - 1)) | set(removed)) - {start - 1})
    with skip_blocks(model, skipped):
        layers = decoder_layers(model)
        parent, attr = layers_parent(model)
        replaced = nn.ModuleList([_Replay(layers[0], state), *list(layers)[1:]])
        setattr(parent, attr, replaced)
        try:
            yield
        finally:
            setattr(parent, attr, layers)


@torch.inference_mode()
def logits_from(
    model: nn.Module,
    cache: StateCache,
    removed: Sequence[int],
    first_changed: int,
    positions: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Logits ``(batch, seq, vocab)`` of the model without ``removed``, batch by batch, from the cache.

    ``first_changed`` is the first block whose output differs from the dense model's (the first removed
    or repaired block); the model's current weights are used from the chosen checkpoint on. With
    ``positions`` (indices into the sequence) the output layer runs on those positions only, ``(batch,
    len(positions), vocab)``: on a large vocabulary it costs more than the whole body.
    """
    start = cache.start_for(first_changed)
    device = input_device(model)
    for b, ids in enumerate(cache.batches(device)):
        if start == 0:
            with skip_blocks(model, removed):
                yield _logits(model, ids, positions)
            continue
        with _replaying(model, start, removed, cache.states[start][b]):
            yield _logits(model, ids, positions)


def _logits(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return model(input_ids=ids, use_cache=False).logits
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False, logits_to_keep=positions.to(ids.device)).logits
    return model(input_ids=ids, use_cache=False).logits[:, positions.to(ids.device)]


def head_layers(model: Any) -> float:
    """What the output layer costs per token, in decoder layers (by parameter count, which FLOPs follow):
    about 8 on SmolLM2 (49k tokens), 30 on Gemma-3-270M (262k tokens), whose body has 18."""
    layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers.parameters()) / max(len(layers), 1)
    return float(model.get_output_embeddings().weight.numel()) / max(per_layer, 1.0)


def first_rows(batches: list[torch.Tensor], rows: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``rows`` rows of a per-batch list (batches of ``batch_size`` rows, the last maybe fewer)."""
    whole, rest = divmod(rows, batch_size)
    return [*batches[:whole], *([batches[whole][:rest]] if rest and whole < len(batches) else [])]


def layers_run(total: int, removed: Sequence[int], start: int) -> int:
    """How many decoder layers a replayed variant runs (for its cost in forward-pass units)."""
    return sum(1 for i in range(start, total) if i not in set(removed))
