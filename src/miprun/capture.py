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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.architectures import base_model, decoder_layers, model_config, text_config
from miprun.stats import BlockStats, CaptureSpec, Moments, TokenSample, random_projection

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
    token_mask: torch.Tensor | None = None  # (batch*seq,) bool: tokens that are samples
    sample_rows: torch.Tensor | None = None  # indices into the masked tokens kept for the sample
    _moment_parts: list[torch.Tensor | None] | None = None
    _sample_parts: list[torch.Tensor | None] | None = None

    def start_batch(self, token_mask: torch.Tensor, sample_rows: torch.Tensor | None) -> None:
        self.token_mask, self.sample_rows = token_mask, sample_rows
        self._moment_parts = [None] * self.stats.num_states
        self._sample_parts = [None] * self.stats.num_states

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
        if self.stats.moments is not None:
            proj = self.moments_proj
            self._moment_parts[s] = h @ proj.to(h.device) if proj is not None else h
        if self.stats.sample is not None and self.sample_rows is not None and len(self.sample_rows):
            rows = h[self.sample_rows.to(h.device)]
            proj = self.sample_proj
            self._sample_parts[s] = (rows @ proj.to(h.device) if proj is not None else rows).cpu()

    def end_batch(self) -> None:
        assert self._moment_parts is not None and self._sample_parts is not None
        if self.stats.moments is not None:
            parts = self._moment_parts
            if any(p is None for p in parts):
                raise RuntimeError("a decoder layer did not run: cannot capture its states")
            self.stats.moments.update(torch.cat(parts, dim=1))  # type: ignore[arg-type]
        if self.stats.sample is not None and self._sample_parts[0] is not None:
            self.stats.sample.update(torch.stack(self._sample_parts))  # type: ignore[arg-type]
        self.stats.num_tokens += int(self.token_mask.sum()) if self.token_mask is not None else 0
        self._moment_parts = self._sample_parts = None


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
) -> BlockStats:
    """Run the dense model once over ``windows`` ``(num_windows, seq_len)`` and return its block statistics.

    Args:
        model: a causal LM whose architecture :mod:`miprun.architectures` knows.
        windows: token ids; ``attention_mask`` (same shape) marks padding, if any.
        spec: what the estimators need (see :meth:`miprun.estimators.Estimator.capture_spec`).
        seed: seeds the random projections and the token sample.
        exclude_first_token: drop each window's first position (an outlier "attention sink" state).
    """
    layers = decoder_layers(model)
    body = base_model(model)
    hidden_size = int(text_config(model_config(model)).hidden_size)
    stats = BlockStats(num_blocks=len(layers), hidden_size=hidden_size)
    moments_proj = sample_proj = None
    if spec.moments_dim is not None:
        moments_proj = random_projection(hidden_size, spec.moments_dim, seed)
        width = hidden_size if moments_proj is None else moments_proj.shape[1]
        stats.moments = Moments(num_states=stats.num_states, dim=width)
    if spec.sample_tokens:
        sample_proj = random_projection(hidden_size, spec.sample_dim or 0, seed + 1)
        stats.sample = TokenSample(num_states=stats.num_states, capacity=spec.sample_tokens)

    mask = token_mask(windows, attention_mask, exclude_first_token)
    plan = sample_plan(mask, spec.sample_tokens, seed) if spec.sample_tokens else None
    reducer = _Reducer(stats, moments_proj, sample_proj)
    device = next(model.parameters()).device
    seen = 0  # valid tokens before this batch, to map the global sample plan into the batch
    with block_state_hooks(layers, reducer):
        for start in tqdm(
            range(0, len(windows), batch_size), desc="calibration", unit="batch", disable=not progress
        ):
            ids = windows[start : start + batch_size]
            batch_mask = mask[start : start + batch_size].reshape(-1)
            n_valid = int(batch_mask.sum())
            rows = None
            if plan is not None:
                rows = plan[(plan >= seen) & (plan < seen + n_valid)] - seen
            reducer.start_batch(batch_mask, rows)
            am = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
            body(input_ids=ids.to(device), attention_mask=am, use_cache=False)
            reducer.end_batch()
            seen += n_valid
    log.info("captured %d tokens over %d blocks", stats.num_tokens, stats.num_blocks)
    return stats
