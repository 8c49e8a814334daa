"""Selection methods by name: each turns a score table and a block budget into a :class:`SearchInfo`."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable

from miprun.plan import SearchInfo
from miprun.scores import ScoreTable
from miprun.selection import Selection, fast_block_select, optimal_select

MethodFn = Callable[[ScoreTable, int, int], Selection]


def _mi_prun(table: ScoreTable, n: int, k: int) -> Selection:
    return fast_block_select(table.block_nmi(), table.span_nmi, n, k=k)


def _mi_optimal(table: ScoreTable, n: int, k: int) -> Selection:
    return optimal_select(table.num_blocks, n, table.span_nmi)


METHODS: dict[str, MethodFn] = {"mi-prun": _mi_prun, "mi-optimal": _mi_optimal}
DEFAULT_METHOD = "mi-prun"


def check_method(name: str) -> None:
    """Raise a helpful error for an unknown method name."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(METHODS))}.")


def run_method(
    table: ScoreTable, n: int, method: str = DEFAULT_METHOD, k: int = 5
) -> tuple[list[int], SearchInfo]:
    """Select ``n`` blocks with ``method``; also report the exact optimum of the set loss and the gap."""
    check_method(method)
    table.reset_requests()
    start = time.perf_counter()
    chosen = METHODS[method](table, n, k)
    seconds = time.perf_counter() - start
    evaluations = len(table.requested)
    # The optimum is a diagnostic (it reads every span), timed apart from the method itself.
    start = time.perf_counter()
    optimum = chosen if method == "mi-optimal" else optimal_select(table.num_blocks, n, table.span_nmi)
    optimum_seconds = time.perf_counter() - start
    info = SearchInfo(
        method=method,
        num_evaluations=evaluations,
        loss=chosen.loss,
        optimal_loss=optimum.loss,
        optimal_removed=optimum.removed,
        gap=chosen.loss - optimum.loss,
        iterations=chosen.iterations,
        stop_reason=chosen.stop_reason,
        history=chosen.history,
        params={"k": k} if method == "mi-prun" else {},
        seconds=round(seconds, 4),
        optimum_seconds=round(optimum_seconds, 4),
    )
    return chosen.removed, info
