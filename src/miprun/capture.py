"""One dense forward pass over the calibration windows, reduced on the fly to bounded block statistics.

Forward hooks on the decoder layers themselves (never ``output_hidden_states``, whose last entry is
after the final norm) see every block's input and output. Each state is reduced inside its hook
(projected, token-sampled) so at most one batch of reduced states is alive at a time: memory does not
grow with the number of calibration tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from miprun.architectures import base_model, decoder_layers, model_config, text_config
from miprun.stats import (
    BlockStats,
    CaptureSpec,
    CoordinateMoments,
    CosineSums,
    Moments,
    TokenSample,
    random_projection,
)

log = logging.getLogger(__name__)


class NonFiniteHiddenStateError(RuntimeError):
    """A block produced NaN or Inf (typically fp16 overflow)."""


def _hidden(value: Any) -> torch.Tensor:
    """The hidden-states tensor from a layer's output, which is a tensor or a tuple starting with one."""
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def block_state_hooks(layers: nn.ModuleList | Sequence[nn.Module], on_state: Any) -> Iterator[None]:
    """Call ``on_state(s, hidden)`` for state 0 (input of block 0) and state ``i+1`` (output of block ``i``).

    Hooks are kept as handles and always removed, even if the forward pass raises.
    """

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        on_state(0, args[0] if args else kwargs["hidden_states"])

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda _m, _a, out, s=i + 1: on_state(s, _hidden(out))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Reducer:
    """Turns each batch's raw states into moment updates and sample rows, state by state."""

    stats: BlockStats
    moments_proj: torch.Tensor | None
    sample_proj: torch.Tensor | None
    device: torch.device | None = None  # where the accumulators live (None: wherever the states are)
    park: torch.device | None = None  # where reduced states wait for the batch's end (None: ``device``)
    token_mask: torch.Tensor | None = None  # (batch*seq,) bool: tokens that are samples
    sample_rows: torch.Tensor | None = None  # indices into the masked tokens kept for the sample
    _moment_parts: list[torch.Tensor | None] | None = None
    _sample_parts: list[torch.Tensor | None] | None = None
    _coord_parts: list[torch.Tensor | None] | None = None
    _unit_parts: list[torch.Tensor | None] | None = None  # per-token unit vectors, for the cosine sums

    def start_batch(self, token_mask: torch.Tensor, sample_rows: torch.Tensor | None) -> None:
        self.token_mask, self.sample_rows = token_mask, sample_rows
        self._moment_parts = [None] * self.stats.num_states
        self._sample_parts = [None] * self.stats.num_states
        self._coord_parts = [None] * self.stats.num_states
        self._unit_parts = [None] * self.stats.num_states

    def __call__(self, s: int, hidden: torch.Tensor) -> None:
        assert (
            self.token_mask is not None and self._moment_parts is not None and self._sample_parts is not None
        )
        h = hidden.reshape(-1, hidden.shape[-1])[self.token_mask.to(hidden.device)]
        if not torch.isfinite(h).all():
            where = "the embeddings (input of block 0)" if s == 0 else f"block {s - 1}"
            raise NonFiniteHiddenStateError(
                f"NaN/Inf in the hidden states produced by {where}: the model overflows in its dtype "
                f"({hidden.dtype}). Run with --dtype float32."
            )
        h = h.float()
        if self.stats.normalized:  # the block's view: per-token RMS norm without its learned scale
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.stats.coordinates is not None:
            self._coord_parts[s] = h  # type: ignore[index]
        if self.stats.moments is not None:
            proj = self.moments_proj
            self._moment_parts[s] = h @ proj.to(h.device) if proj is not None else h
        if self.stats.sample is not None and self.sample_rows is not None and len(self.sample_rows):
            rows = h[self.sample_rows.to(h.device)]
            proj = self.sample_proj
            self._sample_parts[s] = (rows @ proj.to(h.device) if proj is not None else rows).cpu()
        if self.stats.cosine is not None:
            assert self._unit_parts is not None
            self._unit_parts[s] = F.normalize(h, dim=-1)  # (tokens, hidden), unit length per token

    def reduce(self, s: int, hidden: torch.Tensor) -> None:
        """Reduce state ``s`` of this batch, then move what was kept to where it waits (``park``)."""
        self(s, hidden)
        self._place(self.park or self.device, s)

    def _place(self, device: torch.device | None, s: int | None = None) -> None:
        """Move the reduced parts of state ``s`` (or all) to ``device``: a device map spreads the states."""
        if device is None:
            return
        for f in fields(self):
            parts = getattr(self, f.name)
            if not f.name.endswith("_parts") or f.name == "_sample_parts" or parts is None:
                continue  # the token sample is kept on the CPU anyway
            for i in range(len(parts)) if s is None else (s,):
                if parts[i] is not None:
                    parts[i] = parts[i].to(device)

    def end_batch(self) -> None:
        assert self._moment_parts is not None and self._sample_parts is not None
        self._place(self.device)
        if self.stats.moments is not None:
            parts = self._moment_parts
            if any(p is None for p in parts):
                raise RuntimeError("a decoder layer did not run: cannot capture its states")
            self.stats.moments.update(torch.cat(parts, dim=1))  # type: ignore[arg-type]
        if self.stats.cosine is not None and self._unit_parts is not None:
            if any(p is None for p in self._unit_parts):
                raise RuntimeError("a decoder layer did not run: cannot capture its states")
            self.stats.cosine.update(torch.stack(self._unit_parts))  # type: ignore[arg-type]
        if self.stats.coordinates is not None and self._coord_parts is not None:
            self.stats.coordinates.update(torch.stack(self._coord_parts, dim=1))  # type: ignore[arg-type]
        if self.stats.sample is not None and self._sample_parts[0] is not None:
            self.stats.sample.update(torch.stack(self._sample_parts))  # type: ignore[arg-type]
        self.stats.num_tokens += int(self.token_mask.sum()) if self.token_mask is not None else 0
        self._moment_parts = self._sample_parts = self._coord_parts = None
        self._unit_parts = None


