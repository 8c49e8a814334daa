"""The per-coordinate estimator and RMS normalisation: analytic answers and the invariance trap (spec 5.2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_models import tiny_model

from miprun.capture import capture
from miprun.capture.statistic import BatchInfo, CaptureContext, CapturedStats, Statistic, combine
from miprun.capture.statistics import CoordinateMoments, Moments
from miprun.estimators import get

GEN = torch.Generator().manual_seed(0)


def fold(stat: Statistic, states: list[torch.Tensor], cuts: tuple[int, ...]) -> Statistic:
    """Feed the ``(tokens, dim)`` states to ``stat`` as the capture pass does, in batches cut at ``cuts``."""
    n, d = states[0].shape
    mask = torch.ones(n, 1, dtype=torch.bool)  # one window per token
    ctx = CaptureContext(num_blocks=len(states) - 1, hidden_size=d, seed=0, token_mask=mask)
    stat.start(ctx)
    bounds = [0, *cuts, n]
    for lo, hi in itertools.pairwise(bounds):
        batch = BatchInfo(lo, hi, mask[lo:hi].reshape(-1), lo, torch.arange(hi - lo))
        parts = [stat.reduce(tap, states[tap.state][lo:hi].float(), batch) for tap in stat.taps(ctx)]
        stat.update(parts, batch)
    return stat


def coordinate_stats(states: list[torch.Tensor], *extra: Statistic) -> CapturedStats:
    """Captured per-coordinate moments (and any ``extra`` statistics) of the given (tokens, dim) states."""
    n, d = states[0].shape
    requests = combine([CoordinateMoments(), *extra])
    for stat in requests:
        fold(stat, states, (n // 3,))
    return CapturedStats(num_blocks=len(states) - 1, hidden_size=d, num_tokens=n, statistics=requests)


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
    var_x, var_y, cov = stats.get(CoordinateMoments()).moments(0, 1)
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
    full = get("gaussian", proj_dim=0)
    stats = coordinate_stats([x, near_identity, rotated], *full.statistics())
    coord = get("coordinate")
    assert coord.nmi(stats, 0, 1) > 0.8 > 0.3 > coord.nmi(stats, 0, 2)
    # the full-covariance Gaussian estimator cannot tell them apart: both are near-deterministic maps
    assert full.nmi(stats, 0, 2) >= full.nmi(stats, 0, 1) - 0.05


@pytest.mark.parametrize("center", [True, False])
def test_coordinate_moments_merge_exactly(center: bool):
    z = torch.randn(600, 3, 4, generator=GEN) * 2 + 5
    states = [z[:, s] for s in range(3)]
    whole = fold(CoordinateMoments(), states, (200, 400))
    left = fold(CoordinateMoments(), [s[:250] for s in states], ())
    right = fold(CoordinateMoments(), [s[250:] for s in states], ())
    left.merge_(right)
    assert left.count == whole.count == 600
    for got, want in zip(left.moments(0, 2, center), whole.moments(0, 2, center), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # and both agree with the moments computed directly in float64
    var_0, var_2, cov = whole.moments(0, 2, center)
    a, b = z[:, 0].double(), z[:, 2].double()
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    scale = (599 / 600) if center else 1.0  # centred moments are the unbiased (n - 1) estimates
    assert torch.allclose(var_0 * scale, (a * a).mean(0), rtol=1e-5)
    assert torch.allclose(var_2 * scale, (b * b).mean(0), rtol=1e-5)
    assert torch.allclose(cov * scale, (a * b).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_capture_fills_coordinates_and_normalises_tokens():
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 10), generator=GEN)
    requests = [CoordinateMoments(normalize=True), Moments(proj_dim=0, normalize=True)]
    stats = capture(model, ids, requests, progress=False)
    coords, moments = stats.get(requests[0]), stats.get(requests[1])
    assert stats.num_tokens == coords.count == moments.count == 40
    var_a, _var_b, cov = coords.moments(1, 3)
    full = moments.covariance(1, 3)
    d = stats.hidden_size
    assert moments.dim == d  # proj_dim=0: no projection
    assert torch.allclose(var_a, full.diagonal()[:d], rtol=1e-4, atol=1e-6)
    assert torch.allclose(cov, full[:d, d:].diagonal(), rtol=1e-4, atol=1e-6)
    # every token's state has unit RMS after normalisation: mean of squares over coordinates is ~1
    mean = moments.total / moments.count + moments.shift
    second = full.diagonal()[:d] * (moments.count - 1) / moments.count + mean[d : 2 * d] ** 2
    assert float(second.mean()) == pytest.approx(1.0, rel=1e-3)
    assert float(coords.moments(1, 1, center=False)[0].mean()) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.integration
def test_estimators_that_disagree_on_normalisation_read_separate_statistics_of_one_pass():
    normed, raw = get("coordinate", normalize=True), get("coordinate")
    requests = combine([*normed.statistics(), *raw.statistics(), *normed.statistics()])
    assert [s.config() for s in requests] == [("CoordinateMoments", True), ("CoordinateMoments", False)]
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 10), generator=GEN)
    stats = capture(model, ids, requests, progress=False)
    assert len(stats.statistics) == 2
    unit = stats.get(normed.statistics()[0]).moments(2, 2, center=False)[0]
    plain = stats.get(raw.statistics()[0]).moments(2, 2, center=False)[0]
    assert float(unit.mean()) == pytest.approx(1.0, rel=1e-3)
    assert float(plain.mean()) != pytest.approx(1.0, rel=0.1)  # the raw states really are not normalised
    for est in (normed, raw):
        assert 0.0 < est.nmi(stats, 0, 3) < 1.0
    assert normed.nmi(stats, 0, 3) != pytest.approx(raw.nmi(stats, 0, 3), rel=1e-6)


def test_the_uncentred_default_is_not_shift_invariant_as_documented():
    """Two independent coordinates with mean 10 and sd 1 share no information, but the default (moments
    about zero) scores them NMI 0.93, as the README and the estimator's docstring say; centred, about 0."""
    from miprun.estimators.coordinate import coordinate_mi

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 1, generator=gen, dtype=torch.float64) + 10
    y = torch.randn(100_000, 1, generator=gen, dtype=torch.float64) + 10

    def nmi(center: bool) -> float:
        def second(a, b):
            return ((a - a.mean(0)) * (b - b.mean(0))).mean(0) if center else (a * b).mean(0)

        mi = coordinate_mi(second(x, x), second(y, y), second(x, y), 0.05)
        self_x = coordinate_mi(second(x, x), second(x, x), second(x, x), 0.05)
        self_y = coordinate_mi(second(y, y), second(y, y), second(y, y), 0.05)
        return mi / (self_x * self_y) ** 0.5

    assert nmi(center=False) == pytest.approx(0.93, abs=0.005)
    assert nmi(center=True) < 0.01
