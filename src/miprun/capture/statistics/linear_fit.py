"""Normal-equation sums of a least-squares map, for the linear repair: what ``X`` must become to restore ``Y``.

For a removed run ``[a..b]``, ``X`` is what the fold will rescale (the MLP output of block ``a-1``, or the
state entering the run when it starts at block 0), ``B`` is what the residual stream carries after the cut
(state ``a``), and ``Y`` is what the dense model passed on (state ``b + 1``). After the cut the stream
holds ``B - X + X T``; it should hold ``Y``, so ``T`` solves ``min ||X T - (Y - B + X)||``. The sums are
float64 and ``d x d`` whatever the number of tokens. With ``relative``, each token's equations are weighted
by ``1 / mean(Y_t^2)``, so the fit minimises every token's error relative to its own scale (what a
norm-reading next block sees) instead of letting a few high-norm tokens dominate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from miprun.capture.statistic import REGISTRY, BatchInfo, CaptureContext, Statistic, Tap


@REGISTRY.register
@dataclass
class LinearFitSums(Statistic):
    """``X^T X``, ``X^T (Y - B)`` and ``sum X^2``-style counts for one map, accumulated in float64."""

    name: ClassVar[str] = "linear-fit"

    source: Tap = field(default_factory=Tap)  # X
    base: int = 0  # state B
    target: int = 1  # state Y
    relative: bool = False  # weigh each token by 1 / mean(Y_t^2)
    xtx: torch.Tensor | None = field(default=None, init=False, repr=False)  # (d, d)
    xtd: torch.Tensor | None = field(default=None, init=False, repr=False)  # (d, d): X^T (Y - B)
    dtd: torch.Tensor | None = field(default=None, init=False, repr=False)  # (d,): per-coordinate (Y - B)^2
    count: int = field(default=0, init=False)

    @classmethod
    def example(cls) -> LinearFitSums:
        """The map from what enters block 0 to what it adds (its default source names no tap)."""
        return cls(Tap(state=0), base=0, target=1)

    def taps(self, ctx: CaptureContext) -> list[Tap]:
        return [self.source, Tap(state=self.base), Tap(state=self.target)]

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        x, base, target = (p.to(torch.float64) for p in parts)
        if x.shape[0] == 0:
            return
        d = target - base
        if self.relative:  # scale both sides by 1/rms(Y_t): X^T W X with W = diag(1 / mean(Y_t^2))
            scale = target.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()
            x, d = x * scale, d * scale
        if self.xtx is None:
            dim = x.shape[1]
            self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
            self.xtd = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
            self.dtd = torch.zeros(dim, dtype=torch.float64, device=x.device)
        assert self.xtd is not None and self.dtd is not None
        self.xtx += x.T @ x
        self.xtd += x.T @ d
        self.dtd += (d * d).sum(0)
        self.count += x.shape[0]

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, LinearFitSums)
        if other.count == 0 or other.xtx is None or other.xtd is None or other.dtd is None:
            return
        if self.xtx is None or self.xtd is None or self.dtd is None:
            self.xtx, self.xtd, self.dtd = other.xtx.clone(), other.xtd.clone(), other.dtd.clone()
        else:
            self.xtx += other.xtx.to(self.xtx.device)
            self.xtd += other.xtd.to(self.xtd.device)
            self.dtd += other.dtd.to(self.dtd.device)
        self.count += other.count
