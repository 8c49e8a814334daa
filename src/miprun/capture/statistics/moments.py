"""Second moments of every state after one shared random projection: what the Gaussian estimator reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from miprun.capture.statistic import REGISTRY, BatchInfo, CaptureContext, Statistic, Tap, rms_normalize


def random_projection(dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """A seeded Gaussian projection ``(dim, out_dim)`` scaled by ``1/sqrt(out_dim)``; ``None`` if not narrower.

    The same matrix is applied to every state: the residual stream shares one basis across layers.
    """
    if out_dim <= 0 or out_dim >= dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=gen, dtype=torch.float32) / out_dim**0.5


@REGISTRY.register
@dataclass
class Moments(Statistic):
    """Running sums over tokens of the concatenated projected states ``z = [z_0, ..., z_T]``.

    ``total`` is ``sum z`` and ``gram`` is ``sum z z^T`` in float64; ``shift`` (the first batch's mean)
    is subtracted before accumulating so that large common offsets do not cancel catastrophically.
    """

    name: ClassVar[str] = "moments"

    proj_dim: int = 128  # projected width (0 or >= hidden size: no projection)
    normalize: bool = False  # RMS-normalise each token's state first
    num_states: int = field(default=0, init=False)
    dim: int = field(default=0, init=False)
    count: int = field(default=0, init=False)
    total: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states * dim,)
    gram: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states * dim,) ** 2
    shift: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states * dim,)
    proj: torch.Tensor | None = field(default=None, init=False, repr=False)  # (hidden, dim) or None

    def start(self, ctx: CaptureContext) -> None:
        self.num_states = ctx.num_blocks + 1
        self.proj = random_projection(ctx.hidden_size, self.proj_dim, ctx.seed)
        self.dim = ctx.hidden_size if self.proj is None else self.proj.shape[1]

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        if self.normalize:
            h = rms_normalize(h)
        return h @ self.proj.to(h.device) if self.proj is not None else h

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        """Add one batch: the products are formed in float32 on shift-centred data, accumulated in float64."""
        z = torch.cat(parts, dim=1)  # (tokens, num_states * dim)
        if z.shape[0] == 0:
            return
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
        device = self.gram.device if self.gram is not None else None
        return torch.arange(s * self.dim, (s + 1) * self.dim, device=device)

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, Moments)
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.total, self.gram, self.shift = other.count, other.total, other.gram, other.shift
            return
        assert self.shift is not None and self.total is not None and self.gram is not None
        assert other.shift is not None and other.total is not None and other.gram is not None
        dev = self.gram.device
        total, gram = recentre(
            other.count, other.total.to(dev), other.gram.to(dev), other.shift.to(dev), self.shift
        )
        self.total += total
        self.gram += gram
        self.count += other.count


def recentre(
    count: int, total: torch.Tensor, second: torch.Tensor, shift: torch.Tensor, new_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``(sum z - shift, sum of pair products)`` re-expressed about ``new_shift``, exactly.

    With ``d = shift - new_shift``: ``z - new = (z - shift) + d``. Pair products are taken over the
    leading axis: a full outer product for 1-D sums (:class:`Moments`), per coordinate for 2-D ones
    (:class:`~miprun.capture.statistics.coordinates.CoordinateMoments`).
    """
    d = (shift - new_shift).to(second.dtype)

    def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.unsqueeze(1) * b.unsqueeze(0)

    return total + count * d, second + pair(total, d) + pair(d, total) + count * pair(d, d)
