"""``prune``: one variant through every stage of a :class:`~miprun.pipeline.run.Run`, then saved.

load -> scores (or --scores, or --blocks) -> select -> [held-out: dense, cut] -> repair -> cut
     -> [held-out: pruned] -> plan -> save
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from miprun.capture import distributed
from miprun.errors import UnsupportedArchitectureError
from miprun.evaluation.heldout import HeldoutText
from miprun.model.loading import LoadedModel, resolve_dtype
from miprun.model.surgery import skip_blocks
from miprun.options import PruneOptions, RepairOptions
from miprun.output.manifest import HeldoutEvaluation, PrunePlan
from miprun.pipeline.explicit import explicit_removal, no_calibration
from miprun.pipeline.run import Run, Selection, Variant
from miprun.pipeline.setup import RunSettings, blocks_to_remove, repair_of, timed
from miprun.repair import RepairRecord
from miprun.scores import ScoreResult

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned in-memory model, its tokenizer, the plan, and where it was saved (if anywhere)."""

    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    out: Path | None = None


@dataclass
class Destination:
    """Where a prune writes, and what it may replace: ``out`` (None: nowhere), ``overwrite``, the run's inputs."""

    out: Path | None = None
    overwrite: bool = False
    inputs: tuple[Path, ...] = ()


def run_prune(
    model: str | LoadedModel | None,
    opts: PruneOptions,
    scores: ScoreResult | str | Path | None,
    dest: Destination,
) -> PruneResult:
    """The stages of :func:`miprun.prune` once the options and the output folder are checked."""
    from miprun.atomic import check_output
    from miprun.output import gguf_checks

    sc = opts.scoring
    variant = Variant.of(sc, opts.repair_config)
    progress = opts.progress and distributed.is_main()
    settings = RunSettings(opts.calibration, opts.runtime, progress, sc.cache, sc.sequential)
    run = Run.load(model, settings, layerwise=sc.sequential and scores is None, revision=opts.revision)
    variant = _repair_for(run, variant, opts.repair_config)
    if dest.out is not None:
        if run.loaded.path is not None:
            dest.inputs = (*dest.inputs, Path(run.loaded.path))
            check_output(dest.out, dest.overwrite, inputs=dest.inputs)
        gguf_checks.check_after_load(run.loaded, opts.output)
    n = len(opts.blocks) or blocks_to_remove(run.num_blocks, opts.num_blocks, opts.ratio)
    # the exact optimum reads every span anyway: keep them all in the manifest
    run.reaching(n).settings.all_spans = variant.method.exact
    result: ScoreResult | None = None
    if opts.blocks:  # chosen elsewhere: no scores, no calibration pass
        chosen = Selection(*explicit_removal(opts.blocks, run.num_blocks))
    else:
        result = run.scores(variant, scores)
        chosen = run.select(variant, run.evidence(variant, result), n)
    if dest.out is not None:
        gguf_checks.check_removal(run.loaded, opts.output, chosen.removed)  # before the repair and the cut
    run.timings["selection"] = chosen.search.seconds
    run.timings["optimum_for_comparison"] = chosen.search.optimum_seconds
    held = _heldout(run, opts)
    evaluation = _evaluate_before(run, held, chosen.removed, variant.repair.changes_weights)
    record = run.repair(variant.repair, chosen.removed)
    run.cut(chosen.removed)
    if evaluation is not None and held is not None:
        with timed(run.timings, "evaluation"):
            evaluation.pruned_ppl = run.perplexity(held.windows)
    plan = _plan(run, variant, chosen, result, record, evaluation)
    if dest.out is not None:
        from miprun.output.save import SaveSettings, save

        output = opts.output
        save_dtype = resolve_dtype(output.save_dtype, "cpu") if output.save_dtype else None
        saving = SaveSettings(
            dest.overwrite, progress, save_dtype, output.out_format, output.gguf_type, dest.inputs
        )
        save(run.loaded, plan, dest.out, saving)
    return PruneResult(run.loaded.model, run.loaded.tokenizer, plan, dest.out)


def _plan(
    run: Run,
    variant: Variant,
    chosen: Selection,
    result: ScoreResult | None,
    record: RepairRecord,
    evaluation: HeldoutEvaluation | None,
) -> PrunePlan:
    """The manifest of the run: MI scores only when the method read them."""
    reads_mi = result is not None and variant.method.uses_mi
    table = result.table if result is not None and reads_mi else None
    estimator = result.estimator if result is not None and table is not None else None
    calibration = result.calibration if result is not None else no_calibration(run.settings.calibration.seed)
    return PrunePlan(
        model=run.info,
        num_blocks_before=run.num_blocks,
        removed=chosen.removed,
        calibration=calibration,
        search=chosen.search,
        estimator=estimator.params() if estimator is not None else None,
        scores=table.to_json() if table is not None else None,
        repair=record,
        timings=run.timings,
        evaluation=evaluation,
    )


def _heldout(run: Run, opts: PruneOptions) -> HeldoutText | None:
    """The held-out windows with ``--eval`` (on the main process only); None without."""
    ev = opts.heldout
    if not (opts.evaluate and distributed.is_main()):
        return None
    same = opts.calibration.source is not None and opts.calibration.source == ev.eval_source
    if same and Path(str(ev.eval_source)).expanduser().is_file():
        log.warning(
            "%s is both the calibration and the held-out text: a local file is used whole for either, so the "
            "held-out perplexity is measured on calibration text; pass another file with --eval-text",
            ev.eval_source,
        )
    with timed(run.timings, "evaluation"):
        return run.heldout(ev)


def _repair_for(run: Run, variant: Variant, options: RepairOptions) -> Variant:
    """The variant, or without a repair where the default one cannot repair this model (said in the log);
    a repair asked for by name that cannot is refused before any work."""
    why = variant.repair.unsupported(run.loaded.model)
    if why is None:
        return variant
    if options.repair is not None:
        raise UnsupportedArchitectureError(why)
    log.warning(
        "no repair after the cut (the default, %s, does not apply here: %s)", variant.repair.name, why
    )
    return replace(variant, repair=repair_of(replace(options, repair="none")))


def _evaluate_before(
    run: Run, held: HeldoutText | None, removed: list[int], repaired: bool
) -> HeldoutEvaluation | None:
    """Held-out perplexity of the dense model, and of the plain cut when a repair follows."""
    if held is None:
        return None
    with timed(run.timings, "evaluation"):
        evaluation = held.record(run.perplexity(held.windows))
        if repaired:
            with skip_blocks(run.loaded.model, removed):
                evaluation.cut_ppl = run.perplexity(held.windows)
    return evaluation
