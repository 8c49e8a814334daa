"""Methods that read the similarity of block inputs and outputs: ShortGPT and angular distance.

* ``shortgpt`` (Men et al. 2024): block influence ``BI_i = 1 - mean_t cos(x_i, y_i)`` over all tokens;
  remove the N lowest.
* ``angular`` (Gromov et al. 2024): remove the contiguous window of N blocks whose input and output are
  closest in angular distance ``arccos(cos) / pi``, measured on each sequence's *last* token, as in the
  paper. ``angular-mean`` averages the distance over all tokens instead (what miprun's ``angular``
  computed before 0.2).

Both read cosine sums from the one capture pass (:class:`~miprun.capture.statistics.CosineSums`); the
evidence kept in scores files is the ``(T+1, T+1)`` mean cosine and angle between every pair of states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from miprun.capture.statistic import Statistic
from miprun.capture.statistics import CosineSums
from miprun.errors import ScoresError
from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext, Method
from miprun.methods.search import check_n
from miprun.ranking import check_chosen, rank


def lowest(values: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` smallest values (ties to the lower index), sorted."""
    check_n(len(values), n)
    order = sorted(range(len(values)), key=lambda i: (rank(values[i]), i))  # NaN never wins
    check_chosen([values[i] for i in order[:n]], "the lowest values")
    return sorted(order[:n])


def block_influence(mean_cos: torch.Tensor) -> list[float]:
    """ShortGPT's ``BI_i = 1 - mean cos(x_i, y_i)`` per block, from the ``(T+1, T+1)`` mean-cosine matrix."""
    return [1.0 - float(mean_cos[i, i + 1]) for i in range(mean_cos.shape[0] - 1)]


def shortgpt_select(influence: Sequence[float], n: int) -> list[int]:
    """ShortGPT: the ``n`` blocks of lowest block influence."""
    return lowest(influence, n)


def window_distances(mean_angle: torch.Tensor, n: int) -> list[float]:
    """Angular distance between the input of block ``l`` and the output of block ``l+n-1``, per ``l``."""
    total = mean_angle.shape[0] - 1
    check_n(total, n)
    return [float(mean_angle[start, start + n]) for start in range(total - n + 1)]


def angular_select(mean_angle: torch.Tensor, n: int) -> list[int]:
    """Gromov et al.: the contiguous window of ``n`` blocks with the smallest angular distance."""
    dist = window_distances(mean_angle, n)
    start = min(range(len(dist)), key=lambda s: (rank(dist[s]), s))
    check_chosen([dist[start]], "angular distance")
    return list(range(start, start + n))


@dataclass
class CosineMatrices:
    """Mean cosine and mean angular distance between every pair of states: ``(T+1, T+1)`` float64."""

    mean_cos: torch.Tensor
    mean_angle: torch.Tensor
    tokens: int

    @classmethod
    def of(cls, sums: CosineSums) -> CosineMatrices:
        return cls(sums.mean_cos(), sums.mean_angle(), sums.count)

    def columns(self, key: str) -> dict[str, list[float]]:
        """Per-block values for ``miprun score``'s table: ShortGPT's block influence on these tokens."""
        title = "ShortGPT BI" if key == "cosine" else "BI, last token"
        return {title: block_influence(self.mean_cos)}

    def to_json(self) -> dict[str, Any]:
        return {
            "mean_cos": self.mean_cos.tolist(),
            "mean_angle": self.mean_angle.tolist(),
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CosineMatrices:
        def matrix(rows: Any) -> torch.Tensor:
            values = torch.tensor(rows, dtype=torch.float64)
            if values.ndim != 2 or values.shape[0] != values.shape[1] or not torch.isfinite(values).all():
                raise ScoresError("the cosine evidence must be a square matrix of finite numbers")
            return values

        return cls(matrix(data["mean_cos"]), matrix(data["mean_angle"]), int(data["tokens"]))

    @classmethod
    def from_version1(cls, data: dict[str, Any]) -> CosineMatrices | None:
        """A version-1 scores file's raw cosine and angle sums, as mean matrices (None if it counted none)."""
        if not data.get("count"):
            return None
        count = float(data["count"])
        cos = torch.tensor(data["cos_sum"], dtype=torch.float64) / count
        angle = torch.tensor(data["angle_sum"], dtype=torch.float64) / count
        if not (torch.isfinite(cos).all() and torch.isfinite(angle).all()):
            raise ScoresError("the cosine statistics in the scores file are not finite")
        return cls(cos, angle, int(count))


@dataclass
class _CosineMethod(Method):
    """A method reading cosine sums over ``positions`` tokens of every window."""

    positions: ClassVar[Literal["all", "last"]] = "all"

    @classmethod
    def key(cls) -> str:
        return "cosine" if cls.positions == "all" else "cosine_last"

    def statistics(self) -> list[Statistic]:
        return [CosineSums(positions=self.positions)]

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        assert ctx.stats is not None
        return {self.key(): CosineMatrices.of(ctx.stats.get(self.statistics()[0], self.name))}

    def matrices(self, evidence: Evidence) -> CosineMatrices:
        return evidence.require(self.key(), self.name)  # type: ignore[no-any-return]


@REGISTRY.register
@dataclass
class ShortGPT(_CosineMethod):
    name: ClassVar[str] = "shortgpt"
    summary: ClassVar[str] = "ShortGPT: N lowest block influence 1 - cos(in, out)"
    evidence_types: ClassVar[dict[str, type]] = {"cosine": CosineMatrices}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        influence = block_influence(self.matrices(evidence).mean_cos)
        removed = shortgpt_select(influence, n)
        return Choice(
            removed, len(influence), stop_reason="lowest block influence", record={"scores": influence}
        )


@REGISTRY.register
@dataclass
class Angular(_CosineMethod):
    name: ClassVar[str] = "angular"
    summary: ClassVar[str] = "Gromov et al.: contiguous N with least angular distance (last token)"
    positions: ClassVar[Literal["all", "last"]] = "last"
    evidence_types: ClassVar[dict[str, type]] = {"cosine_last": CosineMatrices}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        angle = self.matrices(evidence).mean_angle
        dist = window_distances(angle, n)
        removed = angular_select(angle, n)
        return Choice(removed, len(dist), stop_reason="smallest angular distance", record={"scores": dist})


@REGISTRY.register
@dataclass
class AngularMean(Angular):
    name: ClassVar[str] = "angular-mean"
    summary: ClassVar[str] = "angular distance averaged over all tokens (not only the last)"
    positions: ClassVar[Literal["all", "last"]] = "all"
    evidence_types: ClassVar[dict[str, type]] = {"cosine": CosineMatrices}
