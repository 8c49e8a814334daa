"""The distillation run on ``transformers.Trainer``: its loss, its data order and its checkpoints.

Trainer brings the schedule, resume, gradient accumulation, bf16, gradient checkpointing and every
backend ``accelerate launch`` starts (DDP, FSDP). miprun adds the KL-to-teacher loss, a fixed data order
(windows in their seeded draw order, so a global batch holds the same windows however many processes
share it) and checkpoints that are complete or ignored (:mod:`miprun.repair.heal.checkpoints`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from miprun.errors import InvalidOptionError, NonFiniteError
from miprun.model.placement import input_device
from miprun.options import HealConfig
from miprun.repair.heal import checkpoints
from miprun.repair.heal.loss import distill_loss, top_k_distill_loss

log = logging.getLogger(__name__)


def training_arguments(config: HealConfig, work_dir: Path, *, cpu: bool, progress: bool) -> TrainingArguments:
    """Trainer's arguments for ``config``: ``batch_size`` windows per optimizer step across all processes.

    Building them sets up the processes ``accelerate launch`` (or ``torchrun``) started, so a caller that
    must coordinate them before training (the teacher's cached targets) builds these first.
    """
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=config.steps,
        per_device_train_batch_size=1,  # set below, once the number of processes is known
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.lr,
        lr_scheduler_type="cosine_with_min_lr",  # cosine decay to a tenth; no warm-up: LoRA starts at 0
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping, as the measured defaults were tuned without it
        optim="adamw_torch",
        seed=config.seed,
        bf16=config.bf16,
        # FSDP checkpoints activations itself (Trainer refuses both); inputs of frozen embeddings need no grad
        activation_checkpointing=config.gradient_checkpointing and not config.fsdp,
        activation_checkpointing_kwargs={"use_reentrant": False},
        fsdp=True if config.fsdp else None,  # type: ignore[arg-type]  # annotated str, documented True
        fsdp_config={"version": 2, "activation_checkpointing": config.gradient_checkpointing}
        if config.fsdp
        else None,
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=None,  # old checkpoints go only once a newer one is complete (checkpoints.complete)
        logging_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=[],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=cpu,
    )
    per_step = args.world_size * config.gradient_accumulation
    if config.batch_size % per_step:
        raise InvalidOptionError(
            f"batch_size (--batch-size) {config.batch_size} does not split evenly over {args.world_size} "
            f"process(es) x {config.gradient_accumulation} accumulation step(s); pass a multiple of {per_step}"
        )
    args.per_device_train_batch_size = config.batch_size // per_step
    return args


@dataclass
class RunState:
    """What the run keeps beside Trainer's state: the key its checkpoints are checked against, every step's KL."""

    key: dict[str, Any]
    losses: list[float] = field(default_factory=list)


class DistillTrainer(Trainer):
    """Trainer with the KL-to-teacher loss (full logits from a teacher in memory, or cached top-k targets)."""

    def __init__(self, *args: Any, teacher: nn.Module | None, temperature: float, run: RunState, **kw: Any):
        super().__init__(*args, **kw)
        self.teacher, self.temperature, self.run = teacher, temperature, run
        # A per-batch mean: Trainer divides it by the accumulation steps, and scales it by nothing else.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._kl: torch.Tensor | None = None
        self._micro: list[torch.Tensor] = []

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ids = inputs["input_ids"]  # (batch, seq)
        outputs = model(input_ids=ids, use_cache=False)
        if "top_values" in inputs:
            kl = top_k_distill_loss(
                outputs.logits,
                inputs["top_values"],
                inputs["top_indices"],
                inputs["top_tail"],
                self.temperature,
            )
        else:
            assert self.teacher is not None
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=ids.to(input_device(self.teacher)), use_cache=False
                ).logits
            kl = distill_loss(outputs.logits, teacher_logits.to(outputs.logits.device), self.temperature)
        self._kl = kl.detach()
        loss = kl * self.temperature**2  # T^2 keeps the gradient scale independent of the temperature
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        assert self._kl is not None
        self._micro.append(
            self.accelerator.reduce(self._kl.float().reshape(1), "mean")
        )  # all processes agree
        if len(self._micro) == self.current_gradient_accumulation_steps:
            kl = float(torch.cat(self._micro).mean().item())
            self._micro.clear()
            if not math.isfinite(kl):
                raise NonFiniteError(
                    f"the healing loss (KL to the teacher) became {kl} at learning rate "
                    f"{self._get_learning_rate():.2g}; lower --lr and start again in a new --work-dir"
                )
            self.run.losses.append(kl)
        return loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        """The windows in their seeded draw order: consecutive batches of the processes make a global batch."""
        dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process wrote its part (RNG states)
        step = self.state.global_step
        if self.args.should_save:
            checkpoints.complete(Path(str(self.args.output_dir)) / f"{checkpoints.PREFIX}{step}", self.run.key, step,
                                 self.run.losses)  # fmt: skip
            recent = self.run.losses[-int(self.args.save_steps) :]
            log.info(
                "heal step %d: KL %.4f nats/token (mean of the last %d steps), checkpoint written",
                step, sum(recent) / max(1, len(recent)), len(recent),
            )  # fmt: skip
        self.accelerator.wait_for_everyone()


class StepHook(TrainerCallback):
    """Calls ``on_step(step, kl, model)`` after every optimizer step (for measurements and tests)."""

    def __init__(
        self, on_step: Callable[[int, float, nn.Module], None], run: RunState, model: nn.Module
    ) -> None:
        self.on_step, self.run, self.model = on_step, run, model

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_step(state.global_step, self.run.losses[-1], self.model)


@contextmanager
def without_dropout(model: nn.Module) -> Iterator[None]:
    """No dropout anywhere in ``model`` while Trainer holds it in train mode (restored after): the same windows
    give the same gradients in any number of processes, and a resumed run repeats an uninterrupted one."""
    saved: list[tuple[nn.Module, str, float]] = []
    for module in model.modules():
        for name in ("p", "attention_dropout", "dropout"):
            value = getattr(module, name, None) if name != "p" or isinstance(module, nn.Dropout) else None
            if isinstance(value, float) and value > 0:
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
