"""Versions of the packages that shape a result, recorded in every manifest, scores file and evaluation."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = (
    "miprun",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
    "lm_eval",
    "gguf",
    "peft",
)


def package_versions() -> dict[str, str]:
    """``{"python": ..., package: version or "not installed"}``."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
