"""Matrix-based Rényi α-entropy MI on Gaussian-kernel Gram matrices (Giraldo, Rao & Principe 2015).

Entropies are functionals of the eigenvalues of trace-normalised Gram matrices over a token sample, so
no density is estimated: ``MI = S(A) + S(B) - S(A∘B / tr(A∘B))``, in nats. The kernel width is the median
pairwise distance, per side or shared between input and output (spec section 5.2 compares the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.capture.statistics import TokenSample
from miprun.errors import InvalidOptionError
from miprun.estimators.base import REGISTRY, Estimator, check_range


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(n, n)`` of the rows of ``x`` ``(n, d)``, in float64."""
    x = x.to(torch.float64)
    x = x - x.mean(0)  # distances are translation invariant; centring limits cancellation
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return d2.fill_diagonal_(0.0)


def median_distance(*d2: torch.Tensor) -> float:
    """Median of the positive off-diagonal pairwise distances over all given squared-distance matrices.

    Repeated tokens (distance 0) are left out so they cannot collapse the width; 1.0 if all coincide.
    """
    vals = []
    for m in d2:
        rows, cols = torch.triu_indices(m.shape[0], m.shape[1], offset=1)
        upper = m[rows, cols]
        vals.append(upper[upper > 0])
    pooled = torch.cat(vals)
    if pooled.numel() == 0:
        return 1.0
    return math.sqrt(float(pooled.median()))


def kernel_from_distances(d2: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian kernel ``exp(-d² / (2 σ²))`` from squared distances."""
    if sigma <= 0:
        raise ValueError(f"the kernel width must be positive, got sigma={sigma}")
    return torch.exp(-d2 / (2.0 * sigma * sigma))


def gram_matrix(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-kernel Gram matrix ``(n, n)`` of the rows of ``x`` ``(n, d)`` with width ``sigma``."""
    return kernel_from_distances(squared_distances(x), sigma)


def normalise(gram: torch.Tensor) -> torch.Tensor:
    """Trace-normalise a Gram matrix so its eigenvalues form a probability vector."""
    return gram / gram.diagonal().sum()


def renyi_entropy(a_norm: torch.Tensor, alpha: float) -> float:
    """Rényi α-entropy ``log(Σ λ_i^α) / (1 - α)`` in nats of a trace-normalised Gram matrix."""
    if alpha <= 0 or alpha == 1:
        raise ValueError(f"alpha must be positive and not 1, got {alpha} (use e.g. 1.01 for ~Shannon)")
    lam = torch.linalg.eigvalsh(a_norm.to(torch.float64))
    # Eigenvalues below the round-off level are zero (for alpha < 1 their powers would add entropy).
    lam = lam[lam > lam.max() * lam.numel() * torch.finfo(torch.float64).eps]
    lam = lam / lam.sum()
    return float(torch.log((lam**alpha).sum()) / (1.0 - alpha))


def joint_entropy(gram_x: torch.Tensor, gram_y: torch.Tensor, alpha: float) -> float:
    """Rényi α-entropy of the joint: the trace-normalised Hadamard product of the two Gram matrices."""
    return renyi_entropy(normalise(gram_x * gram_y), alpha)


def renyi_mi(x: torch.Tensor, y: torch.Tensor, alpha: float, sigma_x: float, sigma_y: float) -> float:
    """Matrix-based Rényi MI in nats between paired samples ``x`` ``(n, dx)`` and ``y`` ``(n, dy)``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must pair the same tokens, got {x.shape[0]} and {y.shape[0]} rows")
    gx, gy = gram_matrix(x, sigma_x), gram_matrix(y, sigma_y)
    mi = renyi_entropy(normalise(gx), alpha) + renyi_entropy(normalise(gy), alpha)
    return max(mi - joint_entropy(gx, gy, alpha), 0.0)


@REGISTRY.register
@dataclass
class RenyiMI(Estimator):
    """Matrix-based Rényi MI over a token sample; per-state distances and entropies are cached.

    ``mi`` is called for O(T²) pairs of the same states, so each state's squared distances, kernel
    width and marginal entropy are computed once per :class:`BlockStats` (held by reference).
    """

    name: ClassVar[str] = "renyi"
    summary: ClassVar[str] = "matrix-based Rényi MI over a token sample"

    alpha: float = 1.01  # Rényi order; close to 1 approximates Shannon (von Neumann) entropy
    sample_tokens: int = 512  # tokens used (evenly from a larger sample): cost grows as their cube per pair
    sample_dim: int = 0  # projected width of the sample (0 = no projection)
    shared_bandwidth: bool = False  # one kernel width (median over both sides) for input and output
    normalize: bool = False  # RMS-normalise each token's state first

    def __post_init__(self) -> None:
        check_range("sample_tokens", self.sample_tokens, 2)
        check_range("sample_dim", self.sample_dim, 0)
        if self.alpha <= 0 or self.alpha == 1:
            raise InvalidOptionError(
                f"alpha must be positive and not 1 (e.g. 1.01 for ~Shannon), got {self.alpha}"
            )
        # Plain attributes, not dataclass fields, so they stay out of params() and comparisons.
        self._owner: CapturedStats | None = None
        self._d2: dict[int, torch.Tensor] = {}
        self._sigma: dict[int, float] = {}
        self._entropy: dict[tuple[int, float], float] = {}

    def statistics(self) -> list[Statistic]:
        """A token sample of ``sample_tokens`` positions at width ``sample_dim``."""
        return [TokenSample(capacity=self.sample_tokens, proj_dim=self.sample_dim, normalize=self.normalize)]

    def mi(self, stats: CapturedStats, a: int, b: int) -> float:
        """``MI(state a ; state b)`` in nats from ``sample_tokens`` sampled tokens of each state, spread evenly."""
        stats.get(self.statistics()[0], "the renyi estimator")
        if stats is not self._owner:  # new statistics: drop everything cached for the old ones
            self._owner, self._d2, self._sigma, self._entropy = stats, {}, {}, {}
        if self.shared_bandwidth:
            sa = sb = median_distance(self._distances(a), self._distances(b))
        else:
            sa, sb = self._width(a), self._width(b)
        ga = kernel_from_distances(self._distances(a), sa)
        gb = kernel_from_distances(self._distances(b), sb)
        mi = self._marginal(a, sa, ga) + self._marginal(b, sb, gb) - joint_entropy(ga, gb, self.alpha)
        return max(mi, 0.0)

    def _distances(self, s: int) -> torch.Tensor:
        if s not in self._d2:
            assert self._owner is not None
            sample = self._owner.get(self.statistics()[0])
            self._d2[s] = squared_distances(sample.state(s, self.sample_tokens))
        return self._d2[s]

    def _width(self, s: int) -> float:
        if s not in self._sigma:
            self._sigma[s] = median_distance(self._distances(s))
        return self._sigma[s]

    def _marginal(self, s: int, sigma: float, gram: torch.Tensor) -> float:
        key = (s, sigma)
        if key not in self._entropy:
            self._entropy[key] = renyi_entropy(normalise(gram), self.alpha)
        return self._entropy[key]
