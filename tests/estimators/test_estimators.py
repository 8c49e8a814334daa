"""Known-answer tests for the MI estimators, on synthetic states whose information content is known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import miprun.estimators as estimators
from miprun.capture.batches import plan_batches
from miprun.capture.statistic import CaptureContext, CapturedStats, Statistic, Tap, combine
from miprun.capture.statistics.sample import even_rows
from miprun.errors import InvalidOptionError, InvalidTypeError, UnknownNameError
from miprun.estimators.base import Estimator
from miprun.estimators.binned import BinnedMI, binned_mi, quantile_bins
from miprun.estimators.coordinate import CoordinateMI
from miprun.estimators.gaussian import GaussianMI, gaussian_mi
from miprun.estimators.renyi import (
    RenyiMI,
    gram_matrix,
    median_distance,
    renyi_entropy,
    renyi_mi,
    squared_distances,
)


def make_stats(states: list[torch.Tensor], *ests: Estimator) -> CapturedStats:
    """Captured statistics of ``states`` (each ``(n, d)``) serving ``ests`` (default: every estimator here).

    The states go through the statistic protocol as the capture pass drives it: each token is a window of
    one token, the windows are folded in two batches, and equal or widenable requests are combined.
    """
    requests = combine([s for est in ests or all_estimators() for s in est.statistics()])
    return fold(states, requests)


def fold(states: list[torch.Tensor], requests: list[Statistic], batches: int = 2) -> CapturedStats:
    """Run ``requests`` over ``states`` through start / reduce / update, in ``batches`` forward passes."""
    n, d = states[0].shape
    mask = torch.ones(n, 1, dtype=torch.bool)  # n windows of one token each
    ctx = CaptureContext(num_blocks=len(states) - 1, hidden_size=d, seed=0, token_mask=mask)
    out = CapturedStats(num_blocks=len(states) - 1, hidden_size=d, num_tokens=n, statistics=requests)
    for stat in requests:
        stat.start(ctx)
    for batch in plan_batches(mask, -(-n // batches)):
        for stat in requests:
            taps = stat.taps(ctx)
            assert taps == [Tap(state=s) for s in range(len(states))]
            parts = [stat.reduce(t, states[t.state][batch.start : batch.stop].float(), batch) for t in taps]
            stat.update(parts, batch)
    return out


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# One of each registered estimator, configured for the small synthetic samples used here.
CONFIGS: dict[str, dict] = {
    "coordinate": {},
    "gaussian": {"proj_dim": 0},
    "renyi": {"sample_tokens": 256},
    "binned": {"bins": 8, "sample_tokens": 512},
}
ESTIMATOR_IDS = list(CONFIGS)


def all_estimators() -> list[Estimator]:
    return [estimators.get(name, **params) for name, params in CONFIGS.items()]


def test_the_contract_tests_cover_every_registered_estimator() -> None:
    assert sorted(CONFIGS) == sorted(estimators.REGISTRY.names())
    assert estimators.DEFAULT in CONFIGS


NOISE_SCALES = (0.1, 0.3, 1.0, 3.0)


@pytest.fixture(scope="module")
def noisy_chain() -> CapturedStats:
    """State 0 is ``x``; state ``k + 1`` is ``x + NOISE_SCALES[k] * eps`` with one shared noise draw."""
    g = gen(0)
    x = torch.randn(512, 4, generator=g)
    eps = torch.randn(512, 4, generator=g)
    return make_stats([x, *(x + s * eps for s in NOISE_SCALES)])


@pytest.fixture(scope="module")
def block_kinds() -> CapturedStats:
    """State 0 is ``x``; then a near-identity block, a large nonlinear update, mostly new information."""
    g = gen(1)
    n, d = 512, 8
    x = torch.randn(n, d, generator=g)
    near = x + 0.05 * torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 64, generator=g), torch.randn(64, d, generator=g) / 8
    transformed = x + 4.0 * torch.tanh(x @ w1) @ w2
    replaced = 0.3 * x + torch.randn(n, d, generator=g)
    return make_stats([x, near, transformed, replaced])


# --- Gaussian -------------------------------------------------------------------------------------


def analytic_mi(a: torch.Tensor, noise: float) -> float:
    """MI of X ~ N(0, I) and Y = A X + noise * N(0, I): ``0.5 logdet(I + A A^T / noise²)``."""
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return 0.5 * float(torch.logdet(eye + a @ a.T / noise**2))


@pytest.mark.parametrize("d", [4, 6, 8])
def test_gaussian_matches_analytic_mi_from_population_covariance(d: int) -> None:
    a = torch.randn(d, d, generator=gen(d), dtype=torch.float64)
    noise = 0.7
    eye = torch.eye(d, dtype=torch.float64)
    joint = torch.cat([torch.cat([eye, a.T], 1), torch.cat([a, a @ a.T + noise**2 * eye], 1)])
    assert gaussian_mi(joint, d, shrinkage=0.0) == pytest.approx(analytic_mi(a, noise), rel=1e-9)


@pytest.mark.parametrize("d", [4, 6, 8])
def test_gaussian_estimator_matches_analytic_mi_from_samples(d: int) -> None:
    g = gen(100 + d)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    noise = 0.5
    x = torch.randn(20_000, d, generator=g, dtype=torch.float64)
    y = x @ a.T + noise * torch.randn(20_000, d, generator=g, dtype=torch.float64)
    est = GaussianMI(proj_dim=0, shrinkage=0.0)
    got = est.mi(make_stats([x, y], est), 0, 1)
    assert got == pytest.approx(analytic_mi(a, noise), rel=0.03)


def test_gaussian_shrinkage_keeps_identity_finite_with_known_value() -> None:
    # Independent unit coordinates copied exactly: each becomes a 2x2 correlation with off-diagonal 1 - λ.
    d, lam = 5, 0.05
    eye = torch.eye(d, dtype=torch.float64)
    joint = torch.cat([torch.cat([eye, eye], 1), torch.cat([eye, eye], 1)]) * 3.0
    expected = -0.5 * d * math.log(1.0 - (1.0 - lam) ** 2)
    assert gaussian_mi(joint, d, shrinkage=lam) == pytest.approx(expected, rel=1e-12)


def test_gaussian_ignores_constant_coordinates() -> None:
    cov = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected = -0.5 * math.log(1 - 0.5**2)
    assert gaussian_mi(cov, 1, shrinkage=0.0) == pytest.approx(expected, rel=1e-12)


def random_joint_cov(seed: int, dim: int) -> torch.Tensor:
    b = torch.randn(dim, dim + 2, generator=gen(seed), dtype=torch.float64)
    return b @ b.T + 0.05 * torch.eye(dim, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dx=st.integers(1, 5), dy=st.integers(1, 5), lam=st.floats(0.0, 0.5))
def test_gaussian_is_symmetric_and_scale_invariant(seed: int, dx: int, dy: int, lam: float) -> None:
    joint = random_joint_cov(seed, dx + dy)
    mi = gaussian_mi(joint, dx, lam)
    swap = torch.cat([torch.arange(dx, dx + dy), torch.arange(dx)])
    assert gaussian_mi(joint[swap][:, swap], dy, lam) == pytest.approx(mi, rel=1e-9, abs=1e-12)
    scale = torch.rand(dx + dy, generator=gen(seed), dtype=torch.float64) * 100 + 0.01
    assert gaussian_mi(joint * scale[:, None] * scale[None, :], dx, lam) == pytest.approx(
        mi, rel=1e-9, abs=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dx=st.integers(1, 4), dy=st.integers(1, 4))
def test_gaussian_mi_decreases_with_shrinkage(seed: int, dx: int, dy: int) -> None:
    # Shrinking toward the diagonal is adding independent per-coordinate noise, so the DPI applies.
    joint = random_joint_cov(seed, dx + dy)
    values = [gaussian_mi(joint, dx, lam) for lam in (0.0, 0.1, 0.4, 0.9)]
    assert all(v >= 0 for v in values)
    assert values == sorted(values, reverse=True)


def test_gaussian_requires_moments_of_its_own_width() -> None:
    with pytest.raises(ValueError, match=r"gaussian estimator needs \('Moments', 128, False\)"):
        GaussianMI().mi(CapturedStats(num_blocks=1, hidden_size=4), 0, 1)
    # moments captured at another width are not silently read in place of the ones asked for
    x = torch.randn(64, 4, generator=gen(13))
    unprojected = make_stats([x, x + 1.0], GaussianMI(proj_dim=0))
    assert GaussianMI(proj_dim=0).mi(unprojected, 0, 1) > 0
    with pytest.raises(ValueError, match="did not record"):
        GaussianMI(proj_dim=2).mi(unprojected, 0, 1)


# --- Rényi ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.01, 2.0, 3.0])
def test_renyi_entropy_of_uniform_and_pure_spectra(alpha: float) -> None:
    n = 16
    assert renyi_entropy(torch.eye(n, dtype=torch.float64) / n, alpha) == pytest.approx(
        math.log(n), rel=1e-12
    )
    assert renyi_entropy(torch.ones(n, n, dtype=torch.float64) / n, alpha) == pytest.approx(0.0, abs=1e-9)


def test_renyi_entropy_order_two_and_shannon_limit() -> None:
    gram = gram_matrix(torch.randn(40, 3, generator=gen(2)), sigma=1.0)
    a = gram / gram.trace()
    assert renyi_entropy(a, 2.0) == pytest.approx(-math.log(float((a * a).sum())), rel=1e-10)
    lam = torch.linalg.eigvalsh(a).clamp_min(1e-300)
    von_neumann = -float((lam * lam.log()).sum())
    assert renyi_entropy(a, 1.0 + 1e-7) == pytest.approx(von_neumann, rel=1e-5)


def test_gram_matrix_is_the_gaussian_kernel() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    gram = gram_matrix(x, sigma=2.0)
    assert gram[0, 1] == pytest.approx(math.exp(-25 / 8), rel=1e-12)
    assert gram[0, 2] == pytest.approx(math.exp(-1 / 8), rel=1e-12)
    assert torch.allclose(gram.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(gram, gram.T)


def test_renyi_mi_of_distinct_points_with_itself_is_log_n() -> None:
    # A tiny kernel width makes the Gram matrix the identity: S(A) = S(A∘A) = log n.
    x = torch.randn(64, 3, generator=gen(3))
    assert renyi_mi(x, x, 1.01, 1e-3, 1e-3) == pytest.approx(math.log(64), rel=1e-9)


def test_renyi_mi_is_symmetric_and_near_zero_for_independent_scalars() -> None:
    g = gen(4)
    x, y = torch.randn(256, 1, generator=g), torch.randn(256, 1, generator=g)
    sx, sy = median_distance(squared_distances(x)), median_distance(squared_distances(y))
    mi = renyi_mi(x, y, 1.01, sx, sy)
    assert renyi_mi(y, x, 1.01, sy, sx) == pytest.approx(mi, rel=1e-9)
    assert mi < 0.1 * renyi_mi(x, x, 1.01, sx, sx)


def test_renyi_estimator_matches_the_pure_function_and_resets_its_cache() -> None:
    g = gen(5)
    x = torch.randn(128, 3, generator=g)
    y = torch.tanh(x) + 0.3 * torch.randn(128, 3, generator=g)
    med = [median_distance(squared_distances(v)) for v in (x, y)]
    pooled = median_distance(squared_distances(x), squared_distances(y))
    est, shared = RenyiMI(), RenyiMI(shared_bandwidth=True)
    assert est.mi(make_stats([x, y], est), 0, 1) == pytest.approx(renyi_mi(x, y, 1.01, *med), rel=1e-12)
    assert shared.mi(make_stats([x, y], shared), 0, 1) == pytest.approx(
        renyi_mi(x, y, 1.01, pooled, pooled), rel=1e-12
    )
    # New statistics with the same shapes must not be served from the cache of the old ones.
    assert est.mi(make_stats([x, x], est), 0, 1) == pytest.approx(
        renyi_mi(x, x, 1.01, med[0], med[0]), rel=1e-12
    )


def test_even_rows_spread_over_the_whole_sample() -> None:
    assert even_rows(5, 8).tolist() == [0, 1, 2, 3, 4]  # a smaller sample is used whole
    assert even_rows(10, 4).tolist() == [0, 3, 6, 9]
    rows = even_rows(128, 64)
    assert len(rows) == 64 and rows[0] == 0 and rows[-1] == 127
    assert bool((rows.diff() > 0).all())  # distinct, in window order


def test_renyi_reads_an_even_subsample_of_a_larger_sample() -> None:
    # One capture serves several sample sizes: a smaller reader takes tokens spread over every window,
    # not the first ones (which would all come from the first windows of the calibration text).
    g = gen(11)
    x = torch.randn(128, 2, generator=g)
    y = x + torch.randn(128, 2, generator=g)
    stats = make_stats([x, y], RenyiMI(sample_tokens=128))
    rows = even_rows(128, 64)
    med = [median_distance(squared_distances(v[rows])) for v in (x, y)]
    got = RenyiMI(sample_tokens=64).mi(stats, 0, 1)
    assert got == pytest.approx(renyi_mi(x[rows], y[rows], 1.01, *med), rel=1e-12)
    first = [median_distance(squared_distances(v[:64])) for v in (x, y)]
    assert got != pytest.approx(renyi_mi(x[:64], y[:64], 1.01, *first), rel=1e-6)


# --- binned ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [4, 16])
def test_binned_identity_is_log_bins(bins: int) -> None:
    x = torch.randn(2048, 8, generator=gen(6))
    assert binned_mi(x, x, bins) == pytest.approx(math.log(bins), rel=1e-12)
    est = BinnedMI(bins=bins)
    assert est.mi(make_stats([x, x.clone()], est), 0, 1) == pytest.approx(math.log(bins), rel=1e-12)


def test_quantile_bins_are_equal_frequency() -> None:
    x = torch.randn(1000, 3, generator=gen(7))
    counts = torch.stack([torch.bincount(col, minlength=10) for col in quantile_bins(x, 10).T])
    assert torch.equal(counts, torch.full((3, 10), 100))


def test_binned_is_invariant_to_monotone_maps_per_coordinate() -> None:
    g = gen(8)
    x = torch.randn(1024, 4, generator=g)
    y = x + 0.5 * torch.randn(1024, 4, generator=g)
    assert binned_mi(torch.exp(x), y**3 - 2.0, 8) == pytest.approx(binned_mi(x, y, 8), rel=1e-12)


def test_binned_independent_matches_plugin_bias() -> None:
    # Under independence the plug-in MI is about (bins - 1)² / (2n) nats, not 0.
    g = gen(9)
    n, bins = 2048, 16
    x, y = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    assert binned_mi(x, y, bins) == pytest.approx((bins - 1) ** 2 / (2 * n), rel=0.3)


def test_binned_reads_an_even_subsample_of_a_larger_sample() -> None:
    g = gen(12)
    x = torch.randn(256, 3, generator=g)
    y = x + torch.randn(256, 3, generator=g)
    got = BinnedMI(bins=4, sample_tokens=100).mi(make_stats([x, y], BinnedMI(sample_tokens=256)), 0, 1)
    rows = even_rows(256, 100)
    assert got == pytest.approx(binned_mi(x[rows], y[rows], 4), rel=1e-12)
    assert got != pytest.approx(binned_mi(x[:100], y[:100], 4), rel=1e-6)
    assert got != pytest.approx(binned_mi(x, y, 4), rel=1e-6)


def test_binned_requires_equal_widths() -> None:
    with pytest.raises(ValueError, match="same shape"):
        binned_mi(torch.randn(64, 3), torch.randn(64, 4), 4)


# --- all estimators -------------------------------------------------------------------------------


@pytest.mark.parametrize("est", all_estimators(), ids=ESTIMATOR_IDS)
def test_independent_states_score_near_zero(est: Estimator) -> None:
    g = gen(10)
    x = torch.randn(512, 1, generator=g)
    stats = make_stats([x, torch.randn(512, 1, generator=g), x + 0.1 * torch.randn(512, 1, generator=g)])
    assert est.mi(stats, 0, 1) < 0.1 * est.mi(stats, 0, 2)
    assert est.nmi(stats, 0, 1) < 0.1


@pytest.mark.parametrize("est", all_estimators(), ids=ESTIMATOR_IDS)
def test_mi_decreases_as_noise_grows(est: Estimator, noisy_chain: CapturedStats) -> None:
    values = [est.mi(noisy_chain, 0, k) for k in range(1, len(NOISE_SCALES) + 1)]
    assert all(a > b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("est", all_estimators(), ids=ESTIMATOR_IDS)
def test_near_identity_block_scores_higher_than_a_transforming_block(
    est: Estimator, block_kinds: CapturedStats
) -> None:
    near, transformed, replaced = (est.nmi(block_kinds, 0, k) for k in (1, 2, 3))
    assert near > 0.75 and near > transformed and near > replaced, (near, transformed, replaced)
    if est.name == "coordinate":
        # It measures what survives in place: an update four times the input's size rewrites every
        # coordinate as thoroughly as new information does, although the input could be decoded from it.
        assert transformed < 0.1 and replaced < 0.1, (transformed, replaced)
    else:
        assert transformed > replaced, (near, transformed, replaced)
    for s in range(4):
        assert est.nmi(block_kinds, s, s) == pytest.approx(1.0, abs=1e-9)


def test_registry_suggests_the_closest_name() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'gaussian'") as err:
        estimators.get("gausian")
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
    assert "Available: binned, coordinate, gaussian, renyi" in str(err.value)
    assert isinstance(estimators.get("renyi", alpha=2.0), RenyiMI)
    assert isinstance(estimators.get(estimators.DEFAULT), CoordinateMI)


def test_build_types_string_parameters_strictly() -> None:
    # values from --est-opt KEY=VALUE arrive as strings and are typed by the estimator's fields
    est = estimators.build("gaussian", {"proj_dim": "16", "shrinkage": "0.1", "normalize": "no"})
    assert est == GaussianMI(proj_dim=16, shrinkage=0.1, normalize=False)
    assert estimators.build("coordinate", {"center": "on"}).center is True
    with pytest.raises(InvalidOptionError, match=r"'normalize' must be bool, got 'maybe'"):
        estimators.build("gaussian", {"normalize": "maybe"})
    with pytest.raises(InvalidOptionError, match=r"'proj_dim' must be int, got '1\.5'"):
        estimators.build("gaussian", {"proj_dim": "1.5"})
    with pytest.raises(InvalidOptionError, match=r"proj_dim must lie in \[0, inf\), got -5"):
        estimators.build("gaussian", {"proj_dim": -5})
    with pytest.raises(InvalidOptionError, match=r"shrinkage must lie in \(0, 1\]"):
        estimators.get("coordinate", shrinkage=0.0)
    with pytest.raises(InvalidOptionError, match="alpha must be positive and not 1"):
        estimators.build("renyi", {"alpha": "1"})
    with pytest.raises(InvalidOptionError, match=r"no parameter 'bin'\. Did you mean 'bins'\?"):
        estimators.build("binned", {"bin": "8"})
    # Python values are not converted: a bool is not a number and a string is not a bool
    with pytest.raises(InvalidTypeError, match="'proj_dim' must be int, got True"):
        estimators.get("gaussian", proj_dim=True)
    with pytest.raises(InvalidTypeError, match=r"'bins' must be int, got 8\.0"):
        estimators.get("binned", bins=8.0)


def test_params_and_requested_statistics() -> None:
    assert CoordinateMI().params() == {
        "name": "coordinate",
        "shrinkage": 0.05,
        "normalize": False,
        "center": False,
    }
    assert GaussianMI().params() == {
        "name": "gaussian",
        "proj_dim": 128,
        "shrinkage": 0.05,
        "normalize": False,
    }
    renyi = RenyiMI(sample_dim=64)
    renyi.mi(make_stats([torch.randn(16, 2), torch.randn(16, 2)], renyi), 0, 1)  # fills the cache
    assert renyi.params() == {
        "name": "renyi",
        "alpha": 1.01,
        "sample_tokens": 512,
        "sample_dim": 64,
        "shared_bandwidth": False,
        "normalize": False,
    }
    assert BinnedMI().params() == {
        "name": "binned",
        "bins": 16,
        "sample_tokens": 2048,
        "sample_dim": 0,
        "normalize": False,
    }

    def configs(est: Estimator) -> list[tuple]:
        return [s.config() for s in est.statistics()]

    assert configs(CoordinateMI(normalize=True)) == [("CoordinateMoments", True)]
    assert configs(GaussianMI(proj_dim=64)) == [("Moments", 64, False)]
    assert configs(renyi) == [("TokenSample", 512, 64, False)]
    assert configs(BinnedMI()) == [("TokenSample", 2048, 0, False)]
    # estimators sharing a capture pass: equal requests once, a smaller token sample served by the larger
    both = combine([*RenyiMI().statistics(), *BinnedMI().statistics(), *GaussianMI().statistics()])
    assert [s.config() for s in both] == [("TokenSample", 2048, 0, False), ("Moments", 128, False)]


@pytest.mark.parametrize("est", [RenyiMI(), BinnedMI()], ids=["renyi", "binned"])
def test_sample_estimators_require_a_sample(est: Estimator) -> None:
    with pytest.raises(
        ValueError, match=rf"the {est.name} estimator needs \('TokenSample', .* did not record"
    ):
        est.mi(CapturedStats(num_blocks=1, hidden_size=4), 0, 1)
