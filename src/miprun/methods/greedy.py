"""The lazy greedy of ``mi-search``: blocks removed one at a time from the cut model's cached states, each step
re-measuring only the blocks likely to win (SLEB's re-measurement at a fraction of its cost)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from miprun.capture.replay import CutCache
from miprun.methods.verified import Verifier, winner


@dataclass
class GreedyPath:
    """The lazy greedy's state: the cut model's cached states, every step so far, each kept block's last
    measurement, and the last step's block (removed from the cut only when the path goes on)."""

    cut: CutCache
    width: int
    total: int
    step_screen: int = 0  # later steps: the blocks the probe ranks best, measured by the verifier (0: all)
    steps: list[dict[str, Any]] = field(default_factory=list)
    last_value: dict[int, float] = field(default_factory=dict)
    pending: int | None = None

    def extend(self, verifier: Verifier, n: int, probe: Verifier | None = None) -> None:
        """Take steps until ``n`` blocks are removed; the first step (every block alone, from the dense
        states) is measured by ``probe`` when given, and later steps' blocks are ranked on it where
        ``step_screen`` is set, the best ``step_screen`` measured by ``verifier``; the probe's cost is counted
        in ``verifier``'s passes."""
        bar = tqdm(
            total=n,
            initial=len(self.steps),
            desc="greedy removals",
            unit="block",
            leave=False,
            disable=not verifier.progress,  # given at creation: tqdm draws its first line there
        )
        while len(self.steps) < n:
            runs_before = verifier.layer_runs
            if self.pending is not None:
                verifier.advance(self.cut, self.pending)
                del self.last_value[self.pending]
            kept = [b for b in range(self.total) if b not in self.cut.removed]
            fresh = kept if not self.steps else self._to_remeasure(kept, self.steps[-1]["block"])
            probed: list[int] = []  # blocks the probe ranked at a later step (empty: none)
            probe_before = probe.layer_runs if probe is not None else 0.0
            if not self.steps and probe is not None and probe is not verifier:
                values = probe.measure([[b] for b in fresh], repaired=False)
            else:
                if probe is not None and probe is not verifier and 0 < self.step_screen < len(fresh):
                    ranks = probe.measure_one_more(self.cut.prefix(probe.windows.shape[0]), fresh)
                    self.last_value.update(zip(fresh, ranks, strict=True))
                    order = sorted(range(len(fresh)), key=lambda i: (ranks[i], fresh[i]))
                    probed, fresh = fresh, [fresh[i] for i in order[: self.step_screen]]
                values = verifier.measure_one_more(self.cut, fresh)
            if probe is not None and probe is not verifier:  # the probe's work, in the verifier's units
                runs_before -= (
                    (probe.layer_runs - probe_before) * probe.windows.numel() / verifier.windows.numel()
                )
            self.last_value.update(zip(fresh, values, strict=True))
            best = winner(values, [float(b) for b in fresh], f"the greedy's step {len(self.steps) + 1}")
            self.pending = fresh[best]
            self.steps.append(
                {
                    "block": fresh[best],
                    "measured": values[best],
                    "remeasured": fresh,
                    "probed": probed,
                    "values": values,
                    "layer_passes": (verifier.layer_runs - runs_before) / self.total,
                }
            )
            bar.update()
        bar.close()

    def ends(self, n: int) -> list[tuple[list[int], float]]:
        """Every size-``n`` set step ``n`` measured, best first (the greedy's own choice first)."""
        step, before = self.steps[n - 1], [s["block"] for s in self.steps[: n - 1]]
        pairs = sorted(zip(step["values"], step["remeasured"], strict=True))
        return [(sorted([*before, block]), value) for value, block in pairs]

    def passes(self, n: int) -> float:
        """Full-model passes the path to ``n`` cost: the cut cache's dense states (none where they were copied
        from the verifier's) and each step's measurements."""
        return float(self.cut.ran_dense) + sum(step["layer_passes"] for step in self.steps[:n])

    def _to_remeasure(self, kept: list[int], last: int) -> list[int]:
        """The ``width`` kept blocks whose last measurement was best, and the kept blocks on either side of
        the run the last removal joined (removing them would merge with it)."""
        best = sorted(kept, key=lambda b: (self.last_value[b], b))[: self.width]
        left = [b for b in kept if b < last]
        right = [b for b in kept if b > last]
        beside = ([left[-1]] if left else []) + ([right[0]] if right else [])
        return list(dict.fromkeys([*best, *beside]))


def public(step: dict[str, Any]) -> dict[str, Any]:
    """A greedy step as the manifest records it (without every re-measured value)."""
    return {key: value for key, value in step.items() if key != "values"}
