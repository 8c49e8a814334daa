"""Healing after the cut: a short distillation of the pruned model toward its dense parent, on Trainer.

``loss`` (the KL, full or top-k), ``data`` (windows, cached teacher targets), ``checkpoints`` (complete or
ignored), ``trainer`` (Trainer with that loss), ``run`` (adapters in, training, adapters merged).
"""

from __future__ import annotations

from miprun.options import HealConfig
from miprun.repair.heal.checkpoints import HealCheckpointError, clean
from miprun.repair.heal.data import TARGETS_NAME, TeacherTargets, heal_windows
from miprun.repair.heal.loss import distill_loss, top_k_distill_loss
from miprun.repair.heal.run import HealReport, heal, linear_modules, teacher_targets
from miprun.repair.heal.trainer import training_arguments

__all__ = [
    "TARGETS_NAME",
    "HealCheckpointError",
    "HealConfig",
    "HealReport",
    "TeacherTargets",
    "clean",
    "distill_loss",
    "heal",
    "heal_windows",
    "linear_modules",
    "teacher_targets",
    "top_k_distill_loss",
    "training_arguments",
]
