"""``mi-verified``: MI proposes, the model decides.

Span MI ranks every removal set in milliseconds; this method takes the few it ranks best (the K best sets
by the MI set loss, Fast-Block-Select's choice, and their neighbours), adds the one-pass similarity
methods' choices (ShortGPT's blocks and the angular windows, from cosine sums of the same pass), and
measures each with the model on a small token budget: the KL divergence of the pruned model's next-token
distribution from the dense model's (or the calibration loss), after the repair when one is chosen. Each
candidate runs only from its first changed block on, from cached dense states (:mod:`miprun.capture.replay`).
The best measured wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from miprun.capture.replay import (
    BoundaryCache,
    CutCache,
    StateCache,
    head_layers,
    layers_run,
    logits_from,
)
from miprun.capture.statistic import Statistic
from miprun.errors import InvalidOptionError, NonFiniteError
from miprun.methods.base import REGISTRY, Choice, Evidence, GatherContext, Method
from miprun.methods.candidates import propose
from miprun.methods.ledger import Ledger, cost_record
from miprun.methods.search import fast_block_select, set_loss
from miprun.methods.similarity import Angular, AngularMean, CosineMatrices, ShortGPT
from miprun.methods.targets import DenseTargets, coarse_kl, next_token_nll, top_k_with_tail
from miprun.model.edits import edited
from miprun.model.layouts import decoder_layers, layout_for, model_config

Objective = Literal["kl", "nll"]


HEAD_BUDGET = 8.0  # decoder layers' worth of output layer per position, SmolLM2-135M's (docs/comparison.md)


def auto_stride(model: Any, budget: float = HEAD_BUDGET) -> int:
    """Score every position where the output layer costs about ``budget`` decoder layers or less, else every
    ``stride``-th position, so a measurement costs about as much on any vocabulary."""
    return max(1, round(head_layers(model) / budget))


def scored_positions(seq_len: int, stride: int) -> torch.Tensor | None:
    """Every ``stride``-th position of a window, ending at its last (None: every position)."""
    return None if stride <= 1 else torch.arange(seq_len - 1, -1, -stride).flip(0)


@dataclass
class Verifier:
    """Measures removal sets with the model itself, on a few windows, from cached dense states."""

    model: Any
    windows: torch.Tensor  # (num_windows, seq_len) verification token ids
    objective: Objective = "kl"
    kl_topk: int = 256
    budget_bytes: int = 1 << 30
    batch_size: int = 4
    repair: Any = None  # a pipeline.RepairHook: fit a repair for a set (unguarded) and fold it in temporarily
    progress: bool = False  # a progress bar over the sets measured
    stride: int = 1  # the output layer scores every stride-th position (it dominates large vocabularies)
    # a verifier on these windows or more, these its first: its dense states serve (and its targets, where
    # the stride is the same)
    parent: Verifier | None = None
    cache: StateCache | None = field(default=None, init=False)
    dense: DenseTargets | None = field(default=None, init=False)
    layer_runs: float = field(default=0.0, init=False)  # decoder layers (output layer included, in decoder
    # layers by its parameters) run over the windows, all candidates
    setup_runs: float = field(default=0.0, init=False)  # of which the dense states and targets, paid once
    searches: dict[Any, Any] = field(default_factory=dict, init=False)  # search state kept between N
    seconds: float = field(default=0.0, init=False)

    @property
    def positions(self) -> torch.Tensor | None:
        return scored_positions(self.windows.shape[1], self.stride)

    @property
    def head_share(self) -> float:
        """The output layer's cost per measurement, in decoder layers over every position."""
        scored = self.windows.shape[1] if self.positions is None else len(self.positions)
        return head_layers(self.model) * scored / self.windows.shape[1]

    def _prepare(self) -> StateCache:
        """The cached dense states (the parent's, sliced, where there is one) and, for KL, the dense targets at
        this verifier's positions (the parent's, sliced, where the stride is the same)."""
        if self.cache is not None:
            return self.cache
        before = self.layer_runs
        if self.parent is not None:
            rows = self.windows.shape[0]
            self.cache = self.parent._prepare().prefix(rows)
            if self.objective == "kl" and self.stride == self.parent.stride:
                assert self.parent.dense is not None
                self.dense = self.parent.dense.prefix(rows, self.batch_size)
        else:
            self.cache = BoundaryCache(
                self.model, self.windows, self.budget_bytes, self.batch_size, progress=self.progress
            )
            self.layer_runs += len(decoder_layers(self.model))  # the states only: no output layer
        if self.objective == "kl" and self.dense is None:
            self.dense = self._dense_targets()
        self.setup_runs += self.layer_runs - before
        return self.cache

    def planned_runs(self, sets: list[list[int]], repaired: bool = False) -> float:
        """The layer runs measuring ``sets`` would add to this verifier, its own dense states and targets
        included where it has none yet (a parent's are the parent's; a repaired set is counted from the block
        before its first, where a fold may edit): what a search with a budget weighs before it spends."""
        total = len(decoder_layers(self.model))
        root = self
        while root.cache is None and root.parent is not None:
            root = root.parent
        # where the dense states are not cached yet, the checkpoints they will be cached at (no model run)
        start = (
            root.cache or StateCache(self.model, root.windows, root.budget_bytes, root.batch_size)
        ).start_for
        runs = float(total) if self.cache is None and self.parent is None else 0.0
        if (
            self.objective == "kl"
            and self.dense is None
            and (self.parent is None or self.parent.stride != self.stride)
        ):
            runs += layers_run(total, [], start(total)) + self.head_share
        for removed in sets:
            first = max(min(removed) - 1, 0) if repaired and self.repair is not None else min(removed)
            runs += layers_run(total, removed, start(first)) + self.head_share
        return runs

    @torch.inference_mode()
    def _dense_targets(self) -> DenseTargets:
        """The dense model's top-k targets at the scored positions, from the last cached states (counted)."""
        assert self.cache is not None
        last = len(decoder_layers(self.model))
        self.layer_runs += layers_run(last, [], self.cache.start_for(last)) + self.head_share
        k = min(self.kl_topk, self.model.get_output_embeddings().weight.shape[0])
        values, indices, tails = [], [], []
        passes = logits_from(self.model, self.cache, [], last, self.positions)
        bar = tqdm(
            passes,
            total=self.cache.num_batches,
            desc="dense targets",
            unit="batch",
            disable=not self.progress,
        )
        for logits in bar:
            top_values, top_indices, tail = top_k_with_tail(logits, k)
            values.append(top_values.cpu())
            indices.append(top_indices.cpu())
            tails.append(tail.cpu())
        return DenseTargets(values, indices, tails)

    def measure(self, sets: list[list[int]], repaired: bool = True) -> list[float]:
        """The objective of every set (lower is better), each after the repair when there is one (and
        ``repaired``); a set whose measurement is not finite gets ``inf``, so it never wins."""
        start = time.perf_counter()
        cache = self._prepare()
        repair = self.repair if repaired else None
        if repair is not None:
            repair.prepare(sets)  # one pass captures what every candidate's repair reads
        label = "measuring candidates" + (" after the repair" if repair is not None else "")
        scores = [
            self._one(cache, removed, repair=repair)
            for removed in tqdm(sets, desc=label, unit="set", disable=not self.progress, leave=False)
        ]
        self.seconds += time.perf_counter() - start
        return scores

    def cut_cache(self) -> CutCache:
        """States of the dense model at every boundary, for a search that removes blocks one at a time."""
        start = time.perf_counter()
        self._prepare()
        cut = CutCache(self.model, self.windows, self.budget_bytes, self.batch_size, dense=self.cache)
        self.layer_runs += len(decoder_layers(self.model)) if cut.ran_dense else 0
        self.seconds += time.perf_counter() - start
        return cut

    def measure_one_more(self, cut: CutCache, blocks: list[int]) -> list[float]:
        """The objective (no repair) of the cut's set plus each one of ``blocks``, run from that block on."""
        start = time.perf_counter()
        self._prepare()
        scores = [self._one(cut, sorted({*cut.removed, b}), first=b) for b in blocks]
        self.seconds += time.perf_counter() - start
        return scores

    def advance(self, cut: CutCache, block: int) -> None:
        """Remove ``block`` from the cut for good (its states refreshed from that block on)."""
        start = time.perf_counter()
        self.layer_runs += cut.advance(self.model, block)
        self.seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _one(
        self,
        cache: StateCache,
        removed: list[int],
        repair: Any = None,
        first: int | None = None,
    ) -> float:
        edits = repair.trial(removed) if repair is not None else {}
        if first is None:
            first = min(removed)
        first = min([first, *(_block_of(self.model, name) for name in edits)])
        total = len(decoder_layers(self.model))
        self.layer_runs += layers_run(total, removed, cache.start_for(first)) + self.head_share
        total_value, count = 0.0, 0
        positions = self.positions
        with edited(self.model, edits):
            for b, logits in enumerate(logits_from(self.model, cache, removed, first, positions)):
                if self.objective == "kl":
                    assert self.dense is not None
                    dense, dev = self.dense, logits.device
                    value = coarse_kl(
                        logits, dense.values[b].to(dev), dense.indices[b].to(dev), dense.tail[b].to(dev)
                    )
                    weight = logits.shape[0] * logits.shape[1]
                else:
                    ids = cache.windows[cache.batch_size * b : cache.batch_size * (b + 1)]
                    value = next_token_nll(logits, ids, positions)
                    scored = (
                        ids.shape[1] - 1 if positions is None else int((positions < ids.shape[1] - 1).sum())
                    )
                    weight = ids.shape[0] * scored
                total_value += float(value) * weight  # batches may differ in size: weigh by positions
                count += weight
        result = total_value / count
        return result if math.isfinite(result) else math.inf


