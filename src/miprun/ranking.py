"""Choosing by a measurement: a NaN or infinite value never wins a comparison.

``min`` over ``(nan, ...)`` keys keeps a NaN that comes first (NaN never compares lower), so every choice
by a measured value ranks a non-finite one after all finite ones, and refuses when nothing finite is left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from miprun.errors import NonFiniteError


def rank(value: float) -> float:
    """A sort key for a measurement where lower is better: NaN and infinities rank after every finite value."""
    value = float(value)
    return value if math.isfinite(value) else math.inf


def check_chosen(values: Sequence[float], what: str) -> None:
    """Refuse a choice that still had to take a non-finite measurement (too few finite ones)."""
    bad = [v for v in values if not math.isfinite(float(v))]
    if bad:
        raise NonFiniteError(
            f"{what}: the choice needs {len(values)} value(s), but {len(bad)} of them are NaN or infinite; "
            "the forward passes are not finite (run with --dtype float32, or check the weights)"
        )
