"""``mi-search``'s local search: swap one removed block for a kept one while the measurement falls, the trials
ranked on the probe and the best few measured on the screen, each round only where the budget affords it."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import combinations
from typing import Any

from miprun.methods.ledger import dearest_first
from miprun.methods.verified import Verifier


def swap_search(
    verifier: Verifier,
    probe: Verifier,
    current: list[int],
    value: float,
    prior: dict[int, float],
    pool: dict[tuple[int, ...], float],
    total: int,
    width: int,
    finalists: int,
    rounds: int,
    affordable: Callable[[list[list[int]], list[list[int]]], bool] = lambda probed, screened: True,
) -> list[dict[str, Any]]:
    """Local search from the best set so far, at most ``rounds`` rounds: each ranks, on ``probe``, the set with
    each removed block put back, then swaps the two whose return helps most for the ``width`` kept blocks the
    greedy measured best (``prior``) and the kept blocks beside the set's runs; the ``finalists`` best swaps by
    the probe are measured by ``verifier``, and the best is taken while it lowers the measurement. Every set
    the verifier measures joins ``pool``; returns one record per round. A round runs only where
    ``affordable(probe's sets, verifier's sets)`` says its measurements fit the budget (the last record then
    says so)."""
    records: list[dict[str, Any]] = []
    probed: dict[tuple[int, ...], float] = {}
    ranking = probe is not verifier  # the probe ranks the trials; the verifier measures the best few

    def plan(
        current: list[int], give_back: list[int]
    ) -> tuple[list[tuple[int, ...]], list[list[int]], list[list[int]]]:
        """A round's trials: each of ``give_back`` swapped for the ``width`` kept blocks the greedy measured
        best and the kept blocks beside the set's runs; with what the probe would rank (the trials it has
        not seen) and what the verifier would measure (the dearest, where the probe picks them)."""
        kept = [b for b in range(total) if b not in current]
        best_kept = sorted(kept, key=lambda b: (prior.get(b, math.inf), b))[:width]
        beside = [b for b in kept if b - 1 in current or b + 1 in current]
        adds = list(dict.fromkeys([*best_kept, *beside]))
        trials = list(dict.fromkeys(tuple(sorted({*current, k} - {r})) for r in give_back for k in adds))
        unseen = [list(t) for t in trials if t not in pool and t not in probed] if ranking else []
        dearest = dearest_first([list(t) for t in trials if t not in pool])
        return trials, unseen, dearest[:finalists] if ranking else dearest

    for _ in range(rounds):
        back = [sorted(set(current) - {r}) for r in current]
        if len(current) <= 2:  # both go back: nothing to rank
            give_back = list(current)
        else:
            # the ranking is paid for only where the cheapest round it could lead to fits
            if not any(
                affordable([*back, *unseen], screened)
                for _, unseen, screened in (plan(current, list(pair)) for pair in combinations(current, 2))
            ):
                records.append({"from": current, "stopped": "budget"})
                break
            back_values = probe.measure(back, repaired=False)
            give_back = [
                current[i] for i in sorted(range(len(current)), key=lambda i: (back_values[i], i))[:2]
            ]
        trials, unseen, screened = plan(current, give_back)
        if not trials:
            break
        if not affordable(unseen, screened):
            records.append({"from": current, "stopped": "budget"})
            break
        ranked_only = 0
        if ranking:
            probed.update(zip(map(tuple, unseen), probe.measure(unseen, repaired=False), strict=True))
            ranked_only = len(unseen)
            ahead = sorted((t for t in trials if t not in pool), key=lambda t: (probed[t], t))
            trials = [*ahead[:finalists], *(t for t in trials if t in pool)]
        new = [t for t in trials if t not in pool]  # a set measured before keeps its value
        pool.update(zip(new, verifier.measure([list(t) for t in new], repaired=False), strict=True))
        best = min(trials, key=lambda t: (pool[t], t))
        records.append(
            {
                "from": current,
                "probed": ranked_only,
                "tried": len(new),
                "best": list(best),
                "measured": pool[best],
            }
        )
        if not pool[best] < value:
            break
        current, value = list(best), pool[best]
    return records
