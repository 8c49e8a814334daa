"""The statistics a capture pass can record, by name: one file and one registry line each."""

from __future__ import annotations

from miprun.capture.statistic import Statistic
from miprun.capture.statistics.coordinates import CoordinateMoments
from miprun.capture.statistics.cosine import CosineSums
from miprun.capture.statistics.linear_fit import LinearFitSums
from miprun.capture.statistics.moments import Moments
from miprun.capture.statistics.sample import TokenSample
from miprun.registry import Registry

REGISTRY: Registry[type[Statistic]] = Registry("statistic")
REGISTRY.register(Moments)
REGISTRY.register(CoordinateMoments)
REGISTRY.register(TokenSample)
REGISTRY.register(CosineSums)
REGISTRY.register(LinearFitSums)

__all__ = [
    "REGISTRY",
    "CoordinateMoments",
    "CosineSums",
    "LinearFitSums",
    "Moments",
    "Statistic",
    "TokenSample",
]
