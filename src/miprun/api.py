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
from miprun.errors import InvalidOptionError
from miprun.estimators import Estimator
from miprun.evaluation.heldout import heldout_windows
from miprun.methods import Method, SearchInfo, run
from miprun.model.loading import LoadedModel, as_loaded, resolve_dtype
from miprun.model.perplexity import perplexity
from miprun.model.placement import input_device
from miprun.model.surgery import remove_blocks, skip_blocks
from miprun.options import CalibrationConfig, HealOptions, PruneOptions, ScoreOptions, with_overrides
from miprun.output.manifest import PrunePlan
from miprun.pipeline import (
    RunSettings,
    attach_live,
    blocks_to_remove,
    check_scores_match,
    check_seq_len,
    estimator_of,
    evidence_of,
    method_of,
    model_info,
    repair_model,
    repair_of,
    score_model,
    timed,
)
from miprun.pipeline.explicit import explicit_removal, no_calibration
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


@dataclass
class PruneResult:
    """The pruned in-memory model, its tokenizer, the plan, and where it was saved (if anywhere)."""

    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    out: Path | None = None


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
    sc = opts.scoring
    method, estimator = method_of(sc), estimator_of(sc.estimation)
    progress, cache = opts.progress and distributed.is_main(), sc.cache
    timings: dict[str, float] = {}
    with timed(timings, "load_model"):
        loaded = as_loaded(model, opts.runtime, sc.sequential)
        info = model_info(loaded)
    from miprun.methods import default_max_blocks

    reach = opts.max_blocks if opts.max_blocks is not None else default_max_blocks(info["num_blocks"])
    settings = RunSettings(
        opts.calibration, opts.runtime, progress, cache, sc.sequential, reach, opts.all_spans, timings
    )
    return score_model(loaded, method, estimator, settings)


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
    out_path = Path(out) if out is not None else None
    inputs = _inputs(model, scores, opts)
    if out_path is None or not distributed.is_main():
        return _prune(model, opts, scores, None, (overwrite, inputs))
    check_output(out_path, overwrite, inputs=inputs)  # fail before the expensive part
    check_before_load(model, opts.output, opts.blocks)  # fetches llama.cpp's converter once, if needed
    with locked_output(out_path):  # a second run to the same --out fails now, not hours later
        return _prune(model, opts, scores, out_path, (overwrite, inputs))


