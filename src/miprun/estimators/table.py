"""The span MI table: estimator outputs for blocks and spans, memoised, counted, and serialisable for reuse.

Block ``i`` is the span ``(i, i)``; span ``(a, b)`` compares state ``a`` (input of block ``a``) with
state ``b + 1`` (output of block ``b``), all from the one dense capture pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from miprun.capture.statistic import CapturedStats
from miprun.errors import ScoresError
from miprun.estimators.base import Estimator


@dataclass
class SpanScore:
    """One span's MI (nats) and normalised MI in [0, 1]."""

    mi: float
    nmi: float


@dataclass
class ScoreTable:
    """Scores of spans ``(a, b)``, either computed on demand from statistics or loaded from a file.

    ``requested`` records the distinct spans a selection algorithm asked for, so each method can report
    how many MI evaluations it needed, whether or not they were already cached.
    """

    num_blocks: int
    spans: dict[tuple[int, int], SpanScore] = field(default_factory=dict)
    estimator: Estimator | None = None
    stats: CapturedStats | None = None
    requested: set[tuple[int, int]] = field(default_factory=set)
    _self_mi: dict[int, float] = field(default_factory=dict, repr=False)  # MI(state s ; state s)

    def span(self, a: int, b: int) -> SpanScore:
        """The score of blocks ``a..b`` (inclusive), computing it if needed."""
        if not 0 <= a <= b < self.num_blocks:
            raise IndexError(f"span ({a}, {b}) outside blocks 0..{self.num_blocks - 1}")
        self.requested.add((a, b))
        if (a, b) not in self.spans:
            if self.estimator is None or self.stats is None:
                raise KeyError(f"span ({a}, {b}) is not in the loaded scores and no statistics are available")
            mi = self.estimator.mi(self.stats, a, b + 1)
            nmi = self.estimator.normalise(mi, self._state_mi(a), self._state_mi(b + 1))
            self.spans[(a, b)] = SpanScore(mi, nmi)
        return self.spans[(a, b)]

    def _state_mi(self, s: int) -> float:
        if s not in self._self_mi:
            assert self.estimator is not None and self.stats is not None
            self._self_mi[s] = self.estimator.mi(self.stats, s, s)
        return self._self_mi[s]

    def span_nmi(self, a: int, b: int) -> float:
        return self.span(a, b).nmi

    def block_nmi(self) -> list[float]:
        return [self.span(i, i).nmi for i in range(self.num_blocks)]

    def block_mi(self) -> list[float]:
        return [self.span(i, i).mi for i in range(self.num_blocks)]

    def fill_all(self, progress: bool = False) -> None:
        """Compute every contiguous span (what ``mi-optimal`` and a reusable scores file need)."""
        pairs = [(a, b) for a in range(self.num_blocks) for b in range(a, self.num_blocks)]
        for a, b in tqdm(pairs, desc="span MI", unit="span", disable=not progress):
            if (a, b) not in self.spans:
                self.span(a, b)
                self.requested.discard((a, b))

    def reset_requests(self) -> None:
        self.requested.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "blocks": [{"block": i, "mi": s.mi, "nmi": s.nmi} for i, s in self._blocks()],
            "spans": [
                {"first": a, "last": b, "mi": s.mi, "nmi": s.nmi} for (a, b), s in sorted(self.spans.items())
            ],
        }

    @property
    def complete(self) -> bool:
        """Whether every contiguous span is scored (any N and method can be served)."""
        return len(self.spans) == self.num_blocks * (self.num_blocks + 1) // 2

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScoreTable:
        """The table written by :meth:`to_json`, checked: spans in range, finite, NMI in [0, 1], every block."""
        table = cls(num_blocks=int(data["num_blocks"]))
        if table.num_blocks < 2:
            raise ScoresError(
                f"the scores are for {table.num_blocks} blocks; a prunable model has at least 2"
            )
        for row in data["spans"]:
            a, b = int(row["first"]), int(row["last"])
            mi, nmi = float(row["mi"]), float(row["nmi"])
            where = f"span ({a}, {b})"
            if not 0 <= a <= b < table.num_blocks:
                raise ScoresError(f"{where} lies outside blocks 0..{table.num_blocks - 1}")
            if not (math.isfinite(mi) and math.isfinite(nmi)) or mi < 0 or not 0.0 <= nmi <= 1.0:
                raise ScoresError(
                    f"{where} has mi={mi!r}, nmi={nmi!r}: expected finite mi >= 0 and nmi in [0, 1]"
                )
            if (a, b) in table.spans:
                raise ScoresError(f"{where} appears twice")
            table.spans[(a, b)] = SpanScore(mi, nmi)
        missing = [i for i in range(table.num_blocks) if (i, i) not in table.spans]
        if missing:
            raise ScoresError(f"the scores lack blocks {missing[:5]}: every single block must be scored")
        return table

    def _blocks(self) -> list[tuple[int, SpanScore]]:
        return [(i, self.spans[(i, i)]) for i in range(self.num_blocks) if (i, i) in self.spans]
