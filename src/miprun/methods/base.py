"""What a pruning method is: what it reads, how it gathers it, and how it turns it into a removal set.

A method declares the statistics the calibration pass must record for it (:meth:`Method.statistics`),
whether it reads the MI span table (:attr:`Method.uses_mi`), and what else it measures itself
(:meth:`Method.gather`, e.g. SLEB's forward passes). Scoring asks every method the same questions and
never branches on names, so a baseline pays only for what it reads. Whatever the method, :func:`run`
also scores its choice by the MI set loss when an MI table is at hand, so plans stay comparable.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.errors import MissingEvidenceError
from miprun.estimators.table import ScoreTable
from miprun.methods.search import optimal_select, set_loss
from miprun.registry import Registry
from miprun.scores.evidence import EVIDENCE_TYPES


@dataclass
class GatherContext:
    """What a method may use to measure its own evidence: the model, the windows and the capture."""

    model: nn.Module
    windows: torch.Tensor  # (num_windows, seq_len) calibration token ids
    stats: CapturedStats | None = None  # None for live evidence (attached after the scores exist)
    batch_size: int = 4
    max_blocks: int = 1  # the largest N the evidence must serve
    progress: bool = False
    repair: Any = None  # a pipeline.RepairHook, when candidates are to be measured after the run's repair


@dataclass
class Evidence:
    """Everything methods read: the MI span table (when an estimator ran) and each method's own evidence."""

    num_blocks: int
    table: ScoreTable | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # evidence key -> object with to_json()

    def require(self, key: str, method: str, hint: str = "") -> Any:
        """Evidence ``key`` or an error saying how to produce a scores file that holds it."""
        if key not in self.extras:
            raise missing(method, f"its {key} evidence", hint)
        return self.extras[key]

    def mi_table(self, method: str) -> ScoreTable:
        if self.table is None:
            raise missing(method, "MI span scores")
        return self.table


def missing(method: str, what: str, hint: str = "") -> MissingEvidenceError:
    return MissingEvidenceError(
        f"method {method!r} needs {what}, which these scores do not hold. Run "
        f"`miprun score --method {method}{hint} --json FILE` and pass that file, or prune without --scores."
    )


@dataclass
class Choice:
    """The blocks a method chose and what it took: ``evaluations`` are span scores, scores read or passes."""

    removed: list[int]
    evaluations: int
    iterations: int = 0
    stop_reason: str = ""
    history: list[list[int]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # parameters and the scores the method ranked


@dataclass
class SearchInfo:
    """How the selection went, and how far it lands from the exact optimum of the MI set objective."""

    method: str
    num_evaluations: int  # span MI values (single blocks included), scores read, or forward passes
    loss: float | None = None  # MI set loss (spec 5.1) of the chosen blocks; None without an MI table
    optimal_loss: float | None = None
    optimal_removed: list[int] | None = None
    gap: float | None = None  # loss - optimal_loss (>= 0)
    iterations: int = 0
    stop_reason: str = ""
    history: list[list[int]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the method's own time, including the span MI it computed
    optimum_seconds: float = 0.0  # time to compute the optimum for comparison (every span)


@dataclass
class Method(ABC):
    """A named pruning method; subclasses are dataclasses whose fields are its hyperparameters."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_mi: ClassVar[bool] = False  # reads the MI span table, so the estimator's statistics are captured
    exact: ClassVar[bool] = False  # its choice is the optimum of the MI set loss
    # What gather() adds to Evidence.extras, by key, with the class a scores file reads it back with
    # (to_json/from_json); ``evidence_keys`` is derived from it.
    evidence_types: ClassVar[dict[str, type]] = {}
    evidence_keys: ClassVar[tuple[str, ...]] = ()
    n_dependent: ClassVar[bool] = False  # its evidence serves only N up to the max_blocks it was gathered for
    live_keys: ClassVar[tuple[str, ...]] = ()  # evidence that runs the model at choice time (never cached)
    compared_by_default: ClassVar[bool] = True  # `miprun compare` without --methods runs it
    # Non-empty for the measured reference of the comparison report: the methods with live evidence are set
    # against its rows (same N, same repair) under this display name.
    reference: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "evidence_types" in cls.__dict__:
            cls.evidence_keys = tuple(cls.evidence_types)
            for key, evidence in cls.evidence_types.items():  # so a scores file reads it back
                EVIDENCE_TYPES.add(key, evidence)

    @classmethod
    def example(cls) -> Method:
        """A small instance for the registry-wide contract tests (tests/test_contracts.py) on a tiny model:
        the defaults, unless a plugin's defaults need more than a tiny model holds."""
        return cls()

    def statistics(self) -> list[Statistic]:
        """What the capture pass must record for this method (besides the estimator's, for MI methods)."""
        return []

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        """Evidence this method measures or derives itself, by key (forward passes, cosine matrices)."""
        return {}

    def attach(self, ctx: GatherContext) -> dict[str, Any]:
        """Live evidence (it keeps the model to measure with at choice time): attached to every run, cached
        or not, and never written to a scores file."""
        return {}

    @abstractmethod
    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        """The ``n`` blocks to remove (``seed`` drives seeded methods)."""

    def params(self) -> dict[str, Any]:
        return asdict(self)


def run(method: Method, evidence: Evidence, n: int, seed: int = 0) -> tuple[list[int], SearchInfo]:
    """Select ``n`` blocks with ``method``; with an MI table, also score the choice and report the gap."""
    table = evidence.table
    if table is not None:
        table.reset_requests()
    start = time.perf_counter()
    choice = method.choose(evidence, n, seed)
    seconds = time.perf_counter() - start
    info = SearchInfo(
        method=method.name,
        num_evaluations=choice.evaluations,
        iterations=choice.iterations,
        stop_reason=choice.stop_reason,
        history=choice.history,
        params={**method.params(), **choice.record},
        seconds=round(seconds, 4),
    )
    if table is not None:
        info.loss = set_loss(choice.removed, table.span_nmi)
        # The optimum is a diagnostic (it reads every span), timed apart from the method itself.
        start = time.perf_counter()
        optimum = optimal_select(table.num_blocks, n, table.span_nmi) if not method.exact else None
        info.optimum_seconds = round(time.perf_counter() - start, 4)
        info.optimal_removed = optimum.removed if optimum is not None else choice.removed
        info.optimal_loss = optimum.loss if optimum is not None else info.loss
        info.gap = info.loss - info.optimal_loss
    return choice.removed, info


# Every method by name: a class registers itself with ``@REGISTRY.register`` (its ``name`` is the key).
REGISTRY: Registry[type[Method]] = Registry("method")
