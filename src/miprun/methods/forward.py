"""Methods that measure the model itself with blocks skipped: SLEB and one-shot perplexity.

* ``sleb`` (Song et al. 2024): greedily remove the block whose removal, with those already removed, raises
  the calibration loss least; re-evaluated after every removal.
* ``ppl-oneshot`` (Kim et al. 2024, Shortened LLaMA): remove the N blocks whose removal alone raises the
  calibration perplexity least.

Calibration loss is the mean next-token NLL (nats) over the calibration windows
(:func:`~miprun.model.perplexity.mean_nll`); blocks are skipped in place with
:func:`~miprun.model.surgery.skip_blocks`, so no model is ever copied.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.errors import ScoresError
from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext, Method
from miprun.methods.search import check_n
from miprun.methods.similarity import lowest
from miprun.model.layouts import num_blocks
from miprun.model.perplexity import mean_nll
from miprun.model.surgery import skip_blocks
from miprun.ranking import check_chosen, rank

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- model-driven scores


def calibration_loss(
    model: nn.Module, windows: torch.Tensor, removed: Sequence[int] = (), *, batch_size: int = 4
) -> float:
    """Mean next-token NLL (nats) on ``windows`` ``(num_windows, seq_len)`` with blocks ``removed`` skipped."""
    with skip_blocks(model, removed):
        return mean_nll(model, windows, batch_size=batch_size)[0]


@dataclass
class OneShotLosses:
    """Calibration loss with each block alone removed (``losses[i]``), and what computing it cost."""

    losses: list[float]
    forward_passes: int  # passes over all calibration windows
    seconds: float

    def columns(self, key: str) -> dict[str, list[float]]:
        """Per-block values for ``miprun score``'s table."""
        return {"loss without it": self.losses}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OneShotLosses:
        return cls(**data)._checked()

    def _checked(self) -> OneShotLosses:
        finite_losses(self.losses, "one-shot")
        return self


@dataclass
class SlebPath:
    """SLEB's greedy removal order and the calibration loss after each step; any N <= len(order) reads a prefix."""

    order: list[int]  # block removed at step 1, 2, ...
    losses: list[float]  # calibration loss after each step
    forward_passes: list[int] = field(default_factory=list)  # passes over the windows spent at each step
    seconds: list[float] = field(default_factory=list)  # time of each step

    @property
    def max_blocks(self) -> int:
        return len(self.order)

    def removed(self, n: int) -> list[int]:
        """The blocks SLEB removes for a budget of ``n`` (the first ``n`` steps)."""
        if not 0 < n <= self.max_blocks:
            raise evidence_too_short(self.max_blocks, n)
        return sorted(self.order[:n])

    def notes(self, key: str) -> list[str]:
        """Lines for ``miprun score`` below its table."""
        return [f"SLEB greedy order: {self.order} (losses {[round(x, 4) for x in self.losses]})"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlebPath:
        path = cls(**data)
        finite_losses(path.losses, "SLEB")
        return path


def finite_losses(losses: Sequence[float], what: str) -> None:
    """Refuse evidence with NaN/Inf losses: a non-finite number must never pick blocks."""
    if any(not math.isfinite(float(x)) for x in losses):
        raise ScoresError(f"the {what} losses in the scores are not finite: {list(losses)}")


def ppl_oneshot_losses(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False
) -> OneShotLosses:
    """Shortened LLaMA's PPL criterion: the calibration loss of the model without block ``i``, for every ``i``."""
    total = num_blocks(model)
    start = time.perf_counter()
    losses = [
        calibration_loss(model, windows, [i], batch_size=batch_size)
        for i in tqdm(range(total), desc="ppl one-shot", unit="block", disable=not progress)
    ]
    return OneShotLosses(losses, total, round(time.perf_counter() - start, 4))


def sleb_path(
    model: nn.Module,
    windows: torch.Tensor,
    max_blocks: int,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> SlebPath:
    """SLEB: remove ``max_blocks`` blocks one at a time, each the one whose extra removal hurts loss least.

    Step ``k`` evaluates every remaining block (``T - k + 1`` passes over the windows). The path for
    ``max_blocks`` holds the answer for every smaller N as a prefix, so one run serves them all.
    """
    total = num_blocks(model)
    check_n(total, max_blocks)
    path = SlebPath(order=[], losses=[])
    passes = sum(total - k for k in range(max_blocks))
    bar = tqdm(total=passes, desc="sleb", unit="pass", disable=not progress)
    for _ in range(max_blocks):
        start = time.perf_counter()
        candidates = [b for b in range(total) if b not in path.order]
        trial: dict[int, float] = {}
        for b in candidates:
            trial[b] = calibration_loss(model, windows, [*path.order, b], batch_size=batch_size)
            bar.update()
        best = min(candidates, key=lambda b: (rank(trial[b]), b))  # a NaN loss never wins
        check_chosen([trial[best]], f"sleb step {len(path.order) + 1}: the calibration loss")
        path.order.append(best)
        path.losses.append(trial[best])
        path.forward_passes.append(len(candidates))
        path.seconds.append(round(time.perf_counter() - start, 4))
        log.info("sleb step %d: remove block %d (calibration loss %.4f)", len(path.order), best, trial[best])
    bar.close()
    return path


def sleb_passes(total: int, n: int, head: float) -> float:
    """What SLEB's path to ``n`` of ``total`` blocks costs in full-model passes over its windows, counted by the
    decoder layers each candidate runs: step ``k`` runs ``total - k`` candidates of ``total - k - 1`` layers
    each, and the output layer (``head`` decoder layers' worth, :func:`~miprun.capture.replay.head_layers`) on
    every position."""
    return sum((total - k) * (total - k - 1 + head) for k in range(n)) / total


# ----------------------------------------------------------------------------- methods


@REGISTRY.register
@dataclass
class Sleb(Method):
    name: ClassVar[str] = "sleb"
    summary: ClassVar[str] = "SLEB: greedy removal by calibration loss"
    evidence_types: ClassVar[dict[str, type]] = {"sleb": SlebPath}
    n_dependent: ClassVar[bool] = True
    reference: ClassVar[str] = "SLEB"  # the comparison report's yardstick for methods that measure

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        path = sleb_path(
            ctx.model, ctx.windows, ctx.max_blocks, batch_size=ctx.batch_size, progress=ctx.progress
        )
        return {"sleb": path}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        path: SlebPath = evidence.require("sleb", self.name, f" --max-blocks {n}")
        if path.max_blocks < n:
            raise evidence_too_short(path.max_blocks, n)
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


def evidence_too_short(held: int, n: int) -> Exception:
    from miprun.methods.base import missing

    return missing(
        "sleb", f"the greedy SLEB path up to {n} blocks (it holds {held} steps)", f" --max-blocks {n}"
    )


@REGISTRY.register
@dataclass
class PplOneshot(Method):
    name: ClassVar[str] = "ppl-oneshot"
    summary: ClassVar[str] = "Shortened LLaMA: N lowest one-block-removed PPL"
    evidence_types: ClassVar[dict[str, type]] = {"oneshot": OneShotLosses}

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        return {
            "oneshot": ppl_oneshot_losses(
                ctx.model, ctx.windows, batch_size=ctx.batch_size, progress=ctx.progress
            )
        }

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        one: OneShotLosses = evidence.require("oneshot", self.name)
        record = {"scores": one.losses, "forward_seconds": one.seconds}
        return Choice(
            lowest(one.losses, n), one.forward_passes, stop_reason="lowest one-shot loss", record=record
        )
