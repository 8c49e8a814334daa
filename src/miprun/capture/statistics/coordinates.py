"""Per-coordinate moments of every pair of states: what the per-coordinate (default) estimator reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from miprun.capture.statistic import REGISTRY, BatchInfo, CaptureContext, Statistic, Tap, rms_normalize
from miprun.capture.statistics.moments import recentre


@REGISTRY.register
@dataclass
class CoordinateMoments(Statistic):
    """``cross[a, b, j] = sum_t z_a[t, j] z_b[t, j]`` over tokens, for every pair of states ``(a, b)``.

    Enough for the correlation of coordinate ``j`` of any state with coordinate ``j`` of any other, in
    ``O(S^2 d)`` memory (float64, shift-centred like :class:`~miprun.capture.statistics.moments.Moments`).
    """

    name: ClassVar[str] = "coordinates"

    normalize: bool = False  # RMS-normalise each token's state first
    num_states: int = field(default=0, init=False)
    dim: int = field(default=0, init=False)
    count: int = field(default=0, init=False)
    total: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states, dim)
    cross: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states, num_states, dim)
    shift: torch.Tensor | None = field(default=None, init=False, repr=False)  # (num_states, dim)

    def start(self, ctx: CaptureContext) -> None:
        self.num_states, self.dim = ctx.num_blocks + 1, ctx.hidden_size

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        return rms_normalize(h) if self.normalize else h

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        """Add one batch: products in float32, sums in float64."""
        z = torch.stack(parts, dim=1)  # (tokens, num_states, dim)
        if z.shape[0] == 0:
            return
        if self.shift is None:  # float32-representable, so the float32 shift below is exactly this one
            self.shift = z.to(torch.float64).mean(0).to(torch.float32).to(torch.float64)
            self.total = torch.zeros_like(self.shift)
            self.cross = torch.zeros(
                self.num_states, self.num_states, self.dim, dtype=torch.float64, device=z.device
            )
        assert self.total is not None and self.cross is not None
        # One float32 pass over the batch (this runs once per batch of a pass that is meant to cost about
        # one forward pass): shift, then one (S x S) Gram per coordinate from a contiguous copy.
        zd = (z.float() - self.shift.to(torch.float32)).permute(2, 1, 0).contiguous()  # (dim, S, tokens)
        self.count += z.shape[0]
        self.total += zd.sum(-1, dtype=torch.float64).T
        self.cross += torch.bmm(zd, zd.transpose(1, 2)).permute(1, 2, 0).to(torch.float64)

    def moments(self, a: int, b: int, center: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-coordinate ``(var_a, var_b, cov_ab)``, each ``(dim,)`` float64 on CPU.

        With ``center=False``, second moments about zero instead (``E[z_a^2]``, ``E[z_b^2]``,
        ``E[z_a z_b]``), which keep each coordinate's mean, as cosine similarity does.
        """
        if self.count < 2 or self.cross is None or self.total is None or self.shift is None:
            raise ValueError("need at least two tokens of statistics to form a covariance")
        n, cross, total, shift = self.count, self.cross, self.total, self.shift

        def second(i: int, j: int) -> torch.Tensor:
            if center:
                return ((cross[i, j] / n - (total[i] / n) * (total[j] / n)) * (n / (n - 1))).cpu()
            # sum z_i z_j = cross + s_i total_j + s_j total_i + n s_i s_j  (z = shifted value + shift)
            raw = cross[i, j] + shift[i] * total[j] + shift[j] * total[i]
            return (raw / n + shift[i] * shift[j]).cpu()

        return second(a, a), second(b, b), second(a, b)

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, CoordinateMoments)
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.total, self.cross, self.shift = (
                other.count,
                other.total,
                other.cross,
                other.shift,
            )
            return
        assert self.shift is not None and self.total is not None and self.cross is not None
        assert other.shift is not None and other.total is not None and other.cross is not None
        dev = self.cross.device
        total, cross = recentre(
            other.count, other.total.to(dev), other.cross.to(dev), other.shift.to(dev), self.shift
        )
        self.total += total
        self.cross += cross
        self.count += other.count
