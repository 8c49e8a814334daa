"""Pruning methods by name: one file per family, one registry line per method.

Each method declares what it reads (:class:`~miprun.methods.base.Method`); :func:`run` turns the evidence
into a removal set. Evidence that scores files keep is decoded by the ``EVIDENCE`` registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from miprun.methods.base import Choice, Evidence, GatherContext, Method, SearchInfo, run
from miprun.methods.forward import OneShotLosses, PplOneshot, Sleb, SlebPath
from miprun.methods.mi import MiOptimal, MiPrun
from miprun.methods.naive import LastN, Random
from miprun.methods.searched import MiSearch
from miprun.methods.similarity import Angular, AngularMean, CosineMatrices, ShortGPT
from miprun.methods.verified import MiVerified
from miprun.options import DEFAULT_METHOD
from miprun.registry import Registry

REGISTRY: Registry[type[Method]] = Registry("method")
REGISTRY.register(MiPrun)
REGISTRY.register(MiOptimal)
REGISTRY.register(MiVerified)
REGISTRY.register(MiSearch)
REGISTRY.register(ShortGPT)
REGISTRY.register(Angular)
REGISTRY.register(AngularMean)
REGISTRY.register(Sleb)
REGISTRY.register(PplOneshot)
REGISTRY.register(LastN)
REGISTRY.register(Random)

# Evidence kept in scores files, by the key methods store it under: a class with to_json/from_json.
EVIDENCE: Registry[Any] = Registry("evidence")
EVIDENCE.add("cosine", CosineMatrices)
EVIDENCE.add("cosine_last", CosineMatrices)
EVIDENCE.add("sleb", SlebPath)
EVIDENCE.add("oneshot", OneShotLosses)

MAX_BLOCKS_FRACTION = 0.25  # default reach of N-dependent evidence (the SLEB path) in a scores file


def build(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """The method ``name`` with ``params`` typed and checked against its hyperparameters."""
    method: Method = REGISTRY.build(name, params)
    return method


def describe() -> str:
    """One line per method, for help texts."""
    return "; ".join(f"{name} ({cls.summary})" for name, cls in REGISTRY.items())


def default_max_blocks(num_blocks: int) -> int:
    """How far N-dependent evidence reaches when not told: a quarter of the blocks, at least 1."""
    return min(num_blocks - 1, max(1, math.ceil(num_blocks * MAX_BLOCKS_FRACTION)))


__all__ = [
    "DEFAULT_METHOD",
    "EVIDENCE",
    "REGISTRY",
    "Choice",
    "Evidence",
    "GatherContext",
    "Method",
    "SearchInfo",
    "build",
    "default_max_blocks",
    "describe",
    "run",
]
