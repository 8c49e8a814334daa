"""The stages of a pruning run, each a small function the API composes:

    windows -> capture (what the estimator, the method and the repair ask for) -> scores / evidence
            -> select -> repair -> surgery -> save (checkpoint, manifest, report)

Nothing here parses options or prints: :mod:`miprun.api` decides what runs, :mod:`miprun.cli` shows it.
"""

from __future__ import annotations

from miprun.model.loading import check_seq_len
from miprun.pipeline.repairing import RepairHook, attach_live, fit_repair, repair_model
from miprun.pipeline.scoring import (
    calibration_info,
    calibration_windows,
    capture_pass,
    check_scores_match,
    evidence_of,
    gather,
    score_model,
)
from miprun.pipeline.setup import (
    RunSettings,
    blocks_to_remove,
    check,
    estimator_of,
    method_of,
    model_info,
    repair_of,
    repair_with,
    timed,
)

__all__ = [
    "RepairHook",
    "RunSettings",
    "attach_live",
    "blocks_to_remove",
    "calibration_info",
    "calibration_windows",
    "capture_pass",
    "check",
    "check_scores_match",
    "check_seq_len",
    "estimator_of",
    "evidence_of",
    "fit_repair",
    "gather",
    "method_of",
    "model_info",
    "repair_model",
    "repair_of",
    "repair_with",
    "score_model",
    "timed",
]