def _block_of(model: Any, name: str) -> int:
    """The decoder block a parameter belongs to (0 for anything before the first block, e.g. the embedding)."""
    prefix = layout_for(model_config(model)).layers_path + "."
    return int(name[len(prefix) :].split(".")[0]) if name.startswith(prefix) else 0


@REGISTRY.register
@dataclass
class MiVerified(Method):
    """Span MI proposes ``candidates`` removal sets; the model measures each on ``tokens`` tokens; the best wins."""

    name: ClassVar[str] = "mi-verified"
    summary: ClassVar[str] = (
        "MI proposes candidate sets (K best by MI set loss, Fast-Block-Select's, neighbours, plus ShortGPT's "
        "and the angular windows), the model measures each (KL to dense, after the repair) on a small token "
        "budget, the best wins"
    )
    uses_mi: ClassVar[bool] = True
    evidence_types: ClassVar[dict[str, type]] = {"cosine": CosineMatrices, "cosine_last": CosineMatrices}
    live_keys: ClassVar[tuple[str, ...]] = ("verifier",)

    candidates: int = 12  # removal sets measured
    tokens: int = 2048  # verification tokens, from the calibration windows
    objective: Objective = "kl"
    kl_topk: int = 256  # dense tokens kept per position for the KL (the rest is one bucket)
    memory_mb: int = 1024  # bound on the cached dense states (and targets)
    k: int = 5  # Fast-Block-Select's candidate surplus, for its own proposal
    baselines: bool = True  # also measure the one-pass similarity methods' sets (cosine sums, same pass)
    stride: int = 0  # the output layer scores every stride-th position of a window: it costs 30 decoder
    # layers per token on Gemma-3-270M's 262k-token vocabulary, 8 on SmolLM2's 49k (the body: 18 and 30);
    # 0: auto, about 8 decoder layers' worth per position (SmolLM2: every position; Gemma-3-270M: every 4th)

    def __post_init__(self) -> None:
        for field_name, low in (
            ("candidates", 1),
            ("tokens", 2),
            ("kl_topk", 1),
            ("memory_mb", 1),
            ("k", 0),
            ("stride", 0),
        ):
            if getattr(self, field_name) < low:
                raise InvalidOptionError(
                    f"{field_name} must be at least {low}, got {getattr(self, field_name)}"
                )
        if self.objective not in ("kl", "nll"):
            raise InvalidOptionError(f"objective must be 'kl' or 'nll', got {self.objective!r}")

    def _baselines(self) -> list[Method]:
        return [ShortGPT(), Angular(), AngularMean()] if self.baselines else []

    def statistics(self) -> list[Statistic]:
        return [stat for method in self._baselines() for stat in method.statistics()]

    def gather(self, ctx: GatherContext) -> dict[str, Any]:
        """The baselines' cosine matrices, from the same capture pass as the MI statistics."""
        return {key: value for method in self._baselines() for key, value in method.gather(ctx).items()}

    def attach(self, ctx: GatherContext) -> dict[str, Any]:
        """The verifier: live evidence (it runs the model), never written to a scores file."""
        seq = ctx.windows.shape[1]
        rows = min(len(ctx.windows), max(1, math.ceil(self.tokens / seq)))
        verifier = Verifier(
            ctx.model,
            ctx.windows[:rows],
            self.objective,
            self.kl_topk,
            self.memory_mb << 20,
            ctx.batch_size,
            ctx.repair,
            ctx.progress,
            self.stride or auto_stride(ctx.model),
        )
        return {"verifier": verifier}

    def choose(self, evidence: Evidence, n: int, seed: int) -> Choice:
        short = self.shortlist(evidence, n, seed)
        verifier: Verifier = evidence.require("verifier", self.name)
        ledger = Ledger([verifier], short.num_blocks)
        with ledger.stage("candidates"):
            scores = verifier.measure(short.sets)
        best = winner(scores, short.losses, f"mi-verified's {len(scores)} candidates")
        record = {
            **short.record(scores, self.objective, verifier),
            "chosen_mi_rank": short.mi_rank[tuple(short.sets[best])],
            **cost_record(verifier, ledger),
        }
        return Choice(
            short.sets[best], len(short.sets), stop_reason=f"lowest measured {self.objective}", record=record
        )

    def shortlist(self, evidence: Evidence, n: int, seed: int) -> Shortlist:
        """The sets to measure: the seeds (Fast-Block-Select's and the baselines' choices), the
        ``candidates`` best by MI set loss, and the neighbours of the best few."""
        table = evidence.mi_table(self.name)
        fbs = fast_block_select(table.block_nmi(), table.span_nmi, n, k=self.k).removed
        seeds = {"fast-block-select": fbs}
        for key in self.evidence_keys if self.baselines else ():
            evidence.require(key, self.name)  # missing: say so for this method, not for the baseline
        seeds.update({m.name: m.choose(evidence, n, seed).removed for m in self._baselines()})
        sets = propose(table.num_blocks, n, table.span_nmi, self.candidates, seeds=list(seeds.values()))
        return Shortlist(sets, [set_loss(s, table.span_nmi) for s in sets], seeds, table.num_blocks)


