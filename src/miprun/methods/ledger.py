"""What a verified choice cost: the passes each stage ran, counted across verifiers on prefixes of the same
windows, what a measurement would add before it runs (for a budget), and the record a manifest keeps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from miprun.capture.replay import head_layers

if TYPE_CHECKING:
    from miprun.methods.verified import Verifier


@dataclass
class Ledger:
    """What a choice cost, by stage, in full-model passes over the widest verifier's tokens: the layer runs of
    verifiers on prefixes of the same windows, each weighed by its share of them; the dense states and targets
    count whole, whether computed for this choice or reused from an earlier one (another N)."""

    verifiers: list[Verifier]
    num_blocks: int
    stages: dict[str, float] = field(default_factory=dict)
    # the stage running, and the layer runs before it began
    _open: tuple[str, float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.verifiers = list({id(v): v for v in self.verifiers}.values())  # each once
        self._tokens = max(v.windows.numel() for v in self.verifiers)

    def _runs(self, setup: bool) -> float:
        """All verifiers' layer runs so far (``setup``: only their dense states and targets), weighed."""
        return sum(
            (v.setup_runs if setup else v.layer_runs - v.setup_runs) * v.windows.numel() / self._tokens
            for v in self.verifiers
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the measurement work done inside the block (less any dense setup) under ``name``; while it
        runs, what it has spent so far counts too (a budget weighed inside a stage sees its earlier rounds)."""
        self._open = (name, self._runs(setup=False))
        try:
            yield
        finally:
            self.stages = self._stages()
            self._open = None

    def _stages(self) -> dict[str, float]:
        """Passes by stage, the one running included."""
        stages = dict(self.stages)
        if self._open is not None:
            name, before = self._open
            stages[name] = stages.get(name, 0.0) + (self._runs(setup=False) - before) / self.num_blocks
        return stages

    def by_stage(self) -> dict[str, float]:
        """Passes by stage, the dense states and targets first; they add up to :meth:`passes`."""
        return {"dense states and targets": self._runs(setup=True) / self.num_blocks, **self._stages()}

    def passes(self) -> float:
        return sum(self.by_stage().values())

    def seconds(self) -> float:
        """The seconds every verifier spent measuring (and preparing)."""
        return sum(v.seconds for v in self.verifiers)

    def planned(self, verifier: Verifier, sets: list[list[int]], repaired: bool = False) -> float:
        """What measuring ``sets`` with ``verifier`` would add, in this ledger's passes."""
        return (
            verifier.planned_runs(sets, repaired) * verifier.windows.numel() / self._tokens / self.num_blocks
        )


def dearest_first(sets: list[list[int]]) -> list[list[int]]:
    """``sets`` in the order a budget costs them when it cannot know which will be measured: a set starting at
    an earlier block runs more layers (ties: by the set)."""
    return sorted(sets, key=lambda s: (min(s), s))


def cost_record(verifier: Verifier, ledger: Ledger) -> dict[str, Any]:
    """What the verification cost: the ledger's passes over its tokens and its verifiers' seconds, and the cache
    ``verifier`` kept."""
    return {
        "verification_layer_passes": ledger.passes(),
        "output_layer_cost": round(head_layers(verifier.model), 2),  # in decoder layers per token, counted
        "scored_positions": "all" if verifier.positions is None else len(verifier.positions),
        "cached_boundaries": len(verifier.cache.checkpoints) if verifier.cache is not None else 0,
        "cache_bytes": verifier.cache.bytes if verifier.cache is not None else 0,
        "verify_seconds": round(ledger.seconds(), 3),
    }
