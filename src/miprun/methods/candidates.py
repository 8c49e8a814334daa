"""Candidate removal sets proposed by span MI: the K best sets by the MI set loss, and their neighbours.

Pure functions over ``span_nmi(a, b)`` like :mod:`miprun.methods.search`: they rank thousands of sets in
milliseconds, so the model only has to measure the few they propose.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from miprun.methods.search import SpanNMI, check_n, runs, set_loss

Runs = tuple[tuple[int, int], ...]


def k_best_sets(num_blocks: int, n: int, span_nmi: SpanNMI, k: int) -> list[tuple[float, list[int]]]:
    """The ``k`` removal sets of ``n`` blocks with the lowest MI set loss, best first, with their losses.

    The exact optimum's dynamic program over (position, blocks removed), keeping the ``k`` best partial
    solutions per state instead of one: O(T^2 N k log k) time.
    """
    check_n(num_blocks, n)
    # best[(i, r)]: up to k (cost, runs) over blocks 0..i-1 with r removed and block i-1 kept (or i == 0)
    best: dict[tuple[int, int], list[tuple[float, Runs]]] = {(0, 0): [(0.0, ())]}
    finished: list[tuple[float, Runs]] = []
    for i in range(num_blocks):
        for r in range(n + 1):
            entries = best.get((i, r))
            if not entries:
                continue
            _push(best, (i + 1, r), entries, k)  # keep block i
            for j in range(i, min(num_blocks, i + n - r)):  # remove the run [i..j]
                r2 = r + j - i + 1
                cost = 1.0 - span_nmi(i, j)
                grown = [(c + cost, (*path, (i, j))) for c, path in entries]
                if j == num_blocks - 1:
                    if r2 == n:
                        finished.extend(grown)
                else:
                    _push(best, (j + 2, r2), grown, k)
    finished.extend(best.get((num_blocks, n), []))
    top = heapq.nsmallest(k, finished, key=lambda e: (e[0], e[1]))
    return [(cost, [b for a, last in path for b in range(a, last + 1)]) for cost, path in top]


def _push(best: dict, key: tuple[int, int], entries: list, k: int) -> None:
    best[key] = heapq.nsmallest(k, [*best.get(key, []), *entries], key=lambda e: (e[0], e[1]))


def shifted(removed: Iterable[int], num_blocks: int) -> list[list[int]]:
    """The sets one block away: each maximal run moved one block left or right (same size, in range)."""
    found = []
    base = sorted(removed)
    for a, b in runs(base):
        for delta in (-1, 1):
            if a + delta >= 0 and b + delta < num_blocks:
                moved = sorted({*[x for x in base if not a <= x <= b], *range(a + delta, b + delta + 1)})
                if len(moved) == len(base) and moved != base:
                    found.append(moved)
    return found


def propose(
    num_blocks: int, n: int, span_nmi: SpanNMI, count: int, seeds: Iterable[list[int]] = ()
) -> list[list[int]]:
    """The distinct sets to measure, in this order: ``seeds`` (e.g. Fast-Block-Select's choice), then the
    ``count`` best sets by MI set loss, then the sets one block away from the best ``max(1, count // 4)`` of
    those (each run moved left or right) that are not already listed, in order of MI set loss.

    Nothing is capped: the shortlist holds every seed, all ``count`` best sets, and their neighbours.
    """
    best = [s for _, s in k_best_sets(num_blocks, n, span_nmi, max(count, 1))]
    listed = [tuple(sorted(s)) for s in seeds] + [tuple(s) for s in best]
    near = {tuple(m) for s in best[: max(1, count // 4)] for m in shifted(s, num_blocks)} - set(listed)
    ordered = listed + sorted(near, key=lambda key: (set_loss(key, span_nmi), key))
    return [list(s) for s in dict.fromkeys(ordered)]
