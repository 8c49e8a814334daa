"""The naive references: the deepest blocks, and a seeded random choice."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from miprun.errors import InvalidOptionError
from miprun.methods.base import REGISTRY, Choice, Evidence, Method
from miprun.methods.search import check_n


def last_n(total: int, n: int) -> list[int]:
    """The ``n`` deepest blocks except the final one: ``T-1-n .. T-2``."""
    if not 0 < n < total - 1:
        raise InvalidOptionError(
            f"last-n keeps the final block, so it can remove 1 to {total - 2} of {total}, not {n}"
        )
    return list(range(total - 1 - n, total - 1))


def random_select(total: int, n: int, seed: int) -> list[int]:
    """A seeded uniform choice of ``n`` distinct blocks."""
    check_n(total, n)
    return sorted(random.Random(seed).sample(range(total), n))


@REGISTRY.register
@dataclass
class LastN(Method):
    name: ClassVar[str] = "last-n"
    summary: ClassVar[str] = "the N deepest blocks except the final one"

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        return Choice(last_n(evidence.num_blocks, n), 0, stop_reason="deepest but the final block")


@REGISTRY.register
@dataclass
class Random(Method):
    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "a seeded uniform choice of N blocks"

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        removed = random_select(evidence.num_blocks, n, seed)
        return Choice(removed, 0, stop_reason="seeded uniform choice", record={"seed": seed})
