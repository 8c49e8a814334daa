"""Streaming statistics of the hidden states that enter and leave every decoder block.

State ``s`` is what enters block ``s`` (``s = 0 .. T-1``); state ``T`` is what leaves the last block.
Block ``i`` maps state ``i`` to state ``i + 1``; a span of blocks ``[a..b]`` maps state ``a`` to
state ``b + 1``. Estimators read one of two summaries, both bounded in memory whatever the number of
calibration tokens:

* :class:`Moments`: first and second moments of every state after a shared random projection, as one
  Gram matrix over the concatenated states, so the joint covariance of any pair of states is a slice.
* :class:`TokenSample`: the states of a fixed, seeded subset of token positions.

The baselines ShortGPT and angular distance read a third, :class:`CosineSums`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CaptureSpec:
    """What an estimator needs captured. ``None`` means "not needed"."""

    moments_dim: int | None = None  # projected width for second moments (0 = no projection)
    sample_tokens: int | None = None  # token positions kept for sample-based estimators
    sample_dim: int | None = None  # projected width of the sample (None or 0 = no projection)
    cosine: bool = False  # per-token cosine / angle between every pair of states (ShortGPT, angular)
    coordinates: bool = False  # per-coordinate moments of every pair of states (unprojected)
    normalize: bool = False  # RMS-normalise each token's state first: what a pre-norm block reads

    def merge(self, other: CaptureSpec) -> CaptureSpec:
        """The spec that serves both estimators (they must agree on normalisation)."""
        if self.normalize != other.normalize:
            raise ValueError("these estimators need differently normalised states: capture them separately")

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
            cosine=self.cosine or other.cosine,
            coordinates=self.coordinates or other.coordinates,
            normalize=self.normalize,
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
class CosineSums:
    """Sums over tokens of ``cos(state a, state b)`` and of ``arccos(cos) / pi`` for every pair ``(a, b)``.

    Both are ``(num_states, num_states)`` float64, symmetric; memory does not depend on the token count.
    """

    num_states: int
    count: int = 0
    cos: torch.Tensor | None = None  # (num_states, num_states)
    angle: torch.Tensor | None = None  # (num_states, num_states), in [0, 1]

    def update(self, units: torch.Tensor) -> None:
        """Add tokens: ``units`` is ``(num_states, tokens, dim)``, each state already unit-normalised per token."""
        per_token = units.transpose(0, 1)  # (tokens, num_states, dim)
        cos = torch.bmm(per_token, per_token.transpose(1, 2)).clamp_(-1.0, 1.0)  # (tokens, S, S)
        if self.cos is None or self.angle is None:
            shape = (self.num_states, self.num_states)
            self.cos = torch.zeros(shape, dtype=torch.float64, device=units.device)
            self.angle = torch.zeros(shape, dtype=torch.float64, device=units.device)
        self.cos += cos.sum(0, dtype=torch.float64)
        self.angle += (torch.arccos(cos) / math.pi).sum(0, dtype=torch.float64)
        self.count += units.shape[1]

    def mean_cos(self) -> torch.Tensor:
        """Mean cosine between every pair of states, ``(num_states, num_states)`` float64 on CPU."""
        return self._mean(self.cos)

    def mean_angle(self) -> torch.Tensor:
        """Mean angular distance ``arccos(cos) / pi`` in [0, 1] between every pair of states."""
        return self._mean(self.angle)

    def _mean(self, total: torch.Tensor | None) -> torch.Tensor:
        if self.count == 0 or total is None:
            raise ValueError("no tokens were accumulated: the cosine statistics are empty")
        return (total / self.count).cpu()

    def to_json(self) -> dict[str, Any]:
        return {
            "num_states": self.num_states,
            "count": self.count,
            "cos_sum": self.cos.tolist() if self.cos is not None else None,
            "angle_sum": self.angle.tolist() if self.angle is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CosineSums:
        def tensor(rows: Any) -> torch.Tensor | None:
            return None if rows is None else torch.tensor(rows, dtype=torch.float64)

        return cls(
            int(data["num_states"]), int(data["count"]), tensor(data["cos_sum"]), tensor(data["angle_sum"])
        )


@dataclass
class CoordinateMoments:
    """Per-coordinate moments of every pair of states: ``cross[a, b, j] = sum_t z_a[t, j] z_b[t, j]``.

    Enough for the correlation of coordinate ``j`` of any state with coordinate ``j`` of any other,
    in ``O(S^2 d)`` memory (float64, shift-centred like :class:`Moments`).
    """

    num_states: int
    dim: int
    count: int = 0
    total: torch.Tensor | None = None  # (num_states, dim)
    cross: torch.Tensor | None = None  # (num_states, num_states, dim)
    shift: torch.Tensor | None = None  # (num_states, dim)

    def update(self, z: torch.Tensor) -> None:
        """Add tokens ``z``: ``(tokens, num_states, dim)``; products in float32, sums in float64."""
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

    def merge_(self, other: CoordinateMoments) -> None:
        """Fold another accumulator into this one, exactly (re-centred on this one's shift)."""
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
        delta = (other.shift - self.shift).to(self.cross.device)  # (S, d)
        o_total = other.total.to(self.cross.device)
        self.cross += other.cross.to(self.cross.device)
        self.cross += o_total[:, None, :] * delta[None, :, :] + delta[:, None, :] * o_total[None, :, :]
        self.cross += other.count * delta[:, None, :] * delta[None, :, :]
        self.total += o_total + other.count * delta
        self.count += other.count


@dataclass
class BlockStats:
    """Everything the capture pass records: the input to the estimators."""

    num_blocks: int
    hidden_size: int
    num_tokens: int = 0
    moments: Moments | None = None
    sample: TokenSample | None = None
    coordinates: CoordinateMoments | None = None
    normalized: bool = False  # states were RMS-normalised per token before any statistic
    cosine: CosineSums | None = None

    @property
    def num_states(self) -> int:
        return self.num_blocks + 1
