"""``compare``: every method (and repair) on one :class:`~miprun.pipeline.run.Run`, side by side.

A loop over :class:`~miprun.pipeline.run.Variant`: each method scores once, capturing only what it reads,
and its scores serve every N and every repair. Each choice is measured in place, without copies: blocks
skipped, a repair's edits folded in and undone. Pruning time is reported in seconds and as a multiple of
one plain forward pass over the same calibration tokens, measured in the same run on the same machine.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miprun.data.sources import check_sources
from miprun.errors import InvalidOptionError
from miprun.evaluation.bench import forward_pass_seconds
from miprun.evaluation.oracle import DamageOracle
from miprun.model.edits import edited
from miprun.model.layouts import num_blocks
from miprun.model.loading import LoadedModel, as_loaded, check_revision
from miprun.model.surgery import skip_blocks
from miprun.options import CompareOptions, with_overrides
from miprun.output.comparison import (
    COMPARISON_NAME,
    CUT_ONLY,
    Comparison,
    ComparisonRow,
    TextSetup,
    check_setup,
    update,
)
from miprun.output.comparison_report import write
from miprun.pipeline.explicit import check_budget_before_load
from miprun.pipeline.repairing import RepairHook
from miprun.pipeline.run import Run, Selection, Variant, heldout_for, inputs_of
from miprun.pipeline.scoring import calibration_windows
from miprun.pipeline.setup import (
    RunSettings,
    blocks_to_remove,
    check,
    compared_methods,
    estimator_of,
    method_with,
    repair_with,
)

log = logging.getLogger(__name__)

TaskMemo = dict[tuple[tuple[int, ...], str], dict[str, Any]]  # (sorted removed, repair) -> task results


@dataclass
class Chosen:
    """One variant's choice at one N, before it is measured."""

    variant: Variant
    n: int
    selection: Selection
    prune_seconds: float  # scoring + live evidence + selection


def variants(opts: CompareOptions) -> list[Variant]:
    """Every method under every repair, each built as ``prune`` builds its one (same parameters, same ``k``)."""
    estimator = estimator_of(opts.estimation)
    fixes = [repair_with(name, opts.repair_params) for name in opts.repairs]
    chosen = [method_with(name, opts.method_params, opts.k) for name in compared_methods(opts)]
    return [Variant(method, estimator, fix) for method in chosen for fix in fixes]


def compare(loaded: LoadedModel, options: CompareOptions, known_tasks: TaskMemo | None = None) -> Comparison:
    """Prune with every method at every N (under every repair), evaluate each, and return the comparison.

    ``known_tasks`` holds task results already measured with the same tasks and limit (see
    :func:`known_task_results`); they are reused instead of re-run.
    """
    opts, cal = options, options.calibration
    settings = RunSettings(cal, opts.runtime, opts.progress, cache=False, sequential=opts.sequential)
    run = Run(loaded, settings)
    ns = sorted(set(opts.num_blocks))
    for n in ns:
        blocks_to_remove(run.num_blocks, n, None)  # validate before any work
    run.reaching(max(ns))
    held = heldout_for(loaded, opts.heldout)
    start = time.perf_counter()
    # Tokenized once here and reused by every method (``token_windows`` memoises the stream), so the
    # pruning times below are the methods' own work on the same tokens as the forward-pass reference.
    text, windows = calibration_windows(loaded, cal)
    data_s = time.perf_counter() - start
    oracle = DamageOracle(loaded.model, held.windows, batch_size=cal.batch_size)
    forward_s = forward_pass_seconds(loaded.model, windows, cal.batch_size, opts.forward_repeats)
    memo: TaskMemo = dict(known_tasks or {}) if opts.tasks else {}
    if ((), CUT_ONLY) not in memo:
        memo[((), CUT_ONLY)] = _tasks(loaded, [], opts) if opts.tasks else {}
    result = Comparison(
        model=loaded.name,
        num_blocks_total=run.num_blocks,
        dense_ppl=oracle.dense,
        calibration=TextSetup(text.name, cal.samples, cal.seq_len, cal.seed),
        evaluation=TextSetup(held.text.name, int(held.windows.shape[0]), int(held.windows.shape[1])),
        forward_pass_seconds=forward_s,
        estimator=opts.estimation.estimator,
        dense_tasks=memo[((), CUT_ONLY)],
        tasks=list(opts.tasks),
        task_limit=opts.limit,
        task_max_ppl_ratio=opts.task_max_ppl,
        tokenize_seconds=data_s,
    )
    chosen = _choices(run, variants(opts), ns)
    for fix in {id(c.variant.repair): c.variant.repair for c in chosen}.values():
        mine = [c for c in chosen if c.variant.repair is fix]
        hook, pass_s = _repair_pass(run, fix, [c.selection.removed for c in mine])
        for choice in mine:
            row = _measure(run, oracle, choice, hook, pass_s, forward_s)
            row.tasks = _row_tasks(row, loaded, oracle, opts, memo, hook)
            log.info(
                "%s N=%d %s removed %s: ppl %.2f",
                row.method,
                row.num_blocks,
                row.repair,
                row.removed,
                row.ppl,
            )
            result.rows.append(row)
    return result


