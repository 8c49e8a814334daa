"""One healing run: wrap the student in LoRA adapters, distil on Trainer, merge the adapters back.

The student (pruned) learns the teacher's (dense) next-token distributions on calibration windows through
LoRA adapters on the linear layers of its decoder blocks; the adapters are then merged, so the result is a
stock checkpoint with exactly the student's parameter names and shapes. The same call resumes from the
newest complete checkpoint in ``work_dir`` made for the same models and settings, and refuses others.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miprun.atomic import interrupts_as_keyboard_interrupt
from miprun.errors import InvalidOptionError
from miprun.model.identity import model_fingerprint, tensor_fingerprint
from miprun.model.layouts import decoder_layers, is_linear, layers_parent
from miprun.model.loading import LoadedModel
from miprun.model.placement import input_device
from miprun.options import HealConfig
from miprun.repair.heal import checkpoints
from miprun.repair.heal.data import TARGETS_NAME, HealWindows, TeacherTargets, cached_targets, check_windows
from miprun.repair.heal.data import heal_windows as _windows
from miprun.repair.heal.trainer import DistillTrainer, RunState, StepHook, training_arguments, without_dropout
from miprun.repair.heal_report import HealReport

log = logging.getLogger(__name__)

# The settings that change the result (checkpoint_every, gradient_accumulation and the processes do not).
_RESULT_FIELDS: tuple[str, ...] = ("tokens", "seq_len", "batch_size", "lr", "rank", "temperature", "seed")
_RESULT_FIELDS += ("source", "bf16", "teacher_topk")


def linear_modules(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (``nn.Linear``, and GPT-2's ``Conv1D``)."""
    parent, attr = layers_parent(model)
    prefix = next(name for name, module in model.named_modules() if module is parent)
    blocks = f"{prefix}.{attr}" if prefix else attr
    return [
        f"{blocks}.{i}.{name}"
        for i, layer in enumerate(decoder_layers(model))
        for name, module in layer.named_modules()
        if is_linear(module)
    ]


def heal(
    student: LoadedModel,
    teacher: LoadedModel | TeacherTargets,
    config: HealConfig,
    *,
    work_dir: Path,
    progress: bool = True,
    on_step: Callable[[int, float, nn.Module], None] | None = None,
    args: Any = None,
) -> HealReport:
    """Distil ``teacher`` into ``student`` through LoRA adapters, then merge them into ``student.model``.

    ``teacher`` is the dense model, or its top-k targets (:func:`teacher_targets`) so that it need not be in
    memory; with ``config.teacher_topk`` and a model, the targets are computed (and cached in ``work_dir``)
    first. ``on_step(step, kl, model)`` runs after every optimizer step. ``args``: Trainer's arguments from
    :func:`training_arguments` (built here when None). An interrupt leaves the last complete checkpoint and
    ``student.model`` as it was passed in.
    """
    work_dir = Path(work_dir)
    s_model = student.model
    args = args or training_arguments(
        config, work_dir, cpu=input_device(s_model).type == "cpu", progress=progress
    )
    if isinstance(teacher, LoadedModel):
        _check_pair(s_model, teacher.model)
        if config.teacher_topk is not None:
            dense = teacher
            teacher = teacher_targets(
                work_dir, config, model_fingerprint(dense.model), lambda: dense, args, progress
            )
    windows, text_fingerprint = _windows(student.tokenizer, config)
    t_model: nn.Module | None = None
    targets: TeacherTargets | None = None
    if isinstance(teacher, LoadedModel):
        t_model, teacher_fingerprint = teacher.model, model_fingerprint(teacher.model)
    else:
        check_windows(teacher, windows)
        targets, teacher_fingerprint = teacher, teacher.teacher
    key = {
        "student": model_fingerprint(s_model),
        "teacher": teacher_fingerprint,
        "text": text_fingerprint,
        "windows": tensor_fingerprint(windows),
        **{name: getattr(config, name) for name in _RESULT_FIELDS},
    }
    if args.should_save:
        checkpoints.drop_unfinished(work_dir)
    _barrier(args)  # no process looks for a checkpoint before the main one dropped the unfinished ones
    found = checkpoints.latest(work_dir, key)
    run = RunState(key, [float(x) for x in found[1]["losses"]] if found else [])
    targets_modules = linear_modules(s_model)
    with (
        _seeded_rng(config.seed, input_device(s_model)),
        _adapters(s_model, targets_modules, config) as peft_model,
        without_dropout(peft_model),
        interrupts_as_keyboard_interrupt(),
    ):
        trainer = _trainer(peft_model, args, HealWindows(windows, targets), t_model, config, run, on_step)
        log.info(
            "healing on %d process(es) (%s), %d window(s) per process and pass",
            args.world_size, trainer.accelerator.distributed_type, args.per_device_train_batch_size,
        )  # fmt: skip
        if found:
            log.info("resuming the healing run in %s at step %d", work_dir, found[1]["step"])
        start, wall, cpu = (found[1]["step"] if found else 0), time.perf_counter(), time.process_time()
        try:
            trainer.train(resume_from_checkpoint=str(found[0]) if found else None)
        except KeyboardInterrupt:
            done = [p for p in checkpoints.checkpoints(work_dir) if (p / checkpoints.MARKER).is_file()]
            log.warning(
                "healing stopped; %s",
                f"the newest complete checkpoint in {work_dir} is {done[-1].name}, and the same call resumes "
                "from it" if done else "no checkpoint was written yet",
            )  # fmt: skip
            raise
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        trainer.accelerator.free_memory()
        del trainer
        if config.gradient_checkpointing:
            s_model.activation_checkpointing_disable()
        _gather_shards(peft_model)  # after FSDP: whole weights in every process before the merge
        peft_model.merge_and_unload()  # student.model now holds the merged weights, stock names and shapes
    log.info(
        "healed %s: %d steps (%d this call), KL %.4f -> %.4f nats/token, %.0f s",
        student.name, config.steps, config.steps - start, run.losses[0], run.losses[-1], seconds,
    )  # fmt: skip
    return HealReport(
        steps=config.steps,
        tokens=config.steps * config.batch_size * config.seq_len,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        loss_start=run.losses[0],
        loss_end=run.losses[-1],
        resumed=found is not None,
        resumed_at_step=start,
        config=dataclasses.replace(config),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in targets_modules}),
        trainable_parameters=trainable,
        losses=list(run.losses),
        processes=args.world_size,
    )


