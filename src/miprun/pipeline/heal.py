"""Healing, the stage after pruning: a ``miprun prune`` output distilled toward its dense parent on
``transformers.Trainer`` (:mod:`miprun.repair.heal`), measured before and after, and saved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miprun.errors import InvalidOptionError
from miprun.evaluation.heldout import HeldoutText
from miprun.model.loading import LoadedModel, as_loaded, resolve_dtype
from miprun.options import HealOptions
from miprun.output.manifest import HealRecord, HeldoutEvaluation, PrunePlan
from miprun.pipeline.prune import Destination
from miprun.pipeline.run import heldout_for, model_perplexity
from miprun.pipeline.setup import timed


@dataclass
class HealResult:
    """The healed in-memory model, its plan (with the heal recorded), and where it was saved."""

    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    out: Path


def check_work_dir(work_dir: Path, out: Path) -> None:
    """Refuse a ``work_dir`` that is ``out`` or lies inside it: the output folder is written as a whole at the
    end, so the checkpoints cannot live in it (checked before the training, not after it)."""
    work, target = work_dir.expanduser().resolve(), out.expanduser().resolve()
    if work == target or target in work.parents:
        raise InvalidOptionError(
            f"--work-dir {work_dir} is or lies inside --out {out}, which is written as a whole when the "
            "healing is done; choose a --work-dir outside --out (the default is beside it)"
        )


def plan_of(folder: Path) -> PrunePlan:
    """The pruning plan of a ``miprun prune`` output folder (heal reads its dense parent there)."""
    from miprun.output.manifest import MANIFEST_NAME

    if not (folder / MANIFEST_NAME).is_file():
        raise InvalidOptionError(
            f"{folder} is not a `miprun prune` output (it has no {MANIFEST_NAME}); heal reads the pruning plan "
            "to know the dense parent: prune with miprun first, or pass such a folder"
        )
    return PrunePlan.read(folder / MANIFEST_NAME)


def run_heal(
    folder: Path, teacher_name: str, opts: HealOptions, plan: PrunePlan, dest: Destination, work_dir: Path
) -> HealResult:
    """The stages of :func:`miprun.heal` once the options and the output folder are checked: load the
    student (and the teacher, or its cached top-k targets), measure, distil on Trainer, merge, save."""
    from miprun.model.loading import resolve_device
    from miprun.output.consistency import check_plan_matches
    from miprun.output.manifest import MANIFEST_NAME
    from miprun.output.save import SaveSettings, save
    from miprun.repair.heal import clean, teacher_targets, training_arguments
    from miprun.repair.heal import heal as distil

    out, overwrite, inputs = dest.out, dest.overwrite, dest.inputs
    assert out is not None
    timings: dict[str, float] = {}
    cpu = opts.runtime.device_map is None and resolve_device(opts.runtime.device).type == "cpu"
    args = training_arguments(opts.config, work_dir, cpu=cpu, progress=opts.progress)  # sets up the processes
    runtime = opts.runtime
    if args.world_size > 1 and not cpu and runtime.device_map is None:
        runtime = dataclasses.replace(runtime, device=str(args.device))  # each process on its own GPU
    revision = None if opts.teacher else plan.model.revision  # the parent at the version pruned
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
            work_dir, opts.config, plan.model.fingerprint, load_teacher, args, opts.progress
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
    plan.heal = HealRecord(report, label, timings, evaluation)
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
    if model_fingerprint(teacher.model) != plan.model.fingerprint:
        raise InvalidOptionError(
            f"{teacher.name} is not the model {folder} was pruned from ({plan.model.name}, fingerprint "
            f"{plan.model.fingerprint}); pass that dense model as --teacher"
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
