"""Test helpers shared by several files: comparing captured statistics statistic by statistic, and the
calibration, logits and weight edits of the repair tests (tests/repair/)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from paths import FIXTURES

from miprun.capture.statistic import CapturedStats, Tap
from miprun.capture.statistics import (
    REGISTRY,
    CoordinateMoments,
    CosineSums,
    LinearFitSums,
    Moments,
    TokenSample,
)
from miprun.options import CalibrationConfig

# One of every statistic kind (the registry's), at small sizes: what the equivalence tests capture.
EVERY_STATISTIC = [
    Moments(proj_dim=16),
    TokenSample(capacity=30),
    CosineSums(),
    CosineSums(positions="last"),
    CoordinateMoments(),
    LinearFitSums(Tap(block=1, role="mlp"), base=2, target=4),  # reads a module inside a block
]
assert {type(s) for s in EVERY_STATISTIC} == set(dict(REGISTRY.items()).values()), (
    "a statistic is not covered"
)
ACCUMULATORS = ("total", "gram", "cross", "cos", "angle", "xtx", "xtd", "dtd")  # what is summed over tokens


def assert_same_stats(
    a: CapturedStats, b: CapturedStats, rtol: float = 1e-6, atol: float = 1e-6, exact: bool = False
) -> None:
    """Equal statistic by statistic: counts exactly, sums to ``rtol``/``atol`` (or bit for bit with ``exact``)."""
    assert a.num_tokens == b.num_tokens and a.num_states == b.num_states
    assert [s.config() for s in a] == [s.config() for s in b]
    for x, y in zip(a, b, strict=True):
        for name in ("count", "num_states", "dim"):
            assert getattr(x, name, None) == getattr(y, name, None), name
        for name in ACCUMULATORS:
            _same(getattr(x, name, None), getattr(y, name, None), rtol, atol, exact, name)
        if isinstance(x, TokenSample):
            assert x.count == y.count > 0
            for s in range(a.num_states):
                _same(x.state(s), y.state(s), rtol, atol, exact, f"sample state {s}")


def _same(u: Any, v: Any, rtol: float, atol: float, exact: bool, what: str) -> None:
    if u is None or v is None:
        assert u is None and v is None, what
        return
    ok = torch.equal(u, v) if exact else torch.allclose(u, v, rtol=rtol, atol=atol)
    assert ok, what


# ---------------------------------------------------------------------------------------- repair tests

IDS = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))
CAL = CalibrationConfig(source=str(FIXTURES / "calibration.txt"), samples=4, seq_len=24, batch_size=2)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def with_edits(model: torch.nn.Module, edits: dict[str, torch.Tensor]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in edits.items():
            params[name].copy_(value)
    return out
