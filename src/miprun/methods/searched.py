"""``mi-search``: MI's shortlist and a greedy search on cached states, judged by the model after the repair.

``mi-verified`` only measures sets that a one-pass signal proposes, and at 25-30 % of the blocks the best
sets (SLEB's) remove early blocks that neither MI nor cosine ranks as redundant. SLEB finds them by
re-measuring the model after every removal, at the cost of a full pass per kept block per step. This method
keeps SLEB's idea at a fraction of its cost:

1. MI's shortlist (``mi-verified``'s candidates) is measured on the cut alone, from cached dense states;
2. a *lazy* greedy removes one block at a time from the cut model's own cached states
   (:class:`~miprun.capture.replay.CutCache`): the first step measures every block (each from that block
   on), later steps re-measure only the ``width`` blocks whose last measurement was best and the kept
   blocks beside the last removal, whose values change most; the rest keep their last measurement;
3. a local search swaps one removed block for a kept one while the measurement falls (``swap_rounds``);
4. the ``finalists`` best sets measured so far, with MI's best set, are measured again on all ``tokens``,
   and the best wins; with a repair, the ``repaired_probe`` best sets and MI's best are first measured after
   their repair on the probe, and its ``finalists`` best are measured after the repair on all ``tokens``. The
   finalists' measurement scores every position (``final_stride``), where the search may score every few.

Steps 1-3 screen on the first ``screen_tokens`` of the verification tokens when there are more of them (by
default there are not: 512 tokens chose like 1,024 on both models but for one 9-block set, 1.4 % worse cut,
docs/comparison.md). The wide sweeps only rank what the narrower steps look at next, so they run on the first
``probe_tokens``: the shortlist (its ``finalists`` best go on to the screen), the greedy's first step (every
block alone: its values order the blocks the next step re-measures), each later step's re-measured blocks
(the ``step_screen`` the probe ranks best are measured on the screen) and the swaps (the ``finalists`` best
trials by the probe are measured on the screen). The probe and the screen slice the verifier's cached dense
states and targets, so none of them pays a dense pass of its own.

Every measurement is the KL divergence from the dense model's next-token distribution on the verification
tokens (or the loss); the record gives the cost in full-model passes over ``tokens`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from tqdm.auto import tqdm

from miprun.capture.replay import CutCache
from miprun.errors import InvalidOptionError
from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext
from miprun.methods.verified import MiVerified, Verifier, cost_record, winner


@REGISTRY.register
@dataclass
class MiSearch(MiVerified):
    """MI's shortlist plus a lazy greedy on cached states; the best measured set after the repair wins."""

    name: ClassVar[str] = "mi-search"
    summary: ClassVar[str] = (
        "mi-verified's MI shortlist plus a greedy that re-measures the model after each removal from cached "
        "states (SLEB's idea at a fraction of its cost); the best sets are measured again after the repair"
    )

    tokens: int = 512  # verification tokens, from the calibration windows
    width: int = 4  # blocks re-measured at each greedy step, best by their last measurement
    finalists: int = 2  # best-measured sets measured again after the repair (when there is one)
    swap_rounds: int = 2  # rounds of swapping one removed block for a kept one while the measurement falls
    screen_tokens: int = 512  # tokens the greedy and swaps are measured on (0 or >= tokens: all)
    # tokens the wide sweeps are ranked on: the shortlist, the greedy's steps, the swaps (0 or >= screen: screen)
    probe_tokens: int = 128
    # later greedy steps: the blocks the probe ranks best, measured on the screen (0: all; 1 lost
    # Gemma-3-270M's 5-block set, docs/comparison.md)
    step_screen: int = 2
    # with a repair: the sets best by the cut (and MI's best set) measured after the repair on the probe, whose
    # ``finalists`` best go on to all the tokens (0: the finalists are the best by the cut, with MI's best set)
    repaired_probe: int = 6
    # the output layer's stride where the finalists are measured again (1: every position; 0: the search's):
    # on Gemma-3-270M every 4th position ranked two 2-block sets the other way round from every position and
    # from held-out text (docs/comparison.md)
    final_stride: int = 1

    live_keys: ClassVar[tuple[str, ...]] = ("verifier", "screen", "probe", "finals")

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name, low in (
            ("width", 1),
            ("finalists", 1),
            ("swap_rounds", 0),
            ("screen_tokens", 0),
            ("probe_tokens", 0),
            ("step_screen", 0),
            ("repaired_probe", 0),
            ("final_stride", 0),
        ):
            if getattr(self, field_name) < low:
                raise InvalidOptionError(
                    f"{field_name} must be at least {low}, got {getattr(self, field_name)}"
                )

    def attach(self, ctx: GatherContext) -> dict[str, Any]:
        """The verifier on ``tokens`` tokens, the screening verifier on their first ``screen_tokens`` and the
        probe on their first ``probe_tokens`` (each the wider one where it would hold as many windows)."""
        live = super().attach(ctx)
        verifier: Verifier = live["verifier"]
        screen = _prefix(verifier, self.screen_tokens)
        finals = verifier
        if self.final_stride and self.final_stride != verifier.stride:
            finals = replace(verifier, stride=self.final_stride, parent=verifier)
        return {**live, "screen": screen, "probe": _prefix(screen, self.probe_tokens), "finals": finals}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        short = self.shortlist(evidence, n, seed)
        verifier: Verifier = evidence.require("verifier", self.name)
        screen: Verifier = evidence.require("screen", self.name)
        probe: Verifier = evidence.require("probe", self.name)
        finals: Verifier = evidence.require("finals", self.name)
        # the screen's and the probe's work in passes over the verification tokens (their windows are a
        # prefix of them)
        share = screen.windows.numel() / verifier.windows.numel()
        probe_share = probe.windows.numel() / verifier.windows.numel()
        mark, screen_mark, probe_mark, finals_mark = (
            verifier.mark(),
            screen.mark(),
            probe.mark(),
            finals.mark(),
        )
        probed = probe.measure(short.sets, repaired=False)
        mi_best = min(
            range(len(short.sets)), key=lambda i: (short.losses[i], i)
        )  # a finalist whatever it measures
        if (
            probe is not screen
        ):  # the shortlist's best (and MI's best) go on to the screen, in the greedy's units
            ahead = sorted(range(len(short.sets)), key=lambda i: (probed[i], short.losses[i]))
            ahead = list(dict.fromkeys([*ahead[: self.finalists], mi_best]))
            screened = screen.measure([short.sets[i] for i in ahead], repaired=False)
        else:
            ahead, screened = list(range(len(short.sets))), probed

        def spent() -> float:  # the screen's and the probe's layer runs so far, in the screen's units
            return screen.layer_runs + (probe.layer_runs * probe_share / share if probe is not screen else 0)

        greedy_before = spent()
        ends, steps, greedy_passes = self.greedy(screen, probe, short.num_blocks, n)
        greedy_here = (spent() - greedy_before) / short.num_blocks  # less where a path was reused
        pool = {tuple(short.sets[i]): score for i, score in zip(ahead, screened, strict=True)}
        for removed, score in ends:
            pool.setdefault(tuple(removed), score)
        ranked = sorted(pool, key=lambda key: (pool[key], key))
        path = screen.searches[self._greedy_key(probe)]
        swaps = self.swap(
            screen, probe, list(ranked[0]), pool[ranked[0]], path.last_value, pool, short.num_blocks
        )
        ranked = sorted(pool, key=lambda key: (pool[key], key))
        rehearsed: list[dict[str, Any]] = []
        if verifier.repair is not None and self.repaired_probe and probe is not verifier:
            finalists, rehearsed = self.rehearse(probe, ranked, tuple(short.sets[mi_best]))
        else:
            finalists = [
                list(key) for key in dict.fromkeys([*ranked[: self.finalists], tuple(short.sets[mi_best])])
            ]
        if verifier.repair is not None:
            final = finals.measure(finalists)
            judged = "after the repair"
        elif screen is not verifier:
            final = finals.measure(finalists, repaired=False)
            judged = "on the cut"
        else:
            final = [pool[tuple(s)] for s in finalists]
            judged = "on the cut"
        best = winner(final, [float(i) for i in range(len(final))], f"mi-search's {len(final)} finalists")
        record = {
            **short.record(probed, self.objective, verifier),  # as the probe measured them
            "screen_tokens": int(screen.windows.numel()),
            "probe_tokens": int(probe.windows.numel()),
            "greedy": steps,
            "greedy_layer_passes": greedy_passes * share,
            "swaps": swaps,
            "repaired_probe": rehearsed,
            "finalists": [
                {"removed": s, "cut": pool[tuple(s)], "measured": score, "greedy": s == ends[0][0]}
                for s, score in zip(finalists, final, strict=True)
            ],
        }
        # what a run at this N alone costs: the dense states and targets and the whole greedy path to N, even
        # where an earlier N paid for part of them
        runs = verifier.runs_since(mark)
        if screen is not verifier:
            runs += screen.runs_since(screen_mark) * share
        if probe is not screen:
            runs += probe.runs_since(probe_mark) * probe_share
        if finals is not verifier:  # the same windows
            runs += finals.runs_since(finals_mark)
        record.update(cost_record(verifier, runs, short.num_blocks))
        record["verification_layer_passes"] += (greedy_passes - greedy_here) * share
        return Choice(
            finalists[best],
            len(pool),
            stop_reason=f"lowest measured {self.objective} {judged} among {len(finalists)} finalists",
            record=record,
        )

    def rehearse(
        self, probe: Verifier, ranked: list[tuple[int, ...]], mi_best: tuple[int, ...]
    ) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """The finalists when there is a repair: the ``repaired_probe`` best sets by the cut and MI's best set,
        each measured after its repair on the probe, and the ``finalists`` best of them by that measurement
        (the repair reorders sets: on Gemma-3-270M it favours late blocks that cut worse). Returns them and a
        record per set the probe measured."""
        tried = list(dict.fromkeys([*ranked[: self.repaired_probe], mi_best]))
        values = probe.measure([list(key) for key in tried])
        order = sorted(range(len(tried)), key=lambda i: (values[i], tried[i]))
        finalists = [list(tried[i]) for i in order[: self.finalists]]
        return finalists, [
            {"removed": list(key), "measured": value} for key, value in zip(tried, values, strict=True)
        ]

    def swap(
        self,
        verifier: Verifier,
        probe: Verifier,
        current: list[int],
        value: float,
        prior: dict[int, float],
        pool: dict[tuple[int, ...], float],
        total: int,
    ) -> list[dict[str, Any]]:
        """Local search from the best set so far: each round ranks, on ``probe``, the set with each removed block
        put back, then swaps the two whose return helps most for the ``width`` kept blocks the greedy measured
        best (``prior``) and the kept blocks beside the set's runs; the ``finalists`` best swaps by the probe
        are measured by ``verifier``, and the best is taken while it lowers the measurement. Every set the
        verifier measures joins ``pool``; returns one record per round."""
        rounds: list[dict[str, Any]] = []
        probed: dict[tuple[int, ...], float] = {}
        for _ in range(self.swap_rounds):
            back = [sorted(set(current) - {r}) for r in current]
            # (one block removed: putting it back is the dense model, nothing to rank)
            back_values = probe.measure(back, repaired=False) if len(current) > 1 else [0.0]
            give_back = [
                current[i] for i in sorted(range(len(current)), key=lambda i: (back_values[i], i))[:2]
            ]
            kept = [b for b in range(total) if b not in current]
            best_kept = sorted(kept, key=lambda b: (prior.get(b, math.inf), b))[: self.width]
            beside = [b for b in kept if b - 1 in current or b + 1 in current]
            adds = list(dict.fromkeys([*best_kept, *beside]))
            trials: list[tuple[int, ...]] = list(
                dict.fromkeys(tuple(sorted({*current, k} - {r})) for r in give_back for k in adds)
            )
            if not trials:
                break
            ranked_only = 0
            if probe is not verifier:  # the probe ranks the trials; the verifier measures the best few
                unseen = [t for t in trials if t not in pool and t not in probed]
                probed.update(
                    zip(unseen, probe.measure([list(t) for t in unseen], repaired=False), strict=True)
                )
                ranked_only = len(unseen)
                ahead = sorted((t for t in trials if t not in pool), key=lambda t: (probed[t], t))
                trials = [*ahead[: self.finalists], *(t for t in trials if t in pool)]
            new = [t for t in trials if t not in pool]  # a set measured before keeps its value
            pool.update(zip(new, verifier.measure([list(t) for t in new], repaired=False), strict=True))
            best = min(trials, key=lambda t: (pool[t], t))
            rounds.append(
                {
                    "from": current,
                    "probed": ranked_only,
                    "tried": len(new),
                    "best": list(best),
                    "measured": pool[best],
                }
            )
            if not pool[best] < value:
                break
            current, value = list(best), pool[best]
        return rounds

    def greedy(
        self, verifier: Verifier, probe: Verifier, total: int, n: int
    ) -> tuple[list[tuple[list[int], float]], list[dict[str, Any]], float]:
        """Remove ``n`` blocks one at a time, each the one whose removal measures best (lazily re-measured;
        the first step, every block alone, on ``probe``).

        Returns every size-``n`` set the last step measured with its value (the greedy's own set first), one
        record per step, and what the path to ``n`` cost in full-model passes of ``verifier``. The path is kept
        with the verifier, so a larger N continues where a smaller one stopped (as SLEB's path serves every N).
        """
        key = self._greedy_key(probe)
        path = verifier.searches.get(key)
        if path is None:
            path = verifier.searches[key] = GreedyPath(
                verifier.cut_cache(), self.width, total, self.step_screen
            )
        path.extend(verifier, n, probe)
        return path.ends(n), [_public(step) for step in path.steps[:n]], path.passes(n)

    def _greedy_key(self, probe: Verifier) -> tuple[Any, ...]:
        """Where the greedy's path is kept with its verifier: one path per way of taking its steps."""
        return ("greedy", self.width, probe.windows.numel(), self.step_screen)


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


def _public(step: dict[str, Any]) -> dict[str, Any]:
    """A greedy step as the manifest records it (without every re-measured value)."""
    return {key: value for key, value in step.items() if key != "values"}


def _prefix(verifier: Verifier, tokens: int) -> Verifier:
    """A verifier on the first ``tokens`` of ``verifier``'s windows (whole windows, at least one; its repair), or
    ``verifier`` itself where that is all of them or ``tokens`` is 0."""
    rows = verifier.windows.shape[0]
    keep = min(rows, max(1, math.ceil(tokens / verifier.windows.shape[1])))
    if not tokens or keep >= rows:
        return verifier
    return replace(verifier, windows=verifier.windows[:keep], parent=verifier)
