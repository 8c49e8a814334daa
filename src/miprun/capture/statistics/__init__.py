"""The statistics a capture pass can record, by name: one file each, registered by its ``@REGISTRY.register`` decorator."""

from __future__ import annotations

from miprun.capture.statistic import REGISTRY, Statistic
from miprun.capture.statistics.coordinates import CoordinateMoments
from miprun.capture.statistics.cosine import CosineSums
from miprun.capture.statistics.linear_fit import LinearFitSums
from miprun.capture.statistics.moments import Moments
from miprun.capture.statistics.sample import TokenSample
from miprun.registry import import_plugins

import_plugins(__name__, __path__)  # a plugin file anywhere in this package registers itself

__all__ = [
    "REGISTRY",
    "CoordinateMoments",
    "CosineSums",
    "LinearFitSums",
    "Moments",
    "Statistic",
    "TokenSample",
]
