"""The per-coordinate estimator and RMS normalisation: analytic answers and the invariance trap (spec 5.2)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model

from miprun.capture import capture
from miprun.estimators import get
from miprun.stats import BlockStats, CaptureSpec, CoordinateMoments

GEN = torch.Generator().manual_seed(0)


def coordinate_stats(states: list[torch.Tensor]) -> BlockStats:
    """BlockStats holding per-coordinate moments of the given (tokens, dim) states."""
    n, d = states[0].shape
    stats = BlockStats(num_blocks=len(states) - 1, hidden_size=d)
    stats.coordinates = CoordinateMoments(num_states=len(states), dim=d)
    z = torch.stack(states, dim=1)
    stats.coordinates.update(z[: n // 3])
    stats.coordinates.update(z[n // 3 :])
    return stats


def test_matches_the_analytic_mi_of_correlated_gaussian_coordinates():
    n, d = 40_000, 6
    x = torch.randn(n, d, generator=GEN, dtype=torch.float64)
    noise = torch.tensor([0.1, 0.3, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    y = 3.0 * x + noise * torch.randn(n, d, generator=GEN, dtype=torch.float64) + 7.0
    rho2 = 9.0 / (9.0 + noise**2)
    expected = float((-0.5 * torch.log1p(-rho2)).mean())
    got = get("coordinate", shrinkage=1e-9, center=True).mi(coordinate_stats([x, y]), 0, 1)
    assert got == pytest.approx(expected, rel=0.02)


def test_uncentred_correlation_counts_a_shift_of_the_mean_as_change():
    """Moments about zero: y = x + c has per-coordinate rho = sigma / sqrt(sigma^2 + c^2) analytically."""
    n, d = 40_000, 4
    x = 2.0 * torch.randn(n, d, generator=GEN, dtype=torch.float64)  # sigma = 2, mean 0
    shift = torch.tensor([0.0, 1.0, 2.0, 6.0], dtype=torch.float64)
    stats = coordinate_stats([x, x + shift])
    rho = 0.95 * 2.0 / torch.sqrt(4.0 + shift**2)  # shrunk by the default 5 %, as the estimator does
    expected = float((-0.5 * torch.log1p(-(rho**2))).mean())
    uncentred = get("coordinate", center=False)
    assert uncentred.mi(stats, 0, 1) == pytest.approx(expected, rel=0.03)
    # centred, every coordinate is a perfect copy; with zero-mean data both agree
    assert get("coordinate", center=True).nmi(stats, 0, 1) == pytest.approx(1.0)
    var_x, var_y, cov = stats.coordinates.moments(0, 1)
    assert torch.allclose(cov / (var_x * var_y).sqrt(), torch.ones(d, dtype=torch.float64))
    same = coordinate_stats([x, 0.5 * x + torch.randn(n, d, generator=GEN, dtype=torch.float64)])
    assert uncentred.mi(same, 0, 1) == pytest.approx(get("coordinate", center=True).mi(same, 0, 1), rel=0.03)
    assert get("coordinate", center=False).nmi(stats, 0, 0) == pytest.approx(1.0)


def test_identity_scores_one_and_independence_near_zero():
    x = torch.randn(5000, 8, generator=GEN)
    est = get("coordinate")
    stats = coordinate_stats([x, x.clone(), torch.randn(5000, 8, generator=GEN)])
    assert est.nmi(stats, 0, 1) == pytest.approx(1.0)
    assert est.nmi(stats, 0, 2) < 0.01
    assert est.mi(stats, 0, 0) == pytest.approx(-0.5 * math.log(1 - 0.95**2))


def test_a_rotation_is_not_redundant_although_full_mi_says_it_is():
    """The trap of spec 5.2: an invertible map keeps full MI maximal; per-coordinate MI sees the change."""
    n, d = 20_000, 8
    x = torch.randn(n, d, generator=GEN)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=GEN))
    near_identity = x + 0.1 * torch.randn(n, d, generator=GEN)
    rotated = x @ rotation.T
    stats = coordinate_stats([x, near_identity, rotated])
    coord = get("coordinate")
    assert coord.nmi(stats, 0, 1) > 0.8 > 0.3 > coord.nmi(stats, 0, 2)
    # the full-covariance Gaussian estimator cannot tell them apart: both are near-deterministic maps
    from miprun.stats import Moments

    stats.moments = Moments(num_states=3, dim=d)
    stats.moments.update(torch.cat([x, near_identity, rotated], dim=1))
    full = get("gaussian", proj_dim=0)
    assert full.nmi(stats, 0, 2) >= full.nmi(stats, 0, 1) - 0.05


def test_coordinate_moments_merge_exactly():
    z = torch.randn(600, 3, 4, generator=GEN) * 2 + 5
    whole, left, right = (CoordinateMoments(3, 4) for _ in range(3))
    whole.update(z)
    left.update(z[:250])
    right.update(z[250:])
    left.merge_(right)
    for got, want in zip(left.moments(0, 2), whole.moments(0, 2), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_capture_fills_coordinates_and_normalises_tokens():
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 10), generator=GEN)
    stats = capture(model, ids, CaptureSpec(coordinates=True, moments_dim=0, normalize=True), progress=False)
    assert stats.coordinates is not None and stats.moments is not None and stats.normalized
    var_a, _var_b, cov = stats.coordinates.moments(1, 3)
    full = stats.moments.covariance(1, 3)
    d = stats.hidden_size
    assert torch.allclose(var_a, full.diagonal()[:d], rtol=1e-4, atol=1e-6)
    assert torch.allclose(cov, full[:d, d:].diagonal(), rtol=1e-4, atol=1e-6)
    # every token's state has unit RMS after normalisation: mean of squares over coordinates is ~1
    mean = stats.moments.total / stats.moments.count + stats.moments.shift
    second = full.diagonal()[:d] * (stats.moments.count - 1) / stats.moments.count + mean[d : 2 * d] ** 2
    assert float(second.mean()) == pytest.approx(1.0, rel=1e-3)


def test_estimators_that_disagree_on_normalisation_cannot_share_a_capture():
    with pytest.raises(ValueError, match="capture them separately"):
        get("coordinate", normalize=True).capture_spec().merge(get("gaussian").capture_spec())
