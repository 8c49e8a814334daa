"""The estimator interface: mutual information between two captured states, in nats."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from miprun.capture.statistic import CapturedStats, Statistic
from miprun.registry import Registry


@dataclass
class Estimator(ABC):
    """Estimates ``MI(state a ; state b)`` from captured statistics.

    Subclasses are dataclasses whose fields are their hyperparameters (recorded in the manifest, checked
    in ``__post_init__``), declare what the capture pass must record (:meth:`statistics`) and implement
    :meth:`mi`.
    Normalised MI divides by the geometric mean of each side's MI with itself, so an identity block
    scores 1 under every estimator (spec section 5.1).
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `miprun list estimators` and --help

    @classmethod
    def example(cls) -> Estimator:
        """A small instance for the registry-wide contract tests (tests/test_contracts.py) on a tiny model:
        the defaults, unless a plugin's defaults need more than a tiny model holds."""
        return cls()

    @abstractmethod
    def statistics(self) -> list[Statistic]:
        """What the capture pass must record for this estimator."""

    @abstractmethod
    def mi(self, stats: CapturedStats, a: int, b: int) -> float:
        """``MI(state a ; state b)`` in nats (>= 0)."""

    def nmi(self, stats: CapturedStats, a: int, b: int) -> float:
        """MI normalised to [0, 1]: ``MI(a;b) / sqrt(MI(a;a) * MI(b;b))``; 1 means "output == input"."""
        return self.normalise(self.mi(stats, a, b), self.mi(stats, a, a), self.mi(stats, b, b))

    @staticmethod
    def normalise(mi_ab: float, mi_aa: float, mi_bb: float) -> float:
        """NMI from the pair's MI and each side's MI with itself (callers may cache the latter)."""
        denom = math.sqrt(max(mi_aa, 0.0) * max(mi_bb, 0.0))
        if denom <= 0.0:
            return 0.0
        return min(max(mi_ab / denom, 0.0), 1.0)

    def params(self) -> dict[str, Any]:
        """Hyperparameters, for the manifest."""
        return {"name": self.name, **asdict(self)}


def check_range(
    name: str, value: float, low: float, high: float | None = None, *, open_low: bool = False
) -> None:
    """Raise an error naming ``name`` unless ``low <= value`` (``<`` with ``open_low``) and ``value <= high``."""
    from miprun.errors import InvalidOptionError

    ok = (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'(' if open_low else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise InvalidOptionError(f"{name} must lie in {bound}, got {value!r}")


# Every estimator by name: a class registers itself with ``@REGISTRY.register`` (its ``name`` is the key).
REGISTRY: Registry[type[Estimator]] = Registry("estimator")
