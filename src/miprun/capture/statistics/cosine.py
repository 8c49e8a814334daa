"""Sums of per-token cosine and angular distance between every pair of states: what ShortGPT and the
angular-distance methods read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from miprun.capture.statistic import REGISTRY, BatchInfo, CaptureContext, Statistic, Tap


@REGISTRY.register
@dataclass
class CosineSums(Statistic):
    """Sums over tokens of ``cos(state a, state b)`` and of ``arccos(cos) / pi`` for every pair ``(a, b)``.

    Both are ``(num_states, num_states)`` float64, symmetric; memory does not depend on the token count.
    ``positions="last"`` reads only each window's last sample token (Gromov et al.'s definition).
    """

    name: ClassVar[str] = "cosine"

    positions: Literal["all", "last"] = "all"
    num_states: int = field(default=0, init=False)
    count: int = field(default=0, init=False)
    cos: torch.Tensor | None = field(default=None, init=False, repr=False)
    angle: torch.Tensor | None = field(default=None, init=False, repr=False)  # in [0, 1]

    def start(self, ctx: CaptureContext) -> None:
        self.num_states = ctx.num_blocks + 1

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        if self.positions == "last":
            h = h[batch.last_rows.to(h.device)]
        return F.normalize(h, dim=-1)  # (tokens, hidden), unit length per token

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        units = torch.stack(parts)  # (num_states, tokens, dim)
        if units.shape[1] == 0:
            return
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

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, CosineSums)
        if other.count == 0 or other.cos is None or other.angle is None:
            return
        if self.cos is None or self.angle is None:
            self.cos, self.angle, self.count = other.cos.clone(), other.angle.clone(), other.count
            return
        self.cos += other.cos.to(self.cos.device)
        self.angle += other.angle.to(self.angle.device)
        self.count += other.count
