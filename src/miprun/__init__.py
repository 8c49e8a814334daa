"""miprun: depth-prune causal language models by mutual information (MI-PRUN).

import miprun
scores = miprun.score("smollm2-135m")                  # one dense forward pass
removed, search = miprun.select(scores, num_blocks=3)  # Fast-Block-Select, no forward pass
result = miprun.prune("smollm2-135m", num_blocks=3, out="out/pruned")
miprun.heal("out/pruned", out="out/healed")            # distil toward the dense parent (LoRA, merged)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name and the module that defines it. The API pulls in torch and transformers, so it is
# imported on first use (PEP 562) and `miprun --help` stays quick.
_HOME = {
    "CalibrationConfig": "miprun.options",
    "HealOptions": "miprun.options",
    "PruneOptions": "miprun.options",
    "ScoreOptions": "miprun.options",
    "MiprunError": "miprun.errors",
    "HealResult": "miprun.api",
    "PruneResult": "miprun.api",
    "apply_plan": "miprun.api",
    "heal": "miprun.api",
    "prune": "miprun.api",
    "score": "miprun.api",
    "select": "miprun.api",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'miprun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
