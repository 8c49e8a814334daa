"""Selection: the exact optimum against brute force, Fast-Block-Select's invariants, the paper's example."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miprun.errors import InvalidOptionError
from miprun.methods.search import (
    brute_force_select,
    candidate_count,
    check_n,
    conflict_free_select,
    fast_block_select,
    optimal_select,
    runs,
    set_loss,
)


def random_span_nmi(num_blocks: int, seed: int):
    """A DPI-consistent span NMI: a span's NMI never exceeds any of its sub-spans' (a product of factors)."""
    rng = random.Random(seed)
    block = [rng.uniform(0.5, 1.0) for _ in range(num_blocks)]
    cross = {(a, b): rng.uniform(0.9, 1.0) for a in range(num_blocks) for b in range(a, num_blocks)}

    def span_nmi(a: int, b: int) -> float:
        value = math.prod(block[a : b + 1])
        return value * (cross[(a, b)] if b > a else 1.0)

    return block, span_nmi


def test_runs_splits_into_maximal_groups():
    assert runs([28, 23, 24, 26, 27]) == [(23, 24), (26, 28)]
    assert runs([]) == []
    assert runs([5]) == [(5, 5)]


def test_set_loss_sums_runs():
    def nmi(a: int, b: int) -> float:
        return {(0, 1): 0.9, (3, 3): 0.5}[(a, b)]

    assert set_loss([0, 1, 3], nmi) == pytest.approx(0.1 + 0.5)


@settings(max_examples=40, deadline=None)
@given(num_blocks=st.integers(2, 9), seed=st.integers(0, 10_000), data=st.data())
def test_optimal_matches_brute_force(num_blocks, seed, data):
    n = data.draw(st.integers(1, num_blocks - 1))
    _, span_nmi = random_span_nmi(num_blocks, seed)
    exact = optimal_select(num_blocks, n, span_nmi)
    brute = brute_force_select(num_blocks, n, span_nmi)
    assert len(exact.removed) == n
    assert exact.loss == pytest.approx(brute.loss, abs=1e-12)
    assert set_loss(exact.removed, span_nmi) == pytest.approx(exact.loss, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(num_blocks=st.integers(3, 14), seed=st.integers(0, 10_000), data=st.data())
def test_fast_block_select_is_valid_and_never_beats_the_optimum(num_blocks, seed, data):
    n = data.draw(st.integers(1, num_blocks - 1))
    block, span_nmi = random_span_nmi(num_blocks, seed)
    result = fast_block_select(block, span_nmi, n)
    assert len(result.removed) == n == len(set(result.removed))
    assert all(0 <= b < num_blocks for b in result.removed)
    optimum = optimal_select(num_blocks, n, span_nmi)
    assert result.loss >= optimum.loss - 1e-12
    # never worse than its starting point, and each accepted iteration strictly improved the set loss
    losses = [set_loss(p, span_nmi) for p in result.history]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert result.loss == pytest.approx(losses[-1])
    # the pool never grows: every chosen block is among the 2N (at most T) most redundant
    order = sorted(range(num_blocks), key=lambda i: (-block[i], i))
    assert set(result.removed) <= set(order[: n + min(n, num_blocks - n)])


def test_candidate_count_follows_the_paper():
    assert candidate_count(1, 5) == 5
    assert candidate_count(2, 5) == 5
    assert candidate_count(3, 5) == 6
    assert candidate_count(5, 5) == 6
    assert candidate_count(8, 5) == 7


def test_conflict_free_select_is_exact_and_avoids_overlap():
    candidates = [[(0, 1), (2, 3), (4, 5)], [(5, 6), (3, 4), (1, 2)]]
    scores = {(0, 1): 0.1, (2, 3): 0.9, (4, 5): 0.5, (5, 6): 0.2, (3, 4): 1.0, (1, 2): 0.3}
    chosen = conflict_free_select(candidates, lambda a, b: scores[(a, b)])
    # best pair without overlap: (2,3)+(5,6)=1.1, (4,5)+(1,2)=0.8, (0,1)+(3,4)=1.1 (ties break on the
    # sorted order of candidates), never (2,3)+(3,4) which overlaps.
    a, b = chosen
    assert a[1] < b[0] or b[1] < a[0]
    assert scores[a] + scores[b] == pytest.approx(1.1)


def test_worked_example_of_the_paper():
    """Llama-2-7B, T=32, N=5 (spec section 4): start {23,24,26,27,28}, end at the run 24..28 in two steps."""
    t = 32
    order = [27, 26, 24, 28, 23, 20, 21, 22, 25, 29]
    block = [0.50] * t
    for rank, b in enumerate(order):
        block[b] = 0.99 - 0.01 * rank

    evaluated: set[tuple[int, int]] = set()

    def span_nmi(a: int, b: int) -> float:
        evaluated.add((a, b))
        if a == b:
            return block[a]
        value = math.prod(block[a : b + 1])
        # the run 24..28 and its parts are jointly far more redundant than their blocks suggest
        if a >= 24 and b <= 28:
            value = 0.99 ** (b - a)
        return value

    result = fast_block_select(block, span_nmi, 5)
    assert result.removed == [24, 25, 26, 27, 28]
    assert result.history[0] == [23, 24, 26, 27, 28]
    assert result.history[1] == [24, 25, 26, 27, 28]
    assert result.stop_reason == "converged"
    assert result.iterations == 2
    # 5 + 6 windows in iteration 1, 6 in iteration 2: with the 32 single blocks, 49 MI evaluations
    # (the paper reports "about 48"), against 528 contiguous spans in all.
    assert len({s for s in evaluated if s[0] != s[1]}) == 17


@pytest.mark.parametrize("n", [0, 4, -1])
def test_too_many_or_too_few_blocks_is_an_error(n):
    message = rf"can remove between 1 and 3 of 4 blocks, not {n}$"
    with pytest.raises(InvalidOptionError, match=message):
        optimal_select(4, n, lambda a, b: 1.0)
    with pytest.raises(InvalidOptionError, match=message):
        fast_block_select([1.0] * 4, lambda a, b: 1.0, n)
    with pytest.raises(InvalidOptionError, match=message):
        brute_force_select(4, n, lambda a, b: 1.0)
    with pytest.raises(InvalidOptionError, match=message):
        check_n(4, n)
    check_n(4, 3)  # the bounds themselves are allowed
    check_n(4, 1)