def _prune(
    model: str | LoadedModel | None,
    opts: PruneOptions,
    scores: ScoreResult | str | Path | None,
    out: Path | None,
    writing: tuple[bool, tuple[Path, ...]],
) -> PruneResult:
    """The stages of :func:`prune` once the options and the output are checked."""
    from miprun.atomic import check_output
    from miprun.output import gguf_checks
    from miprun.output.save import SaveSettings, save

    overwrite, inputs = writing
    sc = opts.scoring
    method, estimator, repair = method_of(sc), estimator_of(sc.estimation), repair_of(opts.repair_config)
    main = distributed.is_main()
    progress = opts.progress and main
    timings: dict[str, float] = {}
    with timed(timings, "load_model"):
        loaded = as_loaded(model, opts.runtime, sc.sequential and scores is None)
        info = model_info(loaded)
    if out is not None:
        if loaded.path is not None:
            inputs = (*inputs, Path(loaded.path))
            check_output(out, overwrite, inputs=inputs)
        gguf_checks.check_after_load(loaded, opts.output)
    n = len(opts.blocks) or blocks_to_remove(info["num_blocks"], opts.num_blocks, opts.ratio)
    spans = method.exact  # the exact optimum reads every span anyway: keep them all in the manifest
    settings = RunSettings(
        opts.calibration, opts.runtime, progress, sc.cache, sc.sequential, n, spans, timings
    )
    result: ScoreResult | None = None
    if opts.blocks:  # chosen elsewhere: no scores, no calibration pass
        removed, search = explicit_removal(opts.blocks, info["num_blocks"])
    else:
        result = _scores(loaded, (method, estimator), scores, settings, info)
        evidence = evidence_of(result)
        if method.live_keys:
            with timed(timings, "live_evidence"):
                attach_live(loaded, method, evidence, repair, settings)
        removed, search = run(method, evidence, n, opts.calibration.seed)
    if out is not None:
        gguf_checks.check_removal(loaded, opts.output, removed)  # before the repair and the cut
    timings["selection"] = search.seconds
    timings["optimum_for_comparison"] = search.optimum_seconds
    evaluation = _evaluate_before(loaded, opts, removed, repair.name != "none", main, timings)
    with timed(timings, "repair"):
        record = repair_model(loaded, repair, removed, settings)
    with timed(timings, "surgery"):
        remove_blocks(loaded.model, removed)
    if evaluation:
        with timed(timings, "evaluation"):
            evaluation["pruned_ppl"] = _perplexity(loaded, evaluation.pop("_windows"), progress)
    table = result.table if result is not None and method.uses_mi else None
    estimator_used = result.estimator if result is not None else None
    plan = PrunePlan(
        model=info,
        num_blocks_before=info["num_blocks"],
        removed=removed,
        calibration=result.calibration if result is not None else no_calibration(opts.calibration.seed),
        search=search,
        estimator=estimator_used.params() if table is not None and estimator_used is not None else None,
        scores=table.to_json() if table is not None else None,
        repair=record,
        timings=timings,
        evaluation=evaluation,
    )
    if out is not None:
        save_dtype = resolve_dtype(opts.output.save_dtype, "cpu") if opts.output.save_dtype else None
        output = opts.output
        settings_out = SaveSettings(
            overwrite, progress, save_dtype, output.out_format, output.gguf_type, inputs
        )
        save(loaded, plan, out, settings_out)
    return PruneResult(loaded.model, loaded.tokenizer, plan, out)


def _scores(
    loaded: LoadedModel,
    parts: tuple[Method, Estimator],
    scores: ScoreResult | str | Path | None,
    settings: RunSettings,
    info: dict[str, Any],
) -> ScoreResult:
    """Fresh (or cached) scores for the method, or the given scores checked against this model and text."""
    method, estimator = parts
    if scores is None:
        return score_model(loaded, method, estimator if method.uses_mi else None, settings)
    result = scores if isinstance(scores, ScoreResult) else ScoreResult.read(scores)
    check_scores_match(result, info, settings.calibration.source)
    log.info("reusing scores from %s: no calibration pass", scores)
    for phase, seconds in result.timings.items():
        settings.timings.setdefault(phase, seconds)
    return result


def _inputs(model: Any, scores: Any, opts: PruneOptions) -> tuple[Path, ...]:
    """Files and folders this run reads, which an output folder must neither be nor contain."""
    found = []
    for value in (model, scores, opts.calibration.source, opts.heldout.eval_source):
        if isinstance(value, (str, Path)) and Path(value).expanduser().exists():
            found.append(Path(value).expanduser())
    return tuple(found)


