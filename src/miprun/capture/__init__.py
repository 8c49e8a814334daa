"""The calibration pass: hooks on the forward pass reduce what they see to bounded statistics.

``capture`` runs the whole model; ``capture_sequential`` one decoder layer at a time; under ``torchrun``
each process captures a share and ``merge_stats`` combines them. Every statistic is a
:class:`~miprun.capture.statistic.Statistic` (see :mod:`miprun.capture.statistics`).
"""

from __future__ import annotations

from miprun.capture.engine import capture
from miprun.capture.sequential import capture_sequential
from miprun.capture.statistic import CapturedStats, Statistic, Tap

__all__ = ["CapturedStats", "Statistic", "Tap", "capture", "capture_sequential"]
