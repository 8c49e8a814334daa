"""Streaming statistics of the hidden states that enter and leave every decoder block.

State ``s`` is what enters block ``s`` (``s = 0 .. T-1``); state ``T`` is what leaves the last block.
Block ``i`` maps state ``i`` to state ``i + 1``; a span of blocks ``[a..b]`` maps state ``a`` to
state ``b + 1``. Estimators read one of two summaries, both bounded in memory whatever the number of
calibration tokens:

* :class:`Moments`: first and second moments of every state after a shared random projection, as one
  Gram matrix over the concatenated states, so the joint covariance of any pair of states is a slice.
* :class:`TokenSample`: the states of a fixed, seeded subset of token positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CaptureSpec:
    """What an estimator needs captured. ``None`` means "not needed"."""

    moments_dim: int | None = None  # projected width for second moments (0 = no projection)
    sample_tokens: int | None = None  # token positions kept for sample-based estimators
    sample_dim: int | None = None  # projected width of the sample (None or 0 = no projection)

    def merge(self, other: CaptureSpec) -> CaptureSpec:
        """The spec that serves both estimators."""

        def pick(a: int | None, b: int | None) -> int | None:
            if a is None:
                return b
            if b is None:
                return a
            return max(a, b)

        return CaptureSpec(
            pick(self.moments_dim, other.moments_dim),
            pick(self.sample_tokens, other.sample_tokens),
            pick(self.sample_dim, other.sample_dim),
        )


def random_projection(dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """A seeded Gaussian projection ``(dim, out_dim)`` scaled by ``1/sqrt(out_dim)``; ``None`` if not narrower.

    The same matrix is applied to every state: the residual stream shares one basis across layers.
    """
    if out_dim <= 0 or out_dim >= dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=gen, dtype=torch.float32) / out_dim**0.5


@dataclass
class Moments:
    """Running sums over tokens of the concatenated projected states ``z = [z_0, ..., z_T]``.

    ``total`` is ``sum z`` and ``gram`` is ``sum z z^T`` in float64; ``shift`` (the first batch's mean)
    is subtracted before accumulating so that large common offsets do not cancel catastrophically.
    """

    num_states: int
    dim: int
    count: int = 0
    total: torch.Tensor | None = None  # (num_states * dim,)
    gram: torch.Tensor | None = None  # (num_states * dim, num_states * dim)
    shift: torch.Tensor | None = None  # (num_states * dim,)

    def update(self, z: torch.Tensor) -> None:
        """Add tokens ``z``: ``(tokens, num_states * dim)``, any float dtype, any device.

        One batch's products are formed in float32 on shift-centred data (the cost of a capture pass is
        this matmul) and accumulated across batches in float64.
        """
        if self.shift is None:
            self.shift = z.to(torch.float64).mean(0)
            self.total = torch.zeros_like(self.shift)
            self.gram = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
        assert self.total is not None and self.gram is not None
        zc = (z.to(torch.float64) - self.shift).to(torch.float32)
        self.count += z.shape[0]
        self.total += zc.sum(0, dtype=torch.float64)
        self.gram += (zc.T @ zc).to(torch.float64)

    def covariance(self, a: int, b: int) -> torch.Tensor:
        """Joint covariance ``(2*dim, 2*dim)`` of states ``a`` and ``b`` (float64, on CPU)."""
        if self.count < 2 or self.gram is None or self.total is None:
            raise ValueError("need at least two tokens of statistics to form a covariance")
        idx = torch.cat([self._slice(a), self._slice(b)])
        mean = self.total[idx] / self.count
        second = self.gram[idx][:, idx] / self.count
        return (second - torch.outer(mean, mean)).cpu() * (self.count / (self.count - 1))

    def _slice(self, s: int) -> torch.Tensor:
        if not 0 <= s < self.num_states:
            raise IndexError(f"state {s} out of range 0..{self.num_states - 1}")
        return torch.arange(
            s * self.dim, (s + 1) * self.dim, device=self.gram.device if self.gram is not None else None
        )

    def merge_(self, other: Moments) -> None:
        """Fold another accumulator (e.g. another rank's) into this one, exactly."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.total, self.gram, self.shift = other.count, other.total, other.gram, other.shift
            return
        assert self.shift is not None and other.shift is not None and other.total is not None
        assert self.total is not None and self.gram is not None and other.gram is not None
        delta = (other.shift - self.shift).to(self.gram.device)
        o_total, o_gram = other.total.to(self.gram.device), other.gram.to(self.gram.device)
        # Re-centre the other's sums on our shift: sum (z - s1)(z - s1)^T with z - s1 = (z - s2) + delta.
        self.gram += o_gram + torch.outer(o_total, delta) + torch.outer(delta, o_total)
        self.gram += other.count * torch.outer(delta, delta)
        self.total += o_total + other.count * delta
        self.count += other.count


@dataclass
class TokenSample:
    """States of a bounded, seeded sample of token positions: ``states[s]`` is ``(tokens, dim)`` float32."""

    num_states: int
    capacity: int
    parts: list[torch.Tensor] = field(default_factory=list)  # each (num_states, n_i, dim)

    @property
    def count(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def update(self, z: torch.Tensor) -> None:
        """Add tokens ``z``: ``(num_states, tokens, dim)``; the caller decides which tokens to keep."""
        room = self.capacity - self.count
        if room > 0:
            self.parts.append(z[:, :room].to(torch.float32).cpu())

    def state(self, s: int) -> torch.Tensor:
        """All sampled tokens of state ``s``: ``(tokens, dim)``."""
        if not self.parts:
            raise ValueError("the token sample is empty")
        return torch.cat([p[s] for p in self.parts])


@dataclass
class BlockStats:
    """Everything the capture pass records: the input to the estimators."""

    num_blocks: int
    hidden_size: int
    num_tokens: int = 0
    moments: Moments | None = None
    sample: TokenSample | None = None

    @property
    def num_states(self) -> int:
        return self.num_blocks + 1