def _evaluate_before(
    loaded: LoadedModel,
    opts: PruneOptions,
    removed: list[int],
    repaired: bool,
    main: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Held-out perplexity of the dense model (and of the plain cut, when a repair follows), if asked."""
    ev = opts.heldout
    if not (opts.evaluate and main):
        return {}
    check_seq_len(loaded, ev.eval_seq_len, "--eval-seq-len")
    same = opts.calibration.source is not None and opts.calibration.source == ev.eval_source
    if same and Path(str(ev.eval_source)).expanduser().is_file():
        log.warning(
            "%s is both the calibration and the held-out text: a local file is used whole for either, so the "
            "held-out perplexity is measured on calibration text; pass another file with --eval-text",
            ev.eval_source,
        )
    with timed(timings, "evaluation"):
        text, windows = heldout_windows(loaded.tokenizer, ev.eval_source, ev.eval_seq_len, ev.eval_samples)
        out: dict[str, Any] = {
            "source": text.name,
            "fingerprint": text.fingerprint,
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "dense_ppl": _perplexity(loaded, windows, opts.progress),
            "_windows": windows,
        }
        if repaired:
            with skip_blocks(loaded.model, removed):
                out["cut_ppl"] = _perplexity(loaded, windows, opts.progress)
    return out


def _perplexity(loaded: LoadedModel, windows: torch.Tensor, progress: bool) -> float:
    return perplexity(loaded.model, windows, device=input_device(loaded.model), progress=progress)


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
    loaded: list[LoadedModel] = []

    def load_teacher() -> LoadedModel:
        with timed(timings, "load_model"):
            loaded.append(_heal_teacher(teacher_name, runtime, plan, folder))
        return loaded[-1]

    teacher: Any
    if opts.config.teacher_topk is not None:  # the teacher runs once (unless cached), then leaves memory
        teacher = teacher_targets(
            work_dir, opts.config, plan.model["fingerprint"], load_teacher, args, opts.progress
        )
        dense = (loaded or [load_teacher()])[0] if opts.evaluate else None
        evaluation = _heal_evaluation_before(None, dense, opts, timings)
        loaded.clear()
        dense = None  # the teacher leaves memory before the student comes in
        with timed(timings, "load_model"):
            student = as_loaded(str(folder), runtime)
        # the blocks against the plan; the teacher's fingerprint was checked when the targets were made
        check_plan_matches(plan, folder / MANIFEST_NAME, student.model)
        evaluation = _heal_evaluation_before(student, None, opts, timings, evaluation)
    else:
        with timed(timings, "load_model"):
            student = as_loaded(str(folder), runtime)
        teacher = load_teacher()
        check_plan_matches(plan, folder / MANIFEST_NAME, student.model, teacher.model)
        evaluation = _heal_evaluation_before(student, teacher, opts, timings)
    with timed(timings, "heal"):
        report = distil(student, teacher, opts.config, work_dir=work_dir, progress=opts.progress, args=args)
    if evaluation:
        with timed(timings, "evaluation"):
            evaluation["healed_ppl"] = _perplexity(student, evaluation.pop("_windows"), opts.progress)
    label = teacher.name if isinstance(teacher, LoadedModel) else str(teacher_name)
    plan.heal = {**report.to_json(), "teacher": label, "timings": timings, "evaluation": evaluation}
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


def _heal_teacher(name: str, runtime: Any, plan: PrunePlan, folder: Path) -> LoadedModel:
    """The dense parent, refused unless it is the model ``folder`` was pruned from."""
    from miprun.model.identity import model_fingerprint

    teacher = as_loaded(name, runtime)
    if model_fingerprint(teacher.model) != plan.model.get("fingerprint"):
        raise InvalidOptionError(
            f"{teacher.name} is not the model {folder} was pruned from ({plan.model['name']}, fingerprint "
            f"{plan.model.get('fingerprint')}); pass that dense model as --teacher"
        )
    return teacher


def _heal_evaluation_before(
    student: LoadedModel | None,
    teacher: LoadedModel | None,
    opts: HealOptions,
    timings: dict[str, float],
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Held-out perplexity of the dense and the pruned model before healing, if asked (each when given)."""
    if not opts.evaluate:
        return {}
    ev, model = opts.heldout, student or teacher
    assert model is not None
    check_seq_len(model, ev.eval_seq_len, "--eval-seq-len")
    with timed(timings, "evaluation"):
        if not evaluation:
            text, windows = heldout_windows(model.tokenizer, ev.eval_source, ev.eval_seq_len, ev.eval_samples)
            evaluation = {
                "source": text.name,
                "windows": int(windows.shape[0]),
                "seq_len": int(windows.shape[1]),
            }
            evaluation["_windows"] = windows
        if teacher is not None:
            evaluation["dense_ppl"] = _perplexity(teacher, evaluation["_windows"], opts.progress)
        if student is not None:
            evaluation["pruned_ppl"] = _perplexity(student, evaluation["_windows"], opts.progress)
        return evaluation
