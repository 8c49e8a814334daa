"""The MI-PRUN methods: Fast-Block-Select on span mutual information, and the exact optimum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from miprun.errors import InvalidOptionError
from miprun.methods.base import REGISTRY, Choice, Evidence, Method
from miprun.methods.search import fast_block_select, optimal_select


@REGISTRY.register
@dataclass
class MiPrun(Method):
    """Fast-Block-Select (the paper's Algorithm 1) on span MI.

    Blocks are ranked by normalised MI (``rank="nmi"``): NMI divides out each state's MI with itself,
    so blocks at different depths compare on one scale; ``rank="mi"`` ranks by raw MI as the paper
    writes it (see docs/estimator-study.md for where the two orders differ).
    """

    name: ClassVar[str] = "mi-prun"
    summary: ClassVar[str] = "Fast-Block-Select on span mutual information (MI-PRUN)"
    uses_mi: ClassVar[bool] = True

    k: int = 5  # candidate surplus per group: floor(ln L) + k windows are scored exactly
    rank: Literal["nmi", "mi"] = "nmi"

    def __post_init__(self) -> None:
        if self.k < 0:
            raise InvalidOptionError(f"k must be at least 0, got {self.k}")
        if self.rank not in ("nmi", "mi"):
            raise InvalidOptionError(f"rank must be 'nmi' or 'mi', got {self.rank!r}")

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        table = evidence.mi_table(self.name)
        order = table.block_nmi() if self.rank == "nmi" else table.block_mi()
        sel = fast_block_select(order, table.span_nmi, n, k=self.k)
        return Choice(sel.removed, len(table.requested), sel.iterations, sel.stop_reason, sel.history)


@REGISTRY.register
@dataclass
class MiOptimal(Method):
    """The exact optimum of the MI set loss, by dynamic programming over every span."""

    name: ClassVar[str] = "mi-optimal"
    summary: ClassVar[str] = "exact optimum of the MI set loss"
    uses_mi: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        table = evidence.mi_table(self.name)
        sel = optimal_select(table.num_blocks, n, table.span_nmi)
        return Choice(sel.removed, len(table.requested), stop_reason=sel.stop_reason)
