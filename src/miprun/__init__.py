"""miprun: depth-prune causal language models by mutual information (MI-PRUN).

import miprun
scores = miprun.score("smollm2-135m")                  # one dense forward pass
removed, search = miprun.select(scores, num_blocks=3)  # Fast-Block-Select, no forward pass
result = miprun.prune("smollm2-135m", num_blocks=3, out="out/pruned")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "CalibrationConfig",
    "HealOptions",
    "MiprunError",
    "PruneOptions",
    "ScoreOptions",
    "apply_plan",
    "heal",
    "prune",
    "score",
    "select",
]
_OPTIONS = {"CalibrationConfig", "HealOptions", "PruneOptions", "ScoreOptions"}


def __getattr__(name: str) -> Any:
    # The API pulls in torch and transformers; import it on first use so `miprun --help` stays quick.
    if name in _OPTIONS:
        from miprun import options

        return getattr(options, name)
    if name == "MiprunError":
        from miprun.errors import MiprunError

        return MiprunError
    if name in __all__:
        from miprun import api

        return getattr(api, name)
    raise AttributeError(f"module 'miprun' has no attribute {name!r}")
