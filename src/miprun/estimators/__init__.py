"""Mutual-information estimators, selectable by name: one file and one registry line each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miprun.estimators.base import Estimator
from miprun.estimators.binned import BinnedMI
from miprun.estimators.coordinate import CoordinateMI
from miprun.estimators.gaussian import GaussianMI
from miprun.estimators.renyi import RenyiMI
from miprun.options import DEFAULT_ESTIMATOR
from miprun.registry import Registry

REGISTRY: Registry[type[Estimator]] = Registry("estimator")
REGISTRY.register(CoordinateMI)
REGISTRY.register(GaussianMI)
REGISTRY.register(RenyiMI)
REGISTRY.register(BinnedMI)
DEFAULT = DEFAULT_ESTIMATOR


def build(name: str, params: Mapping[str, Any] | None = None) -> Estimator:
    """The estimator ``name`` with ``params`` typed and checked against its fields (strings are parsed)."""
    estimator: Estimator = REGISTRY.build(name, params)
    return estimator


def get(name: str, **params: Any) -> Estimator:
    """``build(name, params)`` with keyword parameters."""
    return build(name, params)


__all__ = ["DEFAULT", "REGISTRY", "Estimator", "build", "get"]
