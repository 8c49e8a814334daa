"""The Python API: ``score`` a model, ``select`` blocks, ``prune`` and save, ``apply_plan``. The CLI is a thin
layer on it; both take their settings from :mod:`miprun.options`.

    import miprun
    result = miprun.prune("smollm2-135m", num_blocks=3, out="out/smollm2-pruned")
    result = miprun.prune("smollm2-135m", miprun.PruneOptions(ratio=0.2, method="shortgpt"))  # or an object

Keyword overrides use the flat option names (``samples=8``, ``method="sleb"``, ``evaluate=True``); an
unknown or mistyped one fails before any work with a :class:`~miprun.errors.MiprunError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from miprun.arguments import check_argument, check_flag_argument, check_path_argument
from miprun.capture import distributed
from miprun.data.sources import check_sources
from miprun.errors import InvalidOptionError
from miprun.methods import SearchInfo, default_max_blocks, run
from miprun.model.loading import LoadedModel, check_model_argument, check_revision
from miprun.model.surgery import remove_blocks
from miprun.options import (
    CalibrationConfig,
    HealOptions,
    PruneOptions,
    RepairOptions,
    ScoreOptions,
    with_overrides,
)
from miprun.output.manifest import PrunePlan
from miprun.pipeline import RunSettings, blocks_to_remove, evidence_of
from miprun.pipeline.explicit import check_budget_before_load
from miprun.pipeline.heal import HealResult, check_work_dir, plan_of, run_heal
from miprun.pipeline.prune import Destination, PruneResult, run_prune
from miprun.pipeline.run import Run, Variant, inputs_of
from miprun.scores import ScoreResult

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationConfig",
    "HealOptions",
    "HealResult",
    "PruneOptions",
    "PruneResult",
    "ScoreOptions",
    "apply_plan",
    "heal",
    "prune",
    "score",
    "select",
]


def score(
    model: str | LoadedModel | None = None, options: ScoreOptions | None = None, **overrides: Any
) -> ScoreResult:
    """One dense calibration pass, then the MI of every block and span and the method's own evidence.

    Args:
        model: embedded name, local folder, ``.gguf`` file, hub name, a :class:`LoadedModel`, or None for
            the embedded default.
        options: every setting (defaults: :class:`~miprun.options.ScoreOptions`); ``overrides`` replace
            fields by flat name (``samples=8``, ``method="sleb"``, ``max_blocks=6``).

    The result serves any N and method that reads what it holds; with ``cache`` (default) it is stored
    under the cache folder and reused by a later call with the same model, windows and settings. Under
    ``torchrun`` each process captures its share and every process returns the merged result.
    """
    check_model_argument("score", model)
    check_argument("score", "options", options, (ScoreOptions, None), "a ScoreOptions or None")
    opts = with_overrides(options or ScoreOptions(), **overrides)
    check_revision(model, opts.revision)  # refusals that need no model, before it is loaded
    check_sources(opts.calibration.source)
    sc = opts.scoring
    variant = Variant.of(sc, RepairOptions(repair="none"))  # scores serve any repair
    settings = RunSettings(
        opts.calibration, opts.runtime, opts.progress and distributed.is_main(), sc.cache, sc.sequential
    )
    settings.all_spans = opts.all_spans
    run = Run.load(model, settings, layerwise=sc.sequential, revision=opts.revision)
    reach = opts.max_blocks if opts.max_blocks is not None else default_max_blocks(run.num_blocks)
    return run.reaching(reach).scores(variant, mi=True)


def select(
    scores: ScoreResult,
    num_blocks: int | None = None,
    *,
    ratio: float | None = None,
    method: str = "mi-prun",
    seed: int = 0,
    **method_params: Any,
) -> tuple[list[int], SearchInfo]:
    """Choose the blocks to remove from existing scores; no forward pass (``seed`` drives ``random``)."""
    from miprun import methods

    check_argument("select", "scores", scores, (ScoreResult,), "a ScoreResult (from miprun.score)")
    check_argument("select", "num_blocks", num_blocks, (int, None), "a whole number or None")
    check_argument("select", "ratio", ratio, (float, int, None), "a number or None")
    check_argument("select", "method", method, (str,), "a method name")
    check_argument("select", "seed", seed, (int,), "a whole number")
    n = blocks_to_remove(scores.num_blocks, num_blocks, ratio)
    return run(methods.build(method, method_params), evidence_of(scores), n, seed)


def prune(
    model: str | LoadedModel | None = None,
    options: PruneOptions | None = None,
    *,
    scores: ScoreResult | str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> PruneResult:
    """Score (or reuse ``scores``), select N blocks, repair, remove them, evaluate, and save to ``out``.

    Args:
        options: every setting (:class:`~miprun.options.PruneOptions`); ``overrides`` replace fields by
            flat name: ``num_blocks=3``, ``ratio=0.2``, ``method="shortgpt"``, ``repair="linear"``,
            ``evaluate=True``, ``samples=8`` ...
        scores: a :class:`ScoreResult` or the path of a ``miprun score`` file: no calibration pass.
        out: folder to write the pruned checkpoint, ``miprun.json`` and the report into (atomically);
            ``overwrite`` replaces an earlier miprun output there, never anything else.

    With ``evaluate``, held-out perplexity of the dense, the cut (when repaired) and the final model is
    measured on text disjoint from the calibration text. Under ``torchrun`` every process calibrates its
    share and selects the same blocks; only the main process evaluates, saves and shows progress.
    """
    from miprun.atomic import check_output, locked_output
    from miprun.output.gguf_checks import check_before_load

    check_model_argument("prune", model)
    check_argument("prune", "options", options, (PruneOptions, None), "a PruneOptions or None")
    scores_types = (ScoreResult, str, Path, None)
    check_argument(
        "prune", "scores", scores, scores_types, "a ScoreResult, the path of a scores file, or None"
    )
    check_path_argument("prune", "out", out, optional=True)
    check_flag_argument("prune", "overwrite", overwrite)
    opts = with_overrides(options or PruneOptions(), **overrides)
    opts.check_budget()
    if opts.blocks and scores is not None:
        raise InvalidOptionError(
            "blocks (--blocks) names the removal set, and scores (--scores) are for choosing one; pass one of them"
        )
    inputs = inputs_of(model, scores, opts.calibration.source, opts.heldout.eval_source)
    check_revision(model, opts.revision)  # refusals that need no model, before it is loaded
    check_sources(opts.calibration.source, *([opts.heldout.eval_source] if opts.evaluate else []))
    check_budget_before_load(model, opts.blocks, opts.num_blocks, opts.ratio)
    if scores is not None and not isinstance(scores, ScoreResult):
        scores = ScoreResult.read(scores)  # a missing or damaged file; whether it fits the model comes later
    if out is None or not distributed.is_main():
        return run_prune(model, opts, scores, Destination(None, overwrite, inputs))
    out_path = Path(out)
    check_output(out_path, overwrite, inputs=inputs)  # fail before the expensive part
    check_before_load(model, opts.output, opts.blocks, opts.revision)  # fetches llama.cpp's converter once
    with locked_output(out_path):  # a second run to the same --out fails now, not hours later
        return run_prune(model, opts, scores, Destination(out_path, overwrite, inputs))


def apply_plan(
    model: torch.nn.Module, plan: PrunePlan | str | Path, *, strict: bool = True
) -> torch.nn.Module:
    """Re-apply a saved plan (``miprun.json``) to the dense base model it was made for.

    The plan is checked against ``model`` first: its architecture, its number of blocks and (with
    ``strict``, the default) the fingerprint of the dense model it was made from; ``strict=False`` skips
    only the fingerprint (the same model loaded in another dtype fingerprints differently).
    A plan whose repair changed weights cannot be replayed from the plan alone: the pruned folder itself
    holds the repaired weights (load it with ``from_pretrained``).
    """
    from miprun.model.identity import model_fingerprint
    from miprun.model.layouts import num_blocks

    check_argument("apply_plan", "model", model, (torch.nn.Module,), "a torch.nn.Module (the dense model)")
    plan_types = (PrunePlan, str, Path)
    check_argument("apply_plan", "plan", plan, plan_types, "a PrunePlan or the path of a miprun.json")
    check_flag_argument("apply_plan", "strict", strict)
    from miprun.output.consistency import check_removed

    path = Path(plan) if not isinstance(plan, PrunePlan) else Path("(the PrunePlan given)")
    plan = plan if isinstance(plan, PrunePlan) else PrunePlan.read(path)
    check_removed(plan.num_blocks_before, plan.removed, path)
    made_for = plan.model.name
    found_type = getattr(getattr(model, "config", None), "model_type", None)
    want_type = plan.model.model_type
    if want_type is not None and found_type != want_type:
        raise InvalidOptionError(
            f"the plan was made for {made_for!r}, a {want_type} model; this model is a {found_type}: apply "
            "it to the dense model it was made for"
        )
    found = num_blocks(model)
    if found != plan.num_blocks_before:
        raise InvalidOptionError(
            f"the plan is for a model with {plan.num_blocks_before} blocks; this one has {found}"
        )
    if plan.heal is not None:
        raise InvalidOptionError(
            "the plan's model was healed (distilled toward the dense model), which changed its weights; load "
            "the healed folder itself (AutoModelForCausalLM.from_pretrained(FOLDER))"
        )
    if plan.repair.replay != "none":
        raise InvalidOptionError(
            f"the plan's repair {plan.repair.name!r} changed {len(plan.repair.changed)} weights that the plan "
            "does not hold; load the pruned folder itself (AutoModelForCausalLM.from_pretrained(FOLDER)), or "
            f"prune the dense model again with --repair {plan.repair.name}"
        )
    fingerprint = plan.model.fingerprint
    if strict and fingerprint is not None and (mine := model_fingerprint(model)) != fingerprint:
        raise InvalidOptionError(
            f"the plan was made for {made_for!r} (fingerprint {fingerprint}); this model's fingerprint is "
            f"{mine}, so it is another model (or the same one in another dtype): apply the plan to the "
            "model it names, or pass strict=False if you are sure it is the same"
        )
    return remove_blocks(model, plan.removed)


def heal(
    model: str | Path,
    options: HealOptions | None = None,
    *,
    out: str | Path,
    overwrite: bool = False,
    **overrides: Any,
) -> HealResult:
    """Distil a pruned model (a ``miprun prune`` output folder) toward its dense parent, and save it.

    LoRA adapters on every linear layer of every block learn the dense model's next-token distribution
    (KL) on calibration text, then are merged: the result is a stock checkpoint of the pruned model's shape.
    Checkpoints go to ``work_dir`` (beside ``out`` by default) and a rerun of the same call resumes.
    ``overrides`` replace :class:`~miprun.options.HealOptions` fields by flat name (``tokens=8192``).
    """
    from miprun.atomic import check_output, locked_output

    check_path_argument("heal", "model", model)
    check_argument("heal", "options", options, (HealOptions, None), "a HealOptions or None")
    check_path_argument("heal", "out", out)
    check_flag_argument("heal", "overwrite", overwrite)
    opts = with_overrides(options or HealOptions(), **overrides)
    folder, out_path = Path(model).expanduser(), Path(out)
    plan = plan_of(folder)
    teacher_name = opts.teacher or plan.model.path or plan.model.name
    work_dir = Path(opts.work_dir) if opts.work_dir else out_path.parent / f".{out_path.name}.heal-work"
    inputs = tuple(p for p in (folder, Path(str(teacher_name)), Path(str(opts.config.source))) if p.exists())
    check_work_dir(work_dir, out_path)
    dest = Destination(out_path, overwrite, inputs)
    if not distributed.is_main():  # under accelerate launch: only the main process writes --out
        return run_heal(folder, teacher_name, opts, plan, dest, work_dir)
    check_output(out_path, overwrite, inputs=inputs)
    with locked_output(out_path):
        return run_heal(folder, teacher_name, opts, plan, dest, work_dir)