def _choices(run: Run, variants: list[Variant], ns: list[int]) -> list[Chosen]:
    """Every variant's choice at every N. Each method scores once (its time is its own); live evidence, which
    measures candidates after the repair, is gathered per variant."""
    found: list[Chosen] = []
    scored: dict[int, tuple[Any, float]] = {}  # id(method) -> (scores, seconds)
    for variant in variants:
        key = id(variant.method)
        if key not in scored:
            start = time.perf_counter()
            scored[key] = (run.scores(variant), time.perf_counter() - start)
        scores, score_s = scored[key]
        start = time.perf_counter()
        evidence = run.evidence(variant, scores)
        live_s = time.perf_counter() - start
        for n in ns:
            selection = run.select(variant, evidence, n)
            found.append(Chosen(variant, n, selection, score_s + live_s + selection.search.seconds))
    return found


def _repair_pass(run: Run, fix: Any, sets: list[list[int]]) -> tuple[RepairHook | None, float]:
    """One calibration pass that captures what ``fix`` reads for every set at once (none for the cut alone)."""
    if not fix.changes_weights:
        return None, 0.0
    start = time.perf_counter()
    hook = RepairHook(run.loaded, fix, run.settings)
    hook.prepare(sets)
    return hook, time.perf_counter() - start


def _measure(
    run: Run, oracle: DamageOracle, choice: Chosen, hook: RepairHook | None, pass_s: float, forward_s: float
) -> ComparisonRow:
    """The row of one choice: held-out perplexity cut only, or with the repair fitted and folded in (then undone)."""
    variant, search, removed = choice.variant, choice.selection.search, choice.selection.removed
    row = ComparisonRow(
        method=variant.method.name,
        num_blocks=choice.n,
        removed=removed,
        ppl=0.0,
        prune_seconds=choice.prune_seconds,
        prune_x_forward=choice.prune_seconds / forward_s,
        repair=variant.repair.name,
        mi_set_loss=search.loss,
        mi_evaluations=search.num_evaluations,
        estimator=variant.estimator.params() if variant.method.uses_mi else None,
        search=search.params,
    )
    if hook is None:
        row.ppl = oracle(removed)
        return row
    start = time.perf_counter()
    edits, record = hook.fit(removed)
    row.repair_fit_seconds = time.perf_counter() - start
    row.repair_pass_seconds = pass_s  # one pass shared by every row of this repair
    with edited(run.loaded.model, edits), skip_blocks(run.loaded.model, removed):
        row.ppl = oracle.measure()
    row.repair_record = record.to_json()
    return row


