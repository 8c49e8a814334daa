"""Searching for the blocks to remove, from normalised span scores alone (spec sections 4 and 5).

Every function here is pure: it sees blocks only through ``span_nmi(a, b)``, the normalised MI in
[0, 1] between the input of block ``a`` and the output of block ``b`` (``a <= b``), where 1 means the
span passes its input through unchanged (fully redundant).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from miprun.errors import InvalidOptionError

SpanNMI = Callable[[int, int], float]


def runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs ``(first, last)`` of a set of block indices, in order."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if out and b == out[-1][1] + 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def finite(value: float) -> float:
    """``value`` for ranking: NaN and infinities rank last, so a broken measurement never wins."""
    return value if math.isfinite(value) else math.inf


def set_loss(blocks: Iterable[int], span_nmi: SpanNMI) -> float:
    """Information lost by removing ``blocks``: sum over maximal runs of ``1 - NMI(run)`` (spec 5.1)."""
    return sum(1.0 - span_nmi(a, b) for a, b in runs(blocks))


@dataclass
class Selection:
    """A chosen removal set and how the search got there."""

    removed: list[int]
    loss: float
    iterations: int = 0
    stop_reason: str = ""
    history: list[list[int]] = field(default_factory=list)


# ----------------------------------------------------------------------------- exact optimum


def optimal_select(num_blocks: int, n: int, span_nmi: SpanNMI) -> Selection:
    """The removal set of ``n`` blocks with the lowest :func:`set_loss`, by dynamic programming.

    ``best[i][r]``: lowest loss over blocks ``0..i-1`` with ``r`` removed, block ``i-1`` kept (or ``i == 0``).
    A removed run ``[i..j]`` is followed by a kept block ``j+1`` or ends the model. O(T^2 N) time, and it
    reads every contiguous span once.
    """
    check_n(num_blocks, n)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(num_blocks + 2)]
    back: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    best[0][0] = 0.0
    answer, answer_from = inf, None
    for i in range(num_blocks + 1):
        for r in range(n + 1):
            cur = best[i][r]
            if cur == inf or i == num_blocks:
                continue
            # keep block i
            if cur < best[i + 1][r]:
                best[i + 1][r], back[(i + 1, r)] = cur, (i, r, None)
            # remove the run [i..j]
            for j in range(i, min(num_blocks, i + n - r)):
                r2 = r + j - i + 1
                cost = cur + 1.0 - span_nmi(i, j)
                if j == num_blocks - 1:
                    if r2 == n and cost < answer:
                        answer, answer_from = cost, (i, r, j)
                elif cost < best[j + 2][r2]:
                    best[j + 2][r2], back[(j + 2, r2)] = cost, (i, r, j)
    if best[num_blocks][n] <= answer:
        answer, state = best[num_blocks][n], (num_blocks, n)
        removed: list[int] = []
    else:
        assert answer_from is not None
        i, r, j = answer_from
        removed, state = list(range(i, j + 1)), (i, r)
    while state != (0, 0):
        i, r, last = back[state]
        if last is not None:
            removed.extend(range(i, last + 1))
        state = (i, r)
    return Selection(sorted(removed), answer, stop_reason="exact")


def brute_force_select(num_blocks: int, n: int, span_nmi: SpanNMI) -> Selection:
    """The optimum by enumerating every subset: for tests on small ``num_blocks`` only."""
    check_n(num_blocks, n)
    best = min(itertools.combinations(range(num_blocks), n), key=lambda s: (set_loss(s, span_nmi), s))
    return Selection(list(best), set_loss(best, span_nmi), stop_reason="exhaustive")


# ----------------------------------------------------------------------------- Fast-Block-Select


def candidate_count(length: int, k: int) -> int:
    """How many windows a group of ``length`` keeps for exact scoring: ``floor(ln L) + k``."""
    return math.floor(math.log(length)) + k


def _windows(length: int, pool: set[int], proxy: Sequence[float], keep: int) -> list[tuple[int, int]]:
    """The ``keep`` contiguous windows of ``length`` inside ``pool`` with the lowest summed importance."""
    starts = [a for a in sorted(pool) if all(b in pool for b in range(a, a + length))]
    ranked = sorted(starts, key=lambda a: (sum(proxy[a : a + length]), a))
    return [(a, a + length - 1) for a in ranked[:keep]]


def conflict_free_select(
    candidates: Sequence[Sequence[tuple[int, int]]],
    score: Callable[[int, int], float],
    max_nodes: int = 200_000,
) -> list[tuple[int, int]]:
    """One window per group, pairwise non-overlapping, with the highest summed ``score``.

    Exact branch and bound over the tiny per-group lists; the first candidate of every group must form
    a feasible assignment (the caller puts each group's current window first), so the result is never
    worse than it. ``max_nodes`` bounds the search on pathological inputs (the best found so far wins).
    """
    order = sorted(range(len(candidates)), key=lambda g: len(candidates[g]))
    scored = [sorted(((score(*w), w) for w in candidates[g]), key=lambda t: (-t[0], t[1])) for g in order]
    best_rest = [0.0] * (len(order) + 1)
    for pos in range(len(order) - 1, -1, -1):
        best_rest[pos] = best_rest[pos + 1] + scored[pos][0][0]
    initial = [candidates[g][0] for g in order]
    best_value, best_choice = sum(score(*w) for w in initial), initial
    nodes = 0

    def search(pos: int, used: list[tuple[int, int]], value: float) -> None:
        nonlocal best_value, best_choice, nodes
        nodes += 1
        if nodes > max_nodes or value + best_rest[pos] <= best_value + 1e-12:
            return
        if pos == len(order):
            best_value, best_choice = value, list(used)
            return
        for s, (a, b) in scored[pos]:
            if all(b < c or a > d for c, d in used):
                used.append((a, b))
                search(pos + 1, used, value + s)
                used.pop()

    search(0, [], 0.0)
    chosen = [(0, 0)] * len(order)
    for pos, g in enumerate(order):
        chosen[g] = best_choice[pos]
    return chosen


def fast_block_select(
    block_nmi: Sequence[float], span_nmi: SpanNMI, n: int, k: int = 5, max_iterations: int = 50
) -> Selection:
    """Fast-Block-Select (Algorithm 1 of MI-PRUN, with the decisions of spec section 5).

    Start from the ``n`` most redundant blocks ``P`` plus a pool ``A`` of the next ``min(n, T-n)``; then
    repeatedly re-place each contiguous group of ``P`` on the best window of the same length inside the
    fixed pool ``P u A``, scoring windows by exact span NMI. Stop when ``P`` is unchanged, would get worse
    by :func:`set_loss`, repeats, or after ``max_iterations``.
    """
    num_blocks = len(block_nmi)
    check_n(num_blocks, n)
    importance = [-v for v in block_nmi]  # spec: importance = -MI; ascending = most redundant first
    order = sorted(range(num_blocks), key=lambda i: (importance[i], i))
    current = sorted(order[:n])
    pool = set(order[: n + min(n, num_blocks - n)])
    loss = set_loss(current, span_nmi)
    seen = {tuple(current)}
    history = [current]
    for iteration in range(1, max_iterations + 1):
        groups = runs(current)
        candidates = []
        for a, b in groups:
            length = b - a + 1
            windows = _windows(length, pool, importance, candidate_count(length, k))
            candidates.append([(a, b)] + [w for w in windows if w != (a, b)])
        chosen = conflict_free_select(candidates, span_nmi)
        proposal = sorted(i for a, b in chosen for i in range(a, b + 1))
        if proposal == current:
            return Selection(current, loss, iteration, "converged", history)
        new_loss = set_loss(proposal, span_nmi)
        if new_loss >= loss - 1e-12:
            return Selection(current, loss, iteration, "no improvement by set loss", history)
        if tuple(proposal) in seen:
            return Selection(current, loss, iteration, "cycle", history)
        current, loss = proposal, new_loss
        seen.add(tuple(current))
        history.append(current)
    return Selection(current, loss, max_iterations, "iteration cap", history)


def check_n(num_blocks: int, n: int) -> None:
    """Raise unless ``0 < n < num_blocks``: at least one block removed, at least one kept."""
    if not 0 < n < num_blocks:
        raise InvalidOptionError(f"can remove between 1 and {num_blocks - 1} of {num_blocks} blocks, not {n}")
