"""Every setting of a run, as typed dataclasses shared by the Python API and the command line.

* :mod:`~miprun.options.fields`: the engine (fields that carry flags, help and bounds; checks; flat names);
* :mod:`~miprun.options.parsers`: command-line values (``KEY=VALUE`` items, comma-separated lists);
* :mod:`~miprun.options.groups`: the groups several commands share (calibration, runtime, scoring, ...);
* :mod:`~miprun.options.commands` and :mod:`~miprun.options.heal`: one options class per command.

    from miprun.options import PruneOptions
    opts = PruneOptions(num_blocks=3)                   # everything else at its default
    opts = with_overrides(opts, method="shortgpt", samples=8)  # flat field names reach nested groups
"""

from __future__ import annotations

from miprun.options.commands import (
    BenchConfig,
    BenchOptions,
    CompareOptions,
    EvaluateOptions,
    PruneOptions,
    ScoreOptions,
)
from miprun.options.fields import Options, accept_flat_names, flag, flat_fields, groups, opt, with_overrides
from miprun.options.groups import (
    DEFAULT_ESTIMATOR,
    DEFAULT_METHOD,
    DEFAULT_REPAIR,
    DTYPE_NAMES,
    LAYERWISE_METHOD,
    SEED_MAX,
    CalibrationConfig,
    EstimatorOptions,
    HeldoutOptions,
    OutputOptions,
    RepairOptions,
    RuntimeOptions,
    ScoringOptions,
    default_method,
)
from miprun.options.heal import HealConfig, HealOptions
from miprun.options.parsers import parse_key_values, split_ints, split_list

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_METHOD",
    "DEFAULT_REPAIR",
    "DTYPE_NAMES",
    "LAYERWISE_METHOD",
    "SEED_MAX",
    "BenchConfig",
    "BenchOptions",
    "CalibrationConfig",
    "CompareOptions",
    "EstimatorOptions",
    "EvaluateOptions",
    "HealConfig",
    "HealOptions",
    "HeldoutOptions",
    "Options",
    "OutputOptions",
    "PruneOptions",
    "RepairOptions",
    "RuntimeOptions",
    "ScoreOptions",
    "ScoringOptions",
    "default_method",
    "flag",
    "flat_fields",
    "groups",
    "opt",
    "parse_key_values",
    "split_ints",
    "split_list",
    "with_overrides",
]

# Every options class takes the flat names of its groups' fields (``PruneOptions(samples=8)``); done once
# here, after all of them are defined, because this package is imported before any of its modules is used.
for _cls in Options.__subclasses__():
    accept_flat_names(_cls)
del _cls