def _row_tasks(
    row: ComparisonRow,
    loaded: LoadedModel,
    oracle: DamageOracle,
    opts: CompareOptions,
    memo: TaskMemo,
    hook: RepairHook | None,
) -> dict[str, Any] | None:
    """Zero-shot tasks for the row's model, once per (block set, repair), unless it is far worse than dense."""
    ratio = opts.task_max_ppl
    if not opts.tasks or (ratio is not None and row.ppl > ratio * oracle.dense):
        return None
    key = (tuple(sorted(row.removed)), row.repair)
    if key not in memo:
        edits = hook.edits(row.removed) if hook is not None else {}
        with edited(loaded.model, edits):
            memo[key] = _tasks(loaded, row.removed, opts)
    return memo[key]


def known_task_results(previous: Comparison) -> TaskMemo:
    """The task results of an earlier comparison that do not depend on its calibration: the dense model's and
    every cut-only block set's (a repaired model's depend on the repair's fit, so they are measured again)."""
    known: TaskMemo = {((), CUT_ONLY): previous.dense_tasks} if previous.dense_tasks else {}
    for row in previous.rows:
        if row.repair == CUT_ONLY and row.tasks:
            known[(tuple(sorted(row.removed)), CUT_ONLY)] = row.tasks
    return known


def _tasks(loaded: LoadedModel, removed: list[int], opts: CompareOptions) -> dict[str, Any]:
    from miprun.evaluation.evaluate import run_tasks

    with skip_blocks(loaded.model, removed):
        return run_tasks(loaded, list(opts.tasks), limit=opts.limit)


def run(
    model: str | LoadedModel | None,
    out: str | Path,
    options: CompareOptions | None = None,
    *,
    update_existing: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> list[Path]:
    """Load ``model``, compare, write the outputs; returns their paths.

    With ``update_existing``, the methods run here replace their rows in ``out/comparison.json`` and the
    other methods' rows are kept (same model, data and tasks required); the earlier comparison is then
    replaced without ``overwrite``. Otherwise an existing ``out`` is replaced only with ``overwrite``, and
    only when it is an earlier comparison (see :func:`~miprun.output.comparison_report.write`).
    """
    from miprun.atomic import check_output, locked_output
    from miprun.evaluation.evaluate import check_tasks

    opts = with_overrides(options or CompareOptions(), **overrides)
    check(opts)
    check_tasks(opts.tasks)
    check_revision(model, opts.revision)
    check_sources(opts.calibration.source, opts.heldout.eval_source)
    previous = Comparison.read(Path(out) / COMPARISON_NAME) if update_existing else None
    _check_out(Path(out))
    replace = overwrite or update_existing
    inputs = inputs_of(model, opts.calibration.source, opts.heldout.eval_source)
    check_output(out, replace, inputs=inputs, manifest=COMPARISON_NAME)  # before any work
    for n in opts.num_blocks:  # against a local folder's config.json; any other source once it is loaded
        check_budget_before_load(model, [], n, None)
    with locked_output(out):
        loaded = as_loaded(model, opts.runtime, opts.sequential, revision=opts.revision)
        if loaded.path is not None:
            inputs = (*inputs, Path(loaded.path))
            check_output(out, replace, inputs=inputs, manifest=COMPARISON_NAME)
        if previous is not None:  # what is known before the run is checked before it, not an hour later
            check_setup(
                previous,
                {
                    "model": loaded.name,
                    "num_blocks_total": num_blocks(loaded.model),
                    "tasks": list(opts.tasks),
                    "task_limit": opts.limit,
                    "task_max_ppl_ratio": opts.task_max_ppl,
                },
            )
        result = compare(loaded, opts, known_task_results(previous) if previous is not None else None)
        merged = update(previous, result) if previous is not None else result
        return write(merged, out, overwrite=replace, inputs=inputs)


def _check_out(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) whose parent is writable: checked before any work."""
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"--out {out} is a file; compare writes a folder of results")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise InvalidOptionError(f"--out {out}: {parent} is not writable; choose another folder")
