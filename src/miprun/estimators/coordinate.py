"""Per-coordinate Gaussian MI: coordinate ``j`` of the input paired with coordinate ``j`` of the output.

Full MI is blind to any invertible map (spec 5.2): a block that rotates its input scores like one that
passes it through. Pairing each coordinate with itself is not: it measures how much of every residual
coordinate survives the block in place, which is what removing the block would preserve. Per
coordinate, the Gaussian MI of a correlation ``rho`` is ``-0.5 log(1 - rho^2)``; the score is its mean.

What the default (``center=False``) measures, precisely: ``rho_j = E[x_j y_j] / sqrt(E[x_j^2] E[y_j^2])``,
moments about zero, i.e. the cosine similarity over tokens of coordinate ``j`` before and after the
block. ``-0.5 log(1 - rho_j^2)`` is then the exact MI of ``(x_j, y_j)`` *under a zero-mean Gaussian
model*, not the MI of the states as they are: it is not invariant to a shift of the mean. Two independent
coordinates with mean 10 and standard deviation 1 share no information, yet have ``rho = 100/101`` and
score NMI 0.93; a block that moves a coordinate's mean counts as changing it, as cosine similarity does.
``center=True`` uses the usual centred correlation (true Gaussian MI, shift-invariant). The estimator
study chose the uncentred form on SmolLM2 and confirmed it on Gemma (docs/estimator-study.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.capture.statistics import CoordinateMoments
from miprun.estimators.base import REGISTRY, Estimator, check_range


def coordinate_mi(var_x: torch.Tensor, var_y: torch.Tensor, cov_xy: torch.Tensor, shrinkage: float) -> float:
    """Mean over coordinates of ``-0.5 log(1 - ((1 - λ) rho_j)^2)``, in nats; constant coordinates give 0.

    Shrinking each correlation by ``1 - λ`` keeps the MI of an identity map finite.
    """
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in (0, 1], got {shrinkage}")
    var_x, var_y, cov_xy = (t.to(torch.float64) for t in (var_x, var_y, cov_xy))
    scale = (var_x * var_y).clamp_min(0.0).sqrt()
    live = scale > scale.max().clamp_min(1e-300) * 1e-12
    rho = torch.where(live, cov_xy / scale.clamp_min(1e-300), torch.zeros_like(cov_xy)).clamp(-1.0, 1.0)
    rho = (1.0 - shrinkage) * rho
    return float((-0.5 * torch.log1p(-(rho**2))).mean())


@REGISTRY.register
@dataclass
class CoordinateMI(Estimator):
    """Mean per-coordinate Gaussian MI; by default under a zero-mean model (moments about zero, not shift-invariant)."""

    name: ClassVar[str] = "coordinate"
    summary: ClassVar[str] = (
        "mean per-coordinate Gaussian MI, by default under a zero-mean model (moments about zero; --est-opt center=true centres)"
    )

    shrinkage: float = 0.05  # correlations are scaled by (1 - shrinkage)
    normalize: bool = False  # RMS-normalise each token's state first
    center: bool = False  # True: centred correlations; False: moments about zero (zero-mean Gaussian)

    def __post_init__(self) -> None:
        check_range("shrinkage", self.shrinkage, 0.0, 1.0, open_low=True)

    def statistics(self) -> list[Statistic]:
        """Per-coordinate moments of every pair of states."""
        return [CoordinateMoments(normalize=self.normalize)]

    def mi(self, stats: CapturedStats, a: int, b: int) -> float:
        """``mean_j MI(state a_j ; state b_j)`` in nats."""
        moments = stats.get(self.statistics()[0], "the coordinate estimator")
        var_a, var_b, cov = moments.moments(a, b, self.center)
        return coordinate_mi(var_a, var_b, cov, self.shrinkage)
