"""Repairs after the cut, by name: one file each; each repair class registers itself (``@REGISTRY.register``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miprun.options import DEFAULT_REPAIR
from miprun.registry import import_plugins
from miprun.repair.base import REGISTRY, Repair, RepairContext, RepairRecord
from miprun.repair.identity import NoRepair
from miprun.repair.linear import LinearRepair

import_plugins(__name__, __path__)  # a plugin file anywhere in this package registers itself


def build(name: str, params: Mapping[str, Any] | None = None) -> Repair:
    """The repair ``name`` with ``params`` typed and checked against its hyperparameters."""
    repair: Repair = REGISTRY.build(name, params)
    return repair


def describe() -> str:
    """One line per repair, for help texts."""
    return "; ".join(f"{name} ({cls.summary})" for name, cls in REGISTRY.items())


__all__ = [
    "DEFAULT_REPAIR",
    "REGISTRY",
    "LinearRepair",
    "NoRepair",
    "Repair",
    "RepairContext",
    "RepairRecord",
    "build",
    "describe",
]