@dataclass
class Shortlist:
    """Candidate sets, their MI set losses, who proposed the seeds, and the model's block count."""

    sets: list[list[int]]
    losses: list[float]
    seeds: dict[str, list[int]]
    num_blocks: int

    @property
    def mi_rank(self) -> dict[tuple[int, ...], int]:
        ordered = sorted(self.losses)
        return {tuple(s): 1 + ordered.index(loss) for s, loss in zip(self.sets, self.losses, strict=True)}

    def record(self, scores: list[float], objective: str, verifier: Verifier) -> dict[str, Any]:
        rank = self.mi_rank
        return {
            "objective": objective,
            "verification_tokens": int(verifier.windows.numel()),
            "candidates": [
                {"removed": s, "mi_set_loss": loss, "mi_rank": rank[tuple(s)], "measured": score}
                for s, loss, score in zip(self.sets, self.losses, scores, strict=True)
            ],
            "fast_block_select": self.seeds["fast-block-select"],
            "proposed_by": {name: sorted(removed) for name, removed in self.seeds.items()},
        }


def winner(scores: list[float], tiebreak: list[float], what: str) -> int:
    """The index of the lowest finite score (ties: lowest ``tiebreak``); no finite score is an error."""
    finite = [i for i, score in enumerate(scores) if math.isfinite(score)]
    if not finite:
        raise NonFiniteError(
            f"every one of {what} measured as NaN or infinite: the model's outputs are not finite on the "
            "verification windows (check the model in float32, or the data)"
        )
    return min(finite, key=lambda i: (scores[i], tiebreak[i]))
