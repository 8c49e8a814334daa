"""Gaussian MI from second moments: ``0.5 * (logdet Σx + logdet Σy - logdet Σ)``, in nats.

Exact for jointly Gaussian states and a lower bound on the information a linear read-out of the input
carries about the output otherwise. The joint covariance is shrunk toward its diagonal first, so an
identity block (a singular joint covariance) scores a large but finite MI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.capture.statistics import Moments
from miprun.estimators.base import REGISTRY, Estimator, check_range

_EIG_FLOOR = 1e-12  # smallest eigenvalue kept when a correlation matrix is singular (shrinkage 0)


def shrunk_correlation(joint_cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - λ) R + λ I`` for the correlation ``R`` of ``joint_cov``; constant coordinates are independent.

    Shrinking the covariance toward its diagonal is the same as this up to a diagonal rescaling, which
    cancels in the MI; working with correlations keeps outlier dimensions from ruining the conditioning.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    cov = joint_cov.to(torch.float64)
    var = cov.diagonal()
    live = var > var.abs().max().clamp_min(1e-300) * 1e-12  # (dx + dy,) coordinates with variance
    inv_std = torch.where(live, var.clamp_min(1e-300).rsqrt(), torch.zeros_like(var))
    corr = cov * inv_std[:, None] * inv_std[None, :]
    eye = torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    corr = torch.where(eye.bool(), eye, corr)  # unit diagonal, also for the constant coordinates
    return (1.0 - shrinkage) * corr + shrinkage * eye


def logdet_pd(mat: torch.Tensor) -> float:
    """``log det`` of a symmetric positive semi-definite matrix; eigenvalues floored when singular."""
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return float(2.0 * chol.diagonal().log().sum())
    return float(torch.linalg.eigvalsh(mat).clamp_min(_EIG_FLOOR).log().sum())


def gaussian_mi(joint_cov: torch.Tensor, dx: int, shrinkage: float) -> float:
    """MI in nats between the first ``dx`` and the remaining coordinates of a Gaussian with ``joint_cov``.

    ``joint_cov`` is ``(dx + dy, dx + dy)``; it is shrunk toward its diagonal by ``shrinkage`` first.
    """
    if joint_cov.ndim != 2 or joint_cov.shape[0] != joint_cov.shape[1]:
        raise ValueError(f"joint_cov must be a square matrix, got shape {tuple(joint_cov.shape)}")
    if not 0 < dx < joint_cov.shape[0]:
        raise ValueError(f"dx must split the {joint_cov.shape[0]} coordinates in two, got dx={dx}")
    corr = shrunk_correlation(joint_cov, shrinkage)
    mi = 0.5 * (logdet_pd(corr[:dx, :dx]) + logdet_pd(corr[dx:, dx:]) - logdet_pd(corr))
    return max(mi, 0.0)


@REGISTRY.register
@dataclass
class GaussianMI(Estimator):
    """Gaussian MI of the joint covariance of two states, after a shared random projection to ``proj_dim`` (0: none)."""

    name: ClassVar[str] = "gaussian"
    summary: ClassVar[str] = (
        "Gaussian MI of the joint covariance of two states, after a shared random projection"
    )

    proj_dim: int = 128  # projected width of the captured moments (0 = no projection)
    shrinkage: float = 0.05  # weight of the diagonal in the shrunk joint covariance
    normalize: bool = False  # RMS-normalise each token's state first

    def __post_init__(self) -> None:
        check_range("proj_dim", self.proj_dim, 0)
        check_range("shrinkage", self.shrinkage, 0.0, 1.0)

    def statistics(self) -> list[Statistic]:
        """Second moments of every state at width ``proj_dim``."""
        return [Moments(proj_dim=self.proj_dim, normalize=self.normalize)]

    def mi(self, stats: CapturedStats, a: int, b: int) -> float:
        """``MI(state a ; state b)`` in nats from the captured joint covariance."""
        moments = stats.get(self.statistics()[0], "the gaussian estimator")
        return gaussian_mi(moments.covariance(a, b), moments.dim, self.shrinkage)