def sample_plan(valid: torch.Tensor, capacity: int, seed: int) -> torch.Tensor:
    """Sorted flat indices (into the valid tokens) of a seeded uniform sample of ``capacity`` tokens."""
    total = int(valid.sum())
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=gen)[: min(capacity, total)]
    return picks.sort().values


def token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, exclude_first: bool
) -> torch.Tensor:
    """Which positions are samples: every non-padding token, optionally without each window's first."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if exclude_first:
        mask = mask.clone()
        mask[:, 0] = False
    return mask


def share_range(num_windows: int, share: tuple[int, int]) -> range:
    """The windows of share ``(index, count)``: ``count`` contiguous, near-equal parts, in order."""
    index, count = share
    if not 0 <= index < count:
        raise ValueError(f"share index {index} is outside 0..{count - 1}")
    return range(num_windows * index // count, num_windows * (index + 1) // count)


@dataclass(frozen=True)
class Batch:
    """One forward pass: windows ``start:stop``, which of their tokens are samples, which are sampled."""

    start: int
    stop: int
    token_mask: torch.Tensor  # (batch*seq,) bool
    sample_rows: torch.Tensor | None  # indices into the masked tokens kept for the token sample


def plan_batches(
    windows: torch.Tensor,
    spec: CaptureSpec,
    *,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    seed: int,
    exclude_first_token: bool,
    share: tuple[int, int] = (0, 1),
) -> list[Batch]:
    """Cut this share of the windows into batches; the token sample is drawn over all windows (global)."""
    mask = token_mask(windows, attention_mask, exclude_first_token)
    plan = sample_plan(mask, spec.sample_tokens, seed) if spec.sample_tokens else None
    mine = share_range(len(windows), share)
    seen = int(mask[: mine.start].sum())  # valid tokens before each batch, to map the global plan
    batches = []
    for start in range(mine.start, mine.stop, batch_size):
        stop = min(start + batch_size, mine.stop)
        batch_mask = mask[start:stop].reshape(-1)
        n_valid = int(batch_mask.sum())
        rows = None if plan is None else plan[(plan >= seen) & (plan < seen + n_valid)] - seen
        batches.append(Batch(start, stop, batch_mask, rows))
        seen += n_valid
    return batches


def input_device(model: nn.Module) -> torch.device:
    """Where the forward pass starts (the input embeddings): inputs go there, and the statistics live there.

    Under an accelerate device map, offloaded weights sit on ``meta``; their hook names the real device.
    """
    body: Any = base_model(model)
    embeddings: nn.Module = body.get_input_embeddings()
    hooked = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if hooked is not None:
        return torch.device(hooked) if not isinstance(hooked, int) else torch.device("cuda", hooked)
    for p in [*embeddings.parameters(), *model.parameters()]:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def new_stats(
    model: nn.Module, spec: CaptureSpec, seed: int
) -> tuple[BlockStats, torch.Tensor | None, torch.Tensor | None]:
    """Empty statistics of ``model``'s states as ``spec`` asks, and the seeded projections they go through."""
    layers = decoder_layers(model)
    hidden_size = int(text_config(model_config(model)).hidden_size)
    stats = BlockStats(num_blocks=len(layers), hidden_size=hidden_size, normalized=spec.normalize)
    if spec.coordinates:
        stats.coordinates = CoordinateMoments(num_states=stats.num_states, dim=hidden_size)
    moments_proj = sample_proj = None
    if spec.moments_dim is not None:
        moments_proj = random_projection(hidden_size, spec.moments_dim, seed)
        width = hidden_size if moments_proj is None else moments_proj.shape[1]
        stats.moments = Moments(num_states=stats.num_states, dim=width)
    if spec.sample_tokens:
        sample_proj = random_projection(hidden_size, spec.sample_dim or 0, seed + 1)
        stats.sample = TokenSample(num_states=stats.num_states, capacity=spec.sample_tokens)
    if spec.cosine:
        stats.cosine = CosineSums(num_states=stats.num_states)
    return stats, moments_proj, sample_proj


