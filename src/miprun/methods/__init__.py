"""Pruning methods by name: one file per family; each method class registers itself (``@REGISTRY.register``).

Each method declares what it reads (:class:`~miprun.methods.base.Method`); :func:`run` turns the evidence
into a removal set. Evidence that scores files keep is read back with the class its method declares (``evidence_types``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext, Method, SearchInfo, run
from miprun.methods.forward import PplOneshot, Sleb
from miprun.methods.mi import MiOptimal, MiPrun
from miprun.methods.naive import LastN, Random
from miprun.methods.searched import MiSearch
from miprun.methods.similarity import Angular, AngularMean, ShortGPT
from miprun.methods.verified import MiVerified
from miprun.options import DEFAULT_METHOD
from miprun.registry import import_plugins
from miprun.scores.evidence import EVIDENCE_TYPES

import_plugins(__name__, __path__)  # a plugin file anywhere in this package registers itself

MAX_BLOCKS_FRACTION = 0.25  # default reach of N-dependent evidence (the SLEB path) in a scores file


def build(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """The method ``name`` with ``params`` typed and checked against its hyperparameters."""
    method: Method = REGISTRY.build(name, params)
    return method


def evidence_type(key: str) -> Any:
    """The class a scores file's evidence ``key`` is read back with, as the methods that gather it declare."""
    return EVIDENCE_TYPES.get(key)


def default_comparison() -> list[str]:
    """The methods `miprun compare` runs without --methods: those whose class says they belong there."""
    return [name for name, cls in REGISTRY.items() if cls.compared_by_default]


def describe() -> str:
    """One line per method, for help texts."""
    return "; ".join(f"{name} ({cls.summary})" for name, cls in REGISTRY.items())


def default_max_blocks(num_blocks: int) -> int:
    """How far N-dependent evidence reaches when not told: a quarter of the blocks, at least 1."""
    return min(num_blocks - 1, max(1, math.ceil(num_blocks * MAX_BLOCKS_FRACTION)))


__all__ = [
    "DEFAULT_METHOD",
    "REGISTRY",
    "Angular",
    "AngularMean",
    "Choice",
    "Evidence",
    "GatherContext",
    "LastN",
    "Method",
    "MiOptimal",
    "MiPrun",
    "MiSearch",
    "MiVerified",
    "PplOneshot",
    "Random",
    "SearchInfo",
    "ShortGPT",
    "Sleb",
    "build",
    "default_comparison",
    "default_max_blocks",
    "describe",
    "evidence_type",
    "run",
]
