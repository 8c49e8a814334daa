"""The Python API: ``score`` a model, ``select`` blocks, ``prune`` and save, ``apply_plan``. The CLI is a thin
layer on it; both take their settings from :mod:`miprun.options`.

    import miprun
    result = miprun.prune("smollm2-135m", num_blocks=3, out="out/smollm2-pruned")
    result = miprun.prune("smollm2-135m", miprun.PruneOptions(ratio=0.2, method="shortgpt"))  # or an object

Keyword overrides use the flat option names (``samples=8``, ``method="sleb"``, ``evaluate=True``); an
unknown or mistyped one fails before any work with a :class:`~miprun.errors.MiprunError`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miprun.arguments import check_argument, check_flag_argument, check_model_argument, check_path_argument
from miprun.capture import distributed
from miprun.data.sources import check_sources
from miprun.errors import InvalidOptionError
from miprun.evaluation.heldout import HeldoutText
from miprun.methods import SearchInfo, default_max_blocks, run
from miprun.model.loading import LoadedModel, as_loaded, check_revision, resolve_dtype
from miprun.model.surgery import remove_blocks
from miprun.options import (
    CalibrationConfig,
    HealOptions,
    PruneOptions,
    RepairOptions,
    ScoreOptions,
    with_overrides,
)
from miprun.output.manifest import HeldoutEvaluation, PrunePlan
from miprun.pipeline import RunSettings, blocks_to_remove, evidence_of, timed
from miprun.pipeline.explicit import check_budget_before_load
from miprun.pipeline.prune import Destination, PruneResult, run_prune
from miprun.pipeline.run import Run, Variant, heldout_for, inputs_of, model_perplexity
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
    variant = Variant.of(sc, RepairOptions())
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
    made_for = plan.model.get("name")
    found_type = getattr(getattr(model, "config", None), "model_type", None)
    want_type = plan.model.get("model_type")
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
    fingerprint = plan.model.get("fingerprint")
    if strict and fingerprint is not None and (mine := model_fingerprint(model)) != fingerprint:
        raise InvalidOptionError(
            f"the plan was made for {made_for!r} (fingerprint {fingerprint}); this model's fingerprint is "
            f"{mine}, so it is another model (or the same one in another dtype): apply the plan to the "
            "model it names, or pass strict=False if you are sure it is the same"
        )
    return remove_blocks(model, plan.removed)


@dataclass
class HealResult:
    """The healed in-memory model, its plan (with the heal recorded), and where it was saved."""

    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    out: Path


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
    plan = _plan_of(folder)
    teacher_name = opts.teacher or plan.model.get("path") or plan.model["name"]
    work_dir = Path(opts.work_dir) if opts.work_dir else out_path.parent / f".{out_path.name}.heal-work"
    inputs = tuple(p for p in (folder, Path(str(teacher_name)), Path(str(opts.config.source))) if p.exists())
    _check_work_dir(work_dir, out_path)
    if not distributed.is_main():  # under accelerate launch: only the main process writes --out
        return _heal(folder, teacher_name, opts, plan, (out_path, work_dir, overwrite, inputs))
    check_output(out_path, overwrite, inputs=inputs)
    with locked_output(out_path):
        return _heal(folder, teacher_name, opts, plan, (out_path, work_dir, overwrite, inputs))


def _check_work_dir(work_dir: Path, out: Path) -> None:
    """Refuse a ``work_dir`` that is ``out`` or lies inside it: the output folder is written as a whole at the
    end, so the checkpoints cannot live in it (checked before the training, not after it)."""
    work, target = work_dir.expanduser().resolve(), out.expanduser().resolve()
    if work == target or target in work.parents:
        raise InvalidOptionError(
            f"--work-dir {work_dir} is or lies inside --out {out}, which is written as a whole when the "
            "healing is done; choose a --work-dir outside --out (the default is beside it)"
        )


def _plan_of(folder: Path) -> PrunePlan:
    from miprun.output.manifest import MANIFEST_NAME

    if not (folder / MANIFEST_NAME).is_file():
        raise InvalidOptionError(
            f"{folder} is not a `miprun prune` output (it has no {MANIFEST_NAME}); heal reads the pruning plan "
            "to know the dense parent: prune with miprun first, or pass such a folder"
        )
    return PrunePlan.read(folder / MANIFEST_NAME)


def _heal(
    folder: Path,
    teacher_name: str,
    opts: HealOptions,
    plan: PrunePlan,
    where: tuple[Path, Path, bool, tuple[Path, ...]],
) -> HealResult:
    from miprun.model.loading import resolve_device
    from miprun.output.consistency import check_plan_matches
    from miprun.output.manifest import MANIFEST_NAME
    from miprun.output.save import SaveSettings, save
    from miprun.repair.heal import clean, teacher_targets, training_arguments
    from miprun.repair.heal import heal as distil

    out, work_dir, overwrite, inputs = where
    timings: dict[str, float] = {}
    cpu = opts.runtime.device_map is None and resolve_device(opts.runtime.device).type == "cpu"
    args = training_arguments(opts.config, work_dir, cpu=cpu, progress=opts.progress)  # sets up the processes
    runtime = opts.runtime
    if args.world_size > 1 and not cpu and runtime.device_map is None:
        runtime = dataclasses.replace(runtime, device=str(args.device))  # each process on its own GPU
    revision = None if opts.teacher else plan.model.get("revision")  # the parent at the version pruned
    loaded: list[LoadedModel] = []

    def load_teacher() -> LoadedModel:
        with timed(timings, "load_model"):
            loaded.append(_heal_teacher(teacher_name, runtime, plan, folder, revision))
        return loaded[-1]

    teacher: Any
    held: HeldoutText | None = None
    evaluation: HeldoutEvaluation | None = None
    if opts.config.teacher_topk is not None:  # the teacher runs once (unless cached), then leaves memory
        teacher = teacher_targets(
            work_dir, opts.config, plan.model["fingerprint"], load_teacher, args, opts.progress
        )
        if opts.evaluate:  # the dense perplexity while the teacher is here
            held = heldout_for((loaded or [load_teacher()])[0], opts.heldout)
            evaluation = _heal_evaluation_before(None, loaded[0], held, evaluation, opts.progress, timings)
        loaded.clear()  # the teacher leaves memory before the student comes in
        with timed(timings, "load_model"):
            student = as_loaded(str(folder), runtime)
        # the blocks against the plan; the teacher's fingerprint was checked when the targets were made
        check_plan_matches(plan, folder / MANIFEST_NAME, student.model)
        evaluation = _heal_evaluation_before(student, None, held, evaluation, opts.progress, timings)
    else:
        with timed(timings, "load_model"):
            student = as_loaded(str(folder), runtime)
        teacher = load_teacher()
        check_plan_matches(plan, folder / MANIFEST_NAME, student.model, teacher.model)
        held = heldout_for(student, opts.heldout) if opts.evaluate else None
        evaluation = _heal_evaluation_before(student, teacher, held, None, opts.progress, timings)
    with timed(timings, "heal"):
        report = distil(student, teacher, opts.config, work_dir=work_dir, progress=opts.progress, args=args)
    if evaluation is not None and held is not None:
        with timed(timings, "evaluation"):
            evaluation.healed_ppl = model_perplexity(student, held.windows, opts.progress)
    label = teacher.name if isinstance(teacher, LoadedModel) else str(teacher_name)
    plan.heal = {
        **report.to_json(),
        "teacher": label,
        "timings": timings,
        "evaluation": evaluation.to_json() if evaluation is not None else {},
    }
    if args.should_save:  # the main process; the others hold the same merged weights
        save_dtype = resolve_dtype(opts.save_dtype, "cpu") if opts.save_dtype else None
        save(
            student,
            plan,
            out,
            SaveSettings(overwrite, opts.progress, save_dtype, "transformers", inputs=inputs),
        )
        clean(work_dir)  # done: the checkpoints and cached targets served their purpose
    return HealResult(student.model, student.tokenizer, plan, out)


def _heal_teacher(
    name: str, runtime: Any, plan: PrunePlan, folder: Path, revision: str | None
) -> LoadedModel:
    """The dense parent, refused unless it is the model ``folder`` was pruned from."""
    from miprun.model.identity import model_fingerprint

    teacher = as_loaded(name, runtime, revision=revision)
    if model_fingerprint(teacher.model) != plan.model.get("fingerprint"):
        raise InvalidOptionError(
            f"{teacher.name} is not the model {folder} was pruned from ({plan.model['name']}, fingerprint "
            f"{plan.model.get('fingerprint')}); pass that dense model as --teacher"
        )
    return teacher


def _heal_evaluation_before(
    student: LoadedModel | None,
    teacher: LoadedModel | None,
    held: HeldoutText | None,
    evaluation: HeldoutEvaluation | None,
    progress: bool,
    timings: dict[str, float],
) -> HeldoutEvaluation | None:
    """Held-out perplexity of the dense (``teacher``) and the pruned model before healing, each when given,
    into ``evaluation`` (started with the dense perplexity); None when not asked (``held`` None)."""
    if held is None:
        return None
    with timed(timings, "evaluation"):
        if teacher is not None:
            evaluation = held.record(model_perplexity(teacher, held.windows, progress), fingerprint=False)
        if student is not None and evaluation is not None:
            evaluation.pruned_ppl = model_perplexity(student, held.windows, progress)
    return evaluation
