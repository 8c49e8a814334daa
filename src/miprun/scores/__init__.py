"""Scores: what a scoring run produced (span MI and each method's evidence), its file format and cache."""

from __future__ import annotations

from miprun.estimators.table import ScoreTable, SpanScore
from miprun.scores.result import CalibrationInfo, ScoreResult

__all__ = ["CalibrationInfo", "ScoreResult", "ScoreTable", "SpanScore"]
