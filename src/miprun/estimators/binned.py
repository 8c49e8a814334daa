"""Binned per-coordinate MI: the mean over coordinates ``j`` of the plug-in ``MI(x_j ; y_j)``, in nats.

Each coordinate is cut into equal-frequency bins on the sample itself, so the score depends only on
ranks: it is blind to per-coordinate monotone rescaling but, unlike the joint estimators, not to
rotations that mix coordinates (spec section 5.2). An identity block scores exactly ``log(bins)`` when
the sample has no ties and ``bins`` divides the token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.capture.statistics import TokenSample
from miprun.estimators.base import REGISTRY, Estimator, check_range


def quantile_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-frequency bin index ``(n, d)`` in ``0 .. bins-1`` of every entry of ``x`` ``(n, d)``, per column.

    The token of rank ``r`` lands in bin ``floor(r * bins / n)``; tied values share a bin.
    """
    n = x.shape[0]
    cols = x.T.contiguous()  # (d, n)
    ranks = torch.ceil(torch.arange(1, bins, dtype=torch.float64) * n / bins).long().clamp_max(n - 1)
    edges = cols.sort(dim=1).values[:, ranks].contiguous()  # (d, bins - 1) lower edges of bins 1..
    return torch.searchsorted(edges, cols, right=True).T  # (n, d)


def joint_histograms(bx: torch.Tensor, by: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts ``(d, bins, bins)`` of the bin pairs ``(bx[:, j], by[:, j])``, all coordinates ``j`` at once."""
    d = bx.shape[1]
    cell = torch.arange(d, device=bx.device) * bins * bins + bx * bins + by  # (n, d) flat cell index
    return torch.bincount(cell.reshape(-1), minlength=d * bins * bins).reshape(d, bins, bins)


def plugin_mi(counts: torch.Tensor) -> torch.Tensor:
    """Plug-in MI in nats ``(d,)`` of each 2-D histogram in ``counts`` ``(d, bins, bins)``."""
    p = counts.to(torch.float64)
    p = p / p.sum(dim=(1, 2), keepdim=True)
    px, py = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    ratio = p / (px * py).clamp_min(1e-300)
    terms = torch.where(p > 0, p * ratio.clamp_min(1e-300).log(), torch.zeros_like(p))  # 0 log 0 = 0
    return terms.sum(dim=(1, 2))


def binned_mi(x: torch.Tensor, y: torch.Tensor, bins: int) -> float:
    """Mean over coordinates of the plug-in MI in nats of ``(x_j, y_j)`` in equal-frequency bins."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(
            f"binned MI pairs coordinate j of x with coordinate j of y, so x and y must both be (n, d) "
            f"with the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if bins < 2:
        raise ValueError(f"need at least 2 bins, got {bins}")
    counts = joint_histograms(quantile_bins(x, bins), quantile_bins(y, bins), bins)
    return max(float(plugin_mi(counts).mean()), 0.0)


@REGISTRY.register
@dataclass
class BinnedMI(Estimator):
    """Binned per-coordinate MI over a token sample of the two states."""

    name: ClassVar[str] = "binned"
    summary: ClassVar[str] = "binned per-coordinate MI over a token sample"

    bins: int = 16  # equal-frequency bins per coordinate
    sample_tokens: int = (
        2048  # tokens used (evenly from a larger sample); plug-in bias ≈ (bins-1)²/(2 tokens)
    )
    sample_dim: int = 0  # projected width of the sample (0 = no projection)
    normalize: bool = False  # RMS-normalise each token's state first

    def __post_init__(self) -> None:
        check_range("bins", self.bins, 2)
        check_range("sample_tokens", self.sample_tokens, 2)
        check_range("sample_dim", self.sample_dim, 0)

    def statistics(self) -> list[Statistic]:
        """A token sample of ``sample_tokens`` positions at width ``sample_dim``."""
        return [TokenSample(capacity=self.sample_tokens, proj_dim=self.sample_dim, normalize=self.normalize)]

    def mi(self, stats: CapturedStats, a: int, b: int) -> float:
        """``MI(state a ; state b)`` in nats, mean over coordinates, on ``sample_tokens`` tokens spread evenly."""
        sample = stats.get(self.statistics()[0], "the binned estimator")
        n = self.sample_tokens
        return binned_mi(sample.state(a, n), sample.state(b, n), self.bins)
