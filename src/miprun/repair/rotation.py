"""The scaled-rotation map: the largest family of maps that folds *exactly* through an RMS norm.

A block whose MLP output ``z`` passes through an RMS norm before the residual add (Gemma 2/3) adds
``P = U diag(s)`` with ``U = z / rms(z)`` and ``s`` the norm's scale. For an orthogonal ``Q``,
``rms(z Q) = rms(z)``, so ``W_down <- Q^T W_down`` with a new scale ``D`` makes the block add ``U Q D``:
every map ``diag(s)^-1 Q D`` of ``P`` folds into a stock checkpoint (spec section 7). This module fits
``Q`` and ``D`` to ``min ||U Q D - R||^2`` from the normal-equation sums ``P^T P`` and ``P^T R`` alone,
by alternating an exact per-coordinate solve for ``D`` with an orthogonal Procrustes step for ``Q``.
Pure functions over float64 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScaledRotation:
    """``Q`` ``(d, d)`` orthogonal and ``D`` ``(d,)``: the map ``U -> U Q diag(D)``, and its squared error."""

    rotation: torch.Tensor
    scale: torch.Tensor
    error: float  # ||U Q D - R||^2 minus ||R||^2 (the constant): lower is better
    iterations: int


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest ``m`` (its polar factor): ``argmax_Q tr(Q^T m)`` over orthogonal ``Q``.

    Real activations are badly conditioned (Gemma's carry a few huge coordinates); where LAPACK's SVD does
    not converge, ``m`` is nudged by a relative 1e-12 of its norm toward the identity and tried again.
    """
    for jitter in (0.0, 1e-12, 1e-9, 1e-6):
        try:
            nudged = m + jitter * float(m.norm()) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            u, _, vh = torch.linalg.svd(nudged / max(float(m.norm()), 1e-300))
            return u @ vh
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the SVD of the Procrustes matrix did not converge, even nudged")


@dataclass
class _Given:
    """What the error and the best scale need of one ``Q``: ``A Q`` and the diagonals of ``Q^T A Q`` and
    ``Q^T B`` (one matrix product instead of three)."""

    aq: torch.Tensor
    qaq: torch.Tensor  # diag(Q^T A Q)
    qb: torch.Tensor  # diag(Q^T B)

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> _Given:
        aq = a @ q
        return cls(aq, (q * aq).sum(0), (q * b).sum(0))

    def error(self, d: torch.Tensor) -> float:
        """``||U Q D - R||^2 - ||R||^2`` (from ``A = U^T U`` and ``B = U^T R``)."""
        return float((d * d * self.qaq).sum() - 2.0 * (d * self.qb).sum())

    def best_scale(self, prior: torch.Tensor, rho: float) -> torch.Tensor:
        """Per-coordinate least squares for ``D`` given ``Q``, pulled toward ``prior`` with weight ``rho``."""
        return (self.qb + rho * prior) / (self.qaq + rho)


def fit_scaled_rotation(
    ptp: torch.Tensor,
    ptr: torch.Tensor,
    norm_scale: torch.Tensor,
    ridge: float = 1e-4,
    iterations: int = 40,
) -> ScaledRotation:
    """Fit ``R ~ P diag(norm_scale)^-1 Q diag(D)`` from ``P^T P`` and ``P^T R`` (float64, ``(d, d)`` each).

    Starts from the map that changes nothing (``Q = I``, ``D = norm_scale``) and never returns a worse one.
    Each round solves ``D`` exactly, then tries two ``Q`` steps and keeps the better: the Procrustes
    solution of ``||U Q - R D^-1||`` (spec section 7) and a majorisation step that cannot increase the
    error. ``ridge`` (relative to the mean diagonal of ``U^T U``) pulls ``D`` toward ``norm_scale``.
    """
    inv = 1.0 / norm_scale.to(torch.float64)
    a = inv[:, None] * ptp * inv[None, :]  # U^T U
    b = inv[:, None] * ptr  # U^T R
    prior = norm_scale.to(torch.float64)
    rho = ridge * max(float(a.diagonal().mean()), 1e-12)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    lipschitz = max(float(torch.linalg.matrix_norm(a)), 1e-300)  # Frobenius >= the largest eigenvalue
    q, d = eye, prior
    given = _Given.of(a, b, q)
    best = ScaledRotation(q, d, given.error(d), 0)
    d = given.best_scale(prior, rho)  # the per-coordinate map (Q = I): never worse than it
    if given.error(d) < best.error:
        best = ScaledRotation(q, d, given.error(d), 0)
    for it in range(1, iterations + 1):
        d = given.best_scale(prior, rho)
        safe = torch.where(d.abs() > 1e-8, d, torch.full_like(d, 1e-8))
        gradient = given.aq * (d * d)[None, :] - b * d[None, :]  # half the gradient in Q
        try:
            steps = [polar(b / safe[None, :]), polar(lipschitz * float((d * d).max()) * q - gradient)]
        except torch.linalg.LinAlgError:  # keep the best so far (at worst Q = I with the best scale)
            break
        tried = [(_Given.of(a, b, s), s) for s in steps]
        scored = [(g.error(g.best_scale(prior, rho)), i) for i, (g, _) in enumerate(tried)]
        _, pick = min(scored, key=lambda e: e[0])
        given, q = tried[pick]
        d = given.best_scale(prior, rho)
        err = given.error(d)
        if err < best.error - 1e-12 * abs(best.error):
            best = ScaledRotation(q, d, err, it)
        elif it > 1:
            break
    return best


def as_map(fit: ScaledRotation, norm_scale: torch.Tensor) -> torch.Tensor:
    """The fitted map on ``P`` as a ``(d, d)`` matrix: ``diag(norm_scale)^-1 Q diag(D)``."""
    inv = 1.0 / norm_scale.to(torch.float64)
    return inv[:, None] * fit.rotation * fit.scale[None, :]
