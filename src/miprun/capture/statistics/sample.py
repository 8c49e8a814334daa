"""A bounded, seeded sample of token positions, kept whole: what the sample-based estimators read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from miprun.capture.statistic import REGISTRY, BatchInfo, CaptureContext, Statistic, Tap, rms_normalize
from miprun.capture.statistics.moments import random_projection


def sample_plan(total: int, capacity: int, seed: int) -> torch.Tensor:
    """Sorted indices (into ``total`` sample tokens) of a seeded uniform sample of ``capacity`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=gen)[: min(capacity, total)]
    return picks.sort().values


def even_rows(count: int, n: int) -> torch.Tensor:
    """``n`` indices spread evenly over ``0 .. count-1`` (all of them when ``count <= n``).

    The sample is in window order, so an even stride reads every part of the calibration text.
    """
    if count <= n:
        return torch.arange(count)
    return torch.linspace(0, count - 1, n, dtype=torch.float64).round().long()


@REGISTRY.register
@dataclass
class TokenSample(Statistic):
    """States of a seeded sample of ``capacity`` token positions, drawn over all windows: ``(tokens, dim)``."""

    name: ClassVar[str] = "sample"

    capacity: int = 512
    proj_dim: int = 0  # projected width (0: no projection)
    normalize: bool = False
    plan: torch.Tensor | None = field(default=None, init=False, repr=False)  # sampled global token indices
    proj: torch.Tensor | None = field(default=None, init=False, repr=False)
    parts: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)  # (num_states, n_i, dim)

    def widen(self, other: Statistic) -> Statistic | None:
        """One sample serves a smaller one of the same width: readers take an even subsample of it."""
        if not isinstance(other, TokenSample) or (self.proj_dim, self.normalize) != (
            other.proj_dim,
            other.normalize,
        ):
            return None
        return self if self.capacity >= other.capacity else other

    def start(self, ctx: CaptureContext) -> None:
        self.plan = sample_plan(int(ctx.token_mask.sum()), self.capacity, ctx.seed)
        self.proj = random_projection(ctx.hidden_size, self.proj_dim, ctx.seed + 1)

    def _rows(self, batch: BatchInfo) -> torch.Tensor:
        assert self.plan is not None
        lo, hi = batch.token_offset, batch.token_offset + batch.num_tokens
        return self.plan[(self.plan >= lo) & (self.plan < hi)] - lo

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        rows = h[self._rows(batch).to(h.device)]
        if self.normalize:
            rows = rms_normalize(rows)
        return rows @ self.proj.to(h.device) if self.proj is not None else rows

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        room = self.capacity - self.count
        if parts and parts[0].shape[0] and room > 0:
            self.parts.append(torch.stack(parts)[:, :room].to(torch.float32).cpu())

    @property
    def count(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def state(self, s: int, n: int | None = None) -> torch.Tensor:
        """Sampled tokens of state ``s``: ``(tokens, dim)``; with ``n``, an even subsample of at most ``n``."""
        if not self.parts:
            raise ValueError("the token sample is empty")
        tokens = torch.cat([p[s] for p in self.parts])
        return tokens if n is None else tokens[even_rows(tokens.shape[0], n)]

    def merge_(self, other: Statistic) -> None:
        """Append another share's tokens: shares are merged in window order, so the sample stays sorted."""
        assert isinstance(other, TokenSample)
        self.parts.extend(other.parts)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "parts": [p.cpu() for p in self.parts]}

    @classmethod
    def from_state_dict(cls, state: dict) -> Statistic:
        obj = super().from_state_dict(state)
        assert isinstance(obj, TokenSample)
        obj.parts = list(state.get("parts", []))
        return obj


__all__ = ["TokenSample", "even_rows", "sample_plan"]