def _trainer(
    model: nn.Module,
    args: Any,
    data: HealWindows,
    teacher: nn.Module | None,
    config: HealConfig,
    run: RunState,
    on_step: Callable[[int, float, nn.Module], None] | None,
) -> DistillTrainer:
    """Trainer for one run, with the step hook, and without the printed log dicts when progress is off."""
    from transformers.trainer_callback import PrinterCallback

    trainer = DistillTrainer(
        model=model, args=args, train_dataset=data, teacher=teacher, temperature=config.temperature, run=run
    )
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
    if on_step is not None:
        trainer.add_callback(StepHook(on_step, run, model))
    return trainer


def teacher_targets(
    work_dir: Path,
    config: HealConfig,
    teacher_fingerprint: str,
    load_teacher: Callable[[], LoadedModel],
    args: Any = None,
    progress: bool = False,
) -> TeacherTargets:
    """The teacher's top-k targets, cached in ``work_dir``: the main process computes them (loading the
    teacher only then), the others wait and read the file. ``args``: Trainer's, None in a single process."""
    first = args.main_process_first(desc="the teacher's top-k targets") if args is not None else nullcontext()
    with first:
        return cached_targets(
            Path(work_dir) / TARGETS_NAME, config, teacher_fingerprint, load_teacher, progress
        )


def _gather_shards(model: nn.Module) -> None:
    """Replace FSDP2's sharded parameters (DTensors) by whole ones, in every process (a no-op without FSDP).

    Not run here: accelerate applies FSDP only on GPUs, and the machines that test miprun have none.
    """
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                whole = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                module.register_parameter(name, whole)


def _barrier(args: Any) -> None:
    """Wait for every process (a no-op in a single one)."""
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_pair(student: Any, teacher: Any) -> None:
    """Refuse a student that is the teacher itself, or whose vocabulary differs from the teacher's."""
    if student is teacher:
        raise InvalidOptionError(
            "the student and the teacher are the same model object; pass the pruned model as the student "
            "and a separately loaded dense parent as the teacher"
        )
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise InvalidOptionError(
            f"the student predicts {sizes[0]} tokens and the teacher {sizes[1]}: healing distils the dense "
            "parent of the pruned model, so pass the model that `miprun prune` started from as the teacher"
        )


@contextmanager
def _adapters(model: nn.Module, targets: list[str], config: HealConfig) -> Iterator[Any]:
    """``model`` wrapped with fresh seeded LoRA adapters on ``targets``; unwrapped again if not merged."""
    from peft import LoraConfig, get_peft_model

    if not targets:
        raise InvalidOptionError(
            "found no linear layer (nn.Linear or Conv1D) inside the decoder blocks to adapt; healing "
            "needs them, so this architecture cannot be healed yet"
        )
    conv1d = not isinstance(model.get_submodule(targets[0]), nn.Linear)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=2 * config.rank,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        bias="none",
    )
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config_of: Any = getattr(model, "config", None)
    training, use_cache = model.training, getattr(config_of, "use_cache", None)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora)  # adapters drawn from the run's seeded RNG
    merged = False
    try:
        yield peft_model
        merged = True
    finally:
        if not merged:
            peft_model.unload()  # remove the adapters unmerged: the caller's model is as it was
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])  # peft froze the base weights
        model.train(training)  # Trainer left it in train mode
        if use_cache is not None:
            config_of.use_cache = use_cache  # and switched the cache off


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The run's own RNG, seeded: the caller's (torch's on the CPU and the student's CUDA device, and Python's
    and numpy's, which Trainer seeds too) is restored after."""
    import random

    import numpy as np

    cuda = [device.index or 0] if device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
