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
3. a local search swaps one removed block for a kept one while the measurement falls (``swap_rounds``;
   :mod:`miprun.methods.swaps`);
4. the ``finalists`` best sets measured so far, with MI's best set, are measured again on all ``tokens``,
   and the best wins; with a repair, the ``repaired_probe`` best sets and MI's best are first measured after
   their repair on the probe, and its ``finalists`` best are measured after the repair on all ``tokens``. The
   finalists' measurement scores every position (``final_stride``), where the search may score every few, and
   is the only one that reads the tokens after the screen's (their dense states are computed for it alone).

Steps 1-3 screen on the first ``screen_tokens`` of the verification tokens (512 of 1,024 by default: the screen
chose like all of them on both models but for one 9-block set, 1.4 % worse cut), and the finalists are
measured on all of them (on 512, SmolLM2's two 9-block finalists ranked the other way round from held-out text,
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from miprun.capture.replay import head_layers
from miprun.errors import InvalidOptionError
from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext
from miprun.methods.forward import sleb_passes
from miprun.methods.greedy import GreedyPath, public
from miprun.methods.ledger import Ledger, cost_record, dearest_first
from miprun.methods.swaps import swap_search
from miprun.methods.verified import HEAD_BUDGET, MiVerified, Verifier, auto_stride, winner


@REGISTRY.register
@dataclass
class MiSearch(MiVerified):
    """MI's shortlist plus a lazy greedy on cached states; the best measured set after the repair wins."""

    name: ClassVar[str] = "mi-search"
    summary: ClassVar[str] = (
        "mi-verified's MI shortlist plus a greedy that re-measures the model after each removal from cached "
        "states (SLEB's idea at a fraction of its cost); the best sets are measured again after the repair"
    )

    tokens: int = 1024  # verification tokens, from the calibration windows: the finalists are measured on all
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
    # the output layer's stride where the finalists are measured again (1: every position; 0: where it costs
    # about twice the search's HEAD_BUDGET decoder layers, every 2nd position on Gemma-3-270M, every position on
    # SmolLM2): on Gemma-3-270M every 4th position ranked two 2-block sets the other way round from every
    # position and from held-out text, every 2nd ranked them as every position did (docs/comparison.md)
    final_stride: int = 0
    # the most the search spends, as a share of SLEB's forward passes for the same N over the calibration
    # tokens (0: no limit). What gives way, in order: the repaired probe's breadth beyond its least (the
    # ``finalists`` best sets and MI's best), the swap rounds (each costed before it runs, with the least the
    # repaired probe and the finalists will need after it, the finalists on all ``tokens`` wherever they would
    # fit without the round), then the finalists' tokens after the screen's
    budget: float = 0.1

    live_keys: ClassVar[tuple[str, ...]] = (
        "verifier",
        "screen",
        "probe",
        "finals",
        "rest",
        "calibration_tokens",
    )

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
            ("budget", 0),
        ):
            if getattr(self, field_name) < low:
                raise InvalidOptionError(
                    f"{field_name} must be at least {low}, got {getattr(self, field_name)}"
                )

    def attach(self, ctx: GatherContext) -> dict[str, Any]:
        """The verifier on ``tokens`` tokens (what the costs are counted over), the screening verifier on their
        first ``screen_tokens`` and the probe on the screen's first ``probe_tokens`` (each the wider one where it
        would hold as many windows), the finalists' verifier on the screen's windows at the finalists' stride,
        ``rest``: the verification tokens after the screen's (None where the screen has them all; its dense
        states and targets are computed only where the finalists are measured on them), and the calibration's
        tokens (what SLEB's cost, and so the budget, counts over)."""
        live = super().attach(ctx)
        verifier: Verifier = live["verifier"]
        stride = self.final_stride or auto_stride(ctx.model, 2 * HEAD_BUDGET)
        screen, rest = _prefix(verifier, self.screen_tokens), None
        if screen is not verifier:  # a verifier of its own: the rest of the tokens are the finalists' only
            screen = replace(screen, parent=None)
            rest = replace(verifier, windows=verifier.windows[screen.windows.shape[0] :], stride=stride)
        finals = screen if stride == screen.stride else replace(screen, stride=stride, parent=screen)
        return {
            **live,
            "screen": screen,
            "probe": _prefix(screen, self.probe_tokens),
            "finals": finals,
            "rest": rest,
            "calibration_tokens": int(ctx.windows.numel()),
        }

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        short = self.shortlist(evidence, n, seed)
        verifier: Verifier = evidence.require("verifier", self.name)
        screen: Verifier = evidence.require("screen", self.name)
        probe: Verifier = evidence.require("probe", self.name)
        finals: Verifier = evidence.require("finals", self.name)
        rest: Verifier | None = evidence.require("rest", self.name)
        share = screen.windows.numel() / verifier.windows.numel()  # the screen's tokens, of the verifier's
        ledger = Ledger([verifier, screen, probe, finals, *([rest] if rest else [])], short.num_blocks)
        mi_best = min(
            range(len(short.sets)), key=lambda i: (short.losses[i], i)
        )  # a finalist whatever it measures
        with ledger.stage("shortlist"):
            probed = probe.measure(short.sets, repaired=False)
            if (
                probe is not screen
            ):  # the shortlist's best (and MI's best) go on to the screen, in the greedy's units
                ahead = sorted(range(len(short.sets)), key=lambda i: (probed[i], short.losses[i]))
                ahead = list(dict.fromkeys([*ahead[: self.finalists], mi_best]))
                screened = screen.measure([short.sets[i] for i in ahead], repaired=False)
            else:
                ahead, screened = list(range(len(short.sets))), probed
        with ledger.stage("greedy"):
            ends, steps, greedy_passes = self.greedy(screen, probe, short.num_blocks, n)
        # what a run at this N alone costs: the whole greedy path to N, even where an earlier N took part of it
        ledger.stages["greedy"] = greedy_passes * share
        pool = {tuple(short.sets[i]): score for i, score in zip(ahead, screened, strict=True)}
        for removed, score in ends:
            pool.setdefault(tuple(removed), score)
        ranked = sorted(pool, key=lambda key: (pool[key], key))
        path = screen.searches[self._greedy_key(probe)]
        repaired = verifier.repair is not None
        rehearsing = repaired and self.repaired_probe > 0 and probe is not verifier
        limit = math.inf
        if self.budget:
            calibration = evidence.require("calibration_tokens", self.name)
            sleb = sleb_passes(short.num_blocks, n, head_layers(verifier.model))
            limit = self.budget * sleb * calibration / verifier.windows.numel()  # in the ledger's passes

        def final_cost(sets: list[list[int]], wide: bool) -> float:
            """What measuring ``sets`` as the finalists adds: on the screen's windows after the repair or at
            the finalists' stride (on the cut at the screen's stride they keep their values), and with
            ``wide`` on the rest of the tokens too (their dense states and targets where not computed yet)."""
            cost = ledger.planned(finals, sets, repaired) if repaired or finals is not screen else 0.0
            return cost + (ledger.planned(rest, sets, repaired) if wide and rest is not None else 0.0)

        def affordable(probed: list[list[int]], screened: list[list[int]]) -> bool:
            """Whether measuring ``probed`` on the probe and ``screened`` on the screen, and then the least the
            repaired probe measures (the finalists' number of sets and MI's best) and the finalists, stays
            within the budget; the finalists on all the tokens wherever they would fit without this round
            (so a round gives way to them), else on the screen's. Costed on the dearest of the sets that could
            reach those stages (the best so far, these, MI's best: a set starting earlier runs more layers)."""
            best = sorted(pool, key=lambda key: (pool[key], key))[: max(self.repaired_probe, self.finalists)]
            reach = dearest_first(
                [
                    list(key)
                    for key in dict.fromkeys([*best, *map(tuple, screened), tuple(short.sets[mi_best])])
                ]
            )
            low = min(self.finalists, self.repaired_probe)
            spent = ledger.passes()
            if rehearsing:
                spent += ledger.planned(probe, reach[: low + 1], repaired=True)
            wide = rest is not None and spent + final_cost(reach[: self.finalists], wide=True) <= limit
            now = ledger.planned(probe, probed) + ledger.planned(screen, screened)
            return spent + now + final_cost(reach[: self.finalists], wide) <= limit

        with ledger.stage("swaps"):
            swaps = swap_search(
                screen,
                probe,
                list(ranked[0]),
                pool[ranked[0]],
                path.last_value,
                pool,
                short.num_blocks,
                self.width,
                self.finalists,
                self.swap_rounds,
                affordable,
            )
        ranked = sorted(pool, key=lambda key: (pool[key], key))
        rehearsed: list[dict[str, Any]] = []
        breadth, wide = self.repaired_probe, rest is not None
        if rehearsing:
            # then the repaired probe gives way, down to the finalists' number of sets besides MI's best, and
            # then the finalists' measurement on the tokens after the screen's
            breadth, wide = self._breadth(
                ledger, probe, ranked, tuple(short.sets[mi_best]), limit, final_cost, wide
            )
            with ledger.stage("repaired probe"):
                finalists, rehearsed = self.rehearse(probe, ranked[:breadth], tuple(short.sets[mi_best]))
        else:
            finalists = [
                list(key) for key in dict.fromkeys([*ranked[: self.finalists], tuple(short.sets[mi_best])])
            ]
        wide = wide and ledger.passes() + final_cost(finalists, wide=True) <= limit
        judged = "after the repair" if repaired else "on the cut"
        with ledger.stage("finalists"):
            if repaired or finals is not screen:
                final = finals.measure(finalists, repaired=repaired)
            else:
                final = [pool[tuple(s)] for s in finalists]
            if wide and rest is not None:  # the mean over all the tokens, each part weighed by its share
                more = rest.measure(finalists, repaired=repaired)
                mine, theirs = finals.windows.numel(), rest.windows.numel()
                final = [
                    (value * mine + other * theirs) / (mine + theirs)
                    for value, other in zip(final, more, strict=True)
                ]
        best = winner(final, [float(i) for i in range(len(final))], f"mi-search's {len(final)} finalists")
        record = {
            **short.record(probed, self.objective, verifier),  # as the probe measured them
            "screen_tokens": int(screen.windows.numel()),
            "probe_tokens": int(probe.windows.numel()),
            "final_tokens": int(finals.windows.numel() + (rest.windows.numel() if wide and rest else 0)),
            "greedy": steps,
            "greedy_layer_passes": greedy_passes * share,
            "swaps": swaps,
            "repaired_probe": rehearsed,
            "finalists": [
                {"removed": s, "cut": pool[tuple(s)], "measured": score, "greedy": s == ends[0][0]}
                for s, score in zip(finalists, final, strict=True)
            ],
            **cost_record(screen, ledger),
            "passes_by_stage": ledger.by_stage(),
            "budget_passes": limit if math.isfinite(limit) else None,
            "budget_gave_way": [
                *(["swaps"] if any(r.get("stopped") == "budget" for r in swaps) else []),
                *(["repaired probe"] if rehearsing and breadth < self.repaired_probe else []),
                *(["finalists' tokens"] if rest is not None and not wide else []),
            ],
        }
        return Choice(
            finalists[best],
            len(pool),
            stop_reason=f"lowest measured {self.objective} {judged} among {len(finalists)} finalists",
            record=record,
        )

    def _breadth(
        self,
        ledger: Ledger,
        probe: Verifier,
        ranked: list[tuple[int, ...]],
        mi_best: tuple[int, ...],
        limit: float,
        final_cost: Callable[[list[list[int]], bool], float],
        wide: bool,
    ) -> tuple[int, bool]:
        """How many of the ``ranked`` best sets the repaired probe measures (with MI's best), and whether the
        finalists are then measured on all the tokens: the most sets that fit ``limit`` with the finalists
        on all the tokens (where ``wide``), else the most that fit with them on the screen's, else the
        finalists' number (the finalists costed as the dearest of the sets tried)."""

        def fits(breadth: int, wide: bool) -> bool:
            tried = [list(key) for key in dict.fromkeys([*ranked[:breadth], mi_best])]
            dearest = dearest_first(tried)[: self.finalists]
            planned = ledger.planned(probe, tried, repaired=True) + final_cost(dearest, wide)
            return ledger.passes() + planned <= limit

        low = min(self.finalists, self.repaired_probe)
        for keep_wide in [True, False] if wide else [False]:
            for breadth in range(self.repaired_probe, low - 1, -1):
                if fits(breadth, keep_wide):
                    return breadth, keep_wide
        return low, False

    def rehearse(
        self, probe: Verifier, best: list[tuple[int, ...]], mi_best: tuple[int, ...]
    ) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """The finalists when there is a repair: the ``best`` sets by the cut (the ``repaired_probe`` best, or
        fewer where the budget says) and MI's best set, each measured after its repair on the probe, and the
        ``finalists`` best of them by that measurement (the repair reorders sets: on Gemma-3-270M it favours
        late blocks that cut worse). Returns them and a record per set the probe measured."""
        tried = list(dict.fromkeys([*best, mi_best]))
        values = probe.measure([list(key) for key in tried])
        order = sorted(range(len(tried)), key=lambda i: (values[i], tried[i]))
        finalists = [list(tried[i]) for i in order[: self.finalists]]
        return finalists, [
            {"removed": list(key), "measured": value} for key, value in zip(tried, values, strict=True)
        ]

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
        return path.ends(n), [public(step) for step in path.steps[:n]], path.passes(n)

    def _greedy_key(self, probe: Verifier) -> tuple[Any, ...]:
        """Where the greedy's path is kept with its verifier: one path per way of taking its steps."""
        return ("greedy", self.width, probe.windows.numel(), self.step_screen)


def _prefix(verifier: Verifier, tokens: int) -> Verifier:
    """A verifier on the first ``tokens`` of ``verifier``'s windows (whole windows, at least one; its repair), or
    ``verifier`` itself where that is all of them or ``tokens`` is 0."""
    rows = verifier.windows.shape[0]
    keep = min(rows, max(1, math.ceil(tokens / verifier.windows.shape[1])))
    if not tokens or keep >= rows:
        return verifier
    return replace(verifier, windows=verifier.windows[:keep], parent=verifier)
