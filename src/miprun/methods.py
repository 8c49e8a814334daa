"""Pruning methods by name: what evidence each reads, and one interface that turns it into a removal set.

Evidence comes in four kinds, all from the same calibration windows:

* ``mi``: the span MI table (:class:`~miprun.scores.ScoreTable`) from an estimator;
* ``cosine``: per-token cosine sums between states, taken in the same dense capture pass;
* ``model``: losses from forward passes of the model with blocks skipped (gathered by :func:`gather_evidence`);
* ``nothing``: the rule needs only the block count.

Whatever the method, :func:`run_method` also scores its choice by the MI set loss and reports the gap to
the exact optimum of that loss, so every method's plan is comparable.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from miprun import baselines as bl
from miprun.architectures import num_blocks
from miprun.baselines import BaselineScores
from miprun.plan import SearchInfo
from miprun.scores import ScoreTable
from miprun.selection import fast_block_select, optimal_select, set_loss

Need = Literal["mi", "cosine", "model", "nothing"]


@dataclass(frozen=True)
class Evidence:
    """Everything a method may read."""

    table: ScoreTable
    baselines: BaselineScores = field(default_factory=BaselineScores)
    k: int = 5  # Fast-Block-Select candidate surplus
    seed: int = 0  # for ``random``


@dataclass
class Choice:
    """The blocks a method chose and what it took: ``evaluations`` are span MI values, scores or forward passes."""

    removed: list[int]
    evaluations: int
    iterations: int = 0
    stop_reason: str = ""
    history: list[list[int]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # parameters and the scores the method ranked


GatherFn = Callable[[nn.Module, torch.Tensor, BaselineScores, int, int, bool], None]


@dataclass(frozen=True)
class Method:
    """A named pruning method: what it needs, how it chooses, and (for ``model``) how it gathers evidence."""

    name: str
    needs: Need
    summary: str
    choose: Callable[[Evidence, int], Choice]
    gather: GatherFn | None = None  # (model, windows, baselines, max_blocks, batch_size, progress)
    exact: bool = False  # its choice is the optimum of the MI set loss


class MissingEvidenceError(ValueError):
    """The scores at hand lack what a method needs (e.g. a scores file written for another method)."""


def _missing(method: str, what: str, hint: str = "") -> MissingEvidenceError:
    return MissingEvidenceError(
        f"method {method!r} needs {what}, which these scores do not hold. Run "
        f"`miprun score --method {method}{hint} --out FILE` and pass that file, or prune without --scores."
    )


# ----------------------------------------------------------------------------- MI methods


def _mi_prun(ev: Evidence, n: int) -> Choice:
    sel = fast_block_select(ev.table.block_nmi(), ev.table.span_nmi, n, k=ev.k)
    return Choice(
        sel.removed, len(ev.table.requested), sel.iterations, sel.stop_reason, sel.history, {"k": ev.k}
    )


def _mi_optimal(ev: Evidence, n: int) -> Choice:
    sel = optimal_select(ev.table.num_blocks, n, ev.table.span_nmi)
    return Choice(sel.removed, len(ev.table.requested), stop_reason=sel.stop_reason)


# ----------------------------------------------------------------------------- baselines


def _cosine(ev: Evidence, method: str) -> bl.CosineSums:
    if ev.baselines.cosine is None or ev.baselines.cosine.count == 0:
        raise _missing(method, "cosine statistics from the capture pass")
    return ev.baselines.cosine


def _shortgpt(ev: Evidence, n: int) -> Choice:
    influence = bl.block_influence(_cosine(ev, "shortgpt").mean_cos())
    removed = bl.shortgpt_select(influence, n)
    return Choice(removed, len(influence), stop_reason="lowest block influence", record={"scores": influence})


def _angular(ev: Evidence, n: int) -> Choice:
    angle = _cosine(ev, "angular").mean_angle()
    dist = bl.window_distances(angle, n)
    removed = bl.angular_select(angle, n)
    return Choice(removed, len(dist), stop_reason="smallest angular distance", record={"scores": dist})


def _sleb(ev: Evidence, n: int) -> Choice:
    path = ev.baselines.sleb
    if path is None or path.max_blocks < n:
        held = f" (it holds {path.max_blocks} steps)" if path is not None else ""
        raise _missing("sleb", f"the greedy SLEB path up to {n} blocks{held}", f" --max-blocks {n}")
    return Choice(
        path.removed(n),
        sum(path.forward_passes[:n]),
        iterations=n,
        stop_reason="greedy",
        history=[sorted(path.order[: i + 1]) for i in range(n)],
        record={
            "order": path.order[:n],
            "losses": path.losses[:n],
            "forward_seconds": round(sum(path.seconds[:n]), 4),
            "path_max_blocks": path.max_blocks,
        },
    )


def _ppl_oneshot(ev: Evidence, n: int) -> Choice:
    one = ev.baselines.oneshot
    if one is None:
        raise _missing("ppl-oneshot", "the calibration loss of the model without each block")
    record = {"scores": one.losses, "forward_seconds": one.seconds}
    return Choice(
        bl.lowest(one.losses, n), one.forward_passes, stop_reason="lowest one-shot loss", record=record
    )


def _last_n(ev: Evidence, n: int) -> Choice:
    return Choice(bl.last_n(ev.table.num_blocks, n), 0, stop_reason="deepest but the final block")


def _random(ev: Evidence, n: int) -> Choice:
    removed = bl.random_select(ev.table.num_blocks, n, ev.seed)
    return Choice(removed, 0, stop_reason="seeded uniform choice", record={"seed": ev.seed})


def _gather_sleb(
    model: nn.Module,
    windows: torch.Tensor,
    out: BaselineScores,
    max_blocks: int,
    batch_size: int,
    progress: bool,
) -> None:
    out.sleb = bl.sleb_path(model, windows, max_blocks, batch_size=batch_size, progress=progress)


def _gather_oneshot(
    model: nn.Module,
    windows: torch.Tensor,
    out: BaselineScores,
    _max_blocks: int,
    batch_size: int,
    progress: bool,
) -> None:
    out.oneshot = bl.ppl_oneshot_losses(model, windows, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mi-prun", "mi", "Fast-Block-Select on span mutual information (MI-PRUN)", _mi_prun),
        Method("mi-optimal", "mi", "exact optimum of the MI set loss", _mi_optimal, exact=True),
        Method("shortgpt", "cosine", "ShortGPT: N lowest block influence 1 - cos(in, out)", _shortgpt),
        Method("angular", "cosine", "Gromov et al.: contiguous N with least angular distance", _angular),
        Method("sleb", "model", "SLEB: greedy removal by calibration loss", _sleb, _gather_sleb),
        Method(
            "ppl-oneshot",
            "model",
            "Shortened LLaMA: N lowest one-block-removed PPL",
            _ppl_oneshot,
            _gather_oneshot,
        ),
        Method("last-n", "nothing", "the N deepest blocks except the final one", _last_n),
        Method("random", "nothing", "a seeded uniform choice of N blocks", _random),
    )
}
DEFAULT_METHOD = "mi-prun"
MAX_BLOCKS_FRACTION = 0.25  # default reach of N-dependent evidence (the SLEB path) in a scores file


def check_method(name: str) -> Method:
    """The method ``name``; an unknown name raises an error that suggests the closest and lists all."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def describe_methods() -> str:
    """One line per method, for help texts."""
    return "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())


