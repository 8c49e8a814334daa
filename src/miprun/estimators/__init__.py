"""Mutual-information estimators, selectable by name: one file each, registered by ``@REGISTRY.register``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miprun.estimators.base import REGISTRY, Estimator
from miprun.estimators.binned import BinnedMI
from miprun.estimators.coordinate import CoordinateMI
from miprun.estimators.gaussian import GaussianMI
from miprun.estimators.renyi import RenyiMI
from miprun.options import DEFAULT_ESTIMATOR
from miprun.registry import import_plugins

import_plugins(__name__, __path__)  # a plugin file anywhere in this package registers itself

DEFAULT = DEFAULT_ESTIMATOR


def build(name: str, params: Mapping[str, Any] | None = None) -> Estimator:
    """The estimator ``name`` with ``params`` typed and checked against its fields (strings are parsed)."""
    estimator: Estimator = REGISTRY.build(name, params)
    return estimator


def get(name: str, **params: Any) -> Estimator:
    """``build(name, params)`` with keyword parameters."""
    return build(name, params)


__all__ = [
    "DEFAULT",
    "REGISTRY",
    "BinnedMI",
    "CoordinateMI",
    "Estimator",
    "GaussianMI",
    "RenyiMI",
    "build",
    "get",
]
