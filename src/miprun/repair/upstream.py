"""A removed run's fit on the model already cut and repaired upstream (issue 16, item 3).

The linear repair fits every run's map on the dense model's activations, from one pass. After the cut the
blocks before a later run read states that the earlier runs' removal (and repair) changed, so that run's
map was fitted on inputs it never sees. Fitted where it will run, run ``[a..b]`` reads ``X`` and ``B`` from
the model with the earlier runs removed and their maps folded in, and still aims at the dense model's state
``b + 1``. That takes two partial passes over the fitting windows per later run: the dense body up to block
``b`` (its states ``Y``, kept per batch on the compute device: ``tokens x hidden`` floats), then the cut and
repaired body up to block ``a - 1``, pairing each batch with its ``Y``. The first run's fit is the dense one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from miprun.capture import distributed
from miprun.capture.engine import capture
from miprun.capture.statistic import BatchInfo, CaptureContext, Statistic, Tap
from miprun.capture.statistics import LinearFitSums
from miprun.model.edits import edited
from miprun.model.layouts import decoder_layers
from miprun.model.surgery import skip_blocks
from miprun.options import CalibrationConfig


@dataclass
class StatesByBatch(Statistic):
    """Block state ``state`` of every sample token, kept per batch (by its first window)."""

    name: ClassVar[str] = "states-by-batch"

    state: int = 1
    states: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def taps(self, ctx: CaptureContext) -> list[Tap]:
        return [Tap(state=self.state)]

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        self.states[batch.start] = parts[0]

    def merge_(self, other: Statistic) -> None:
        assert isinstance(other, StatesByBatch)
        self.states.update(other.states)


@dataclass
class PairedFitSums(LinearFitSums):
    """:class:`LinearFitSums` whose ``Y`` comes from another model's pass (``targets``, per batch) while ``X``
    and ``B`` come from this one."""

    name: ClassVar[str] = "linear-fit-paired"

    targets: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def config(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.source, self.base, self.relative, id(self.targets))

    def blank(self) -> PairedFitSums:
        return PairedFitSums(self.source, self.base, self.target, self.relative, self.targets)  # shared

    def taps(self, ctx: CaptureContext) -> list[Tap]:
        return [self.source, Tap(state=self.base)]

    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        target = self.targets[batch.start].to(parts[0].device)
        super().update([*parts, target], batch)


def upstream_sums(
    model: nn.Module,
    windows: torch.Tensor,
    sums: LinearFitSums,
    upstream: list[int],
    edits: dict[str, torch.Tensor],
    calibration: CalibrationConfig | None = None,
    progress: bool = False,
) -> LinearFitSums:
    """``sums`` (a run's map from ``X`` at block ``a - 1`` to the dense state ``b + 1``, ``a = sums.base``) with
    ``X`` and ``B`` from the model without blocks ``upstream`` (all before ``a``) and with ``edits`` applied."""
    cal = calibration or CalibrationConfig()
    total = len(decoder_layers(model))
    a, after = sums.base, sums.target
    if any(block >= a for block in upstream) or sums.source.block is None:
        raise ValueError(f"upstream blocks {upstream} must all lie before the run's first block {a}")
    share = distributed.share(len(windows))
    with skip_blocks(model, range(after, total)):  # the dense body up to the run's last block
        found = capture(model, windows, [StatesByBatch(state=after)], cal, share=share, progress=progress)
    dense = next(iter(found))
    assert isinstance(dense, StatesByBatch)
    shift = len(upstream)  # blocks before ``a`` that the cut model lacks: its indices shift down by as many
    want = PairedFitSums(
        replace(sums.source, block=sums.source.block - shift),
        base=a - shift,
        target=after,
        relative=sums.relative,
        targets=dense.states,
    )
    with edited(model, edits), skip_blocks(model, sorted({*upstream, *range(a, total)})):
        paired = capture(model, windows, [want], cal, share=share, progress=progress)
    fitted = next(iter(distributed.merge_stats(paired)))
    assert isinstance(fitted, PairedFitSums)
    return fitted