@torch.inference_mode()
def capture(
    model: nn.Module,
    windows: torch.Tensor,
    spec: CaptureSpec,
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    seed: int = 0,
    exclude_first_token: bool = False,
    progress: bool = True,
    share: tuple[int, int] = (0, 1),
) -> BlockStats:
    """Run the dense model once over ``windows`` ``(num_windows, seq_len)`` and return its block statistics.

    Args:
        model: a causal LM whose architecture :mod:`miprun.architectures` knows; it may be spread over
            devices (or offloaded) by an accelerate device map.
        windows: token ids; ``attention_mask`` (same shape) marks padding, if any.
        spec: what the estimators need (see :meth:`miprun.estimators.Estimator.capture_spec`).
        seed: seeds the random projections and the token sample.
        exclude_first_token: drop each window's first position (an outlier "attention sink" state).
        share: ``(index, count)``: capture only this contiguous share of the windows (one data-parallel
            rank's); merge the shares with :func:`miprun.distributed.merge_stats`.
    """
    stats, moments_proj, sample_proj = new_stats(model, spec, seed)
    batches = plan_batches(
        windows,
        spec,
        attention_mask=attention_mask,
        batch_size=batch_size,
        seed=seed,
        exclude_first_token=exclude_first_token,
        share=share,
    )
    device = input_device(model)
    reducer = _Reducer(stats, moments_proj, sample_proj, device=device)
    with block_state_hooks(decoder_layers(model), reducer.reduce):
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            reducer.start_batch(batch.token_mask, batch.sample_rows)
            ids = windows[batch.start : batch.stop].to(device)
            am = None if attention_mask is None else attention_mask[batch.start : batch.stop].to(device)
            base_model(model)(input_ids=ids, attention_mask=am, use_cache=False)
            reducer.end_batch()
    log.info("captured %d tokens over %d blocks", stats.num_tokens, stats.num_blocks)
    return stats