def default_max_blocks(num_blocks: int) -> int:
    """How far N-dependent evidence reaches when not told: a quarter of the blocks, at least 1."""
    return min(num_blocks - 1, max(1, math.ceil(num_blocks * MAX_BLOCKS_FRACTION)))


def gather_evidence(
    method: str,
    model: nn.Module,
    windows: torch.Tensor,
    baselines: BaselineScores,
    max_blocks: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> bool:
    """Run the forward passes ``method`` needs (if any) into ``baselines``; returns whether it ran any.

    ``max_blocks`` is the largest N the evidence must serve (default :func:`default_max_blocks`).
    """
    spec = check_method(method)
    if spec.gather is None:
        return False
    reach = max_blocks if max_blocks is not None else default_max_blocks(num_blocks(model))
    spec.gather(model, windows, baselines, reach, batch_size, progress)
    return True


def run_method(
    table: ScoreTable,
    n: int,
    method: str = DEFAULT_METHOD,
    k: int = 5,
    *,
    baselines: BaselineScores | None = None,
    seed: int = 0,
) -> tuple[list[int], SearchInfo]:
    """Select ``n`` blocks with ``method``; also score the choice by the MI set loss and report the gap."""
    spec = check_method(method)
    table.reset_requests()
    start = time.perf_counter()
    choice = spec.choose(Evidence(table, baselines or BaselineScores(), k, seed), n)
    seconds = time.perf_counter() - start
    loss = set_loss(choice.removed, table.span_nmi)
    # The optimum is a diagnostic (it reads every span), timed apart from the method itself.
    start = time.perf_counter()
    optimum = optimal_select(table.num_blocks, n, table.span_nmi) if not spec.exact else None
    optimum_seconds = time.perf_counter() - start
    optimal_removed, optimal_loss = (
        (optimum.removed, optimum.loss) if optimum is not None else (choice.removed, loss)
    )
    info = SearchInfo(
        method=method,
        num_evaluations=choice.evaluations,
        loss=loss,
        optimal_loss=optimal_loss,
        optimal_removed=optimal_removed,
        gap=loss - optimal_loss,
        iterations=choice.iterations,
        stop_reason=choice.stop_reason,
        history=choice.history,
        params=choice.record,
        seconds=round(seconds, 4),
        optimum_seconds=round(optimum_seconds, 4),
    )
    return choice.removed, info
