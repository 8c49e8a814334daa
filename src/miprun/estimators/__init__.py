"""Mutual-information estimators, selectable by name (``miprun.estimators.get("gaussian")``)."""

from __future__ import annotations

import difflib
from typing import Any

from miprun.estimators.base import Estimator
from miprun.estimators.binned import BinnedMI
from miprun.estimators.coordinate import CoordinateMI
from miprun.estimators.gaussian import GaussianMI
from miprun.estimators.renyi import RenyiMI

REGISTRY: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (GaussianMI, CoordinateMI, RenyiMI, BinnedMI)
}
DEFAULT = "coordinate"  # chosen by measurement: docs/estimator-study.md


def get(name: str, **params: Any) -> Estimator:
    """Build the estimator ``name`` with ``params``; a miss lists what exists."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown estimator {name!r}.{hint} Available: {', '.join(sorted(REGISTRY))}."
        ) from None
    return cls(**params)


__all__ = ["DEFAULT", "REGISTRY", "Estimator", "get"]
