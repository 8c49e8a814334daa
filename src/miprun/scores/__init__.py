"""Scores: the span MI table, a scoring run's result and its file format, and the scores cache."""

from __future__ import annotations

from miprun.scores.result import CalibrationInfo, ScoreResult
from miprun.scores.table import ScoreTable, SpanScore

__all__ = ["CalibrationInfo", "ScoreResult", "ScoreTable", "SpanScore"]
