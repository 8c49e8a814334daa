"""Healing after the cut: a short distillation of the pruned model toward its dense parent.

The student (pruned) learns the teacher's (dense) next-token distributions on calibration windows through
LoRA adapters on the linear layers of its decoder blocks; the adapters are then merged, so the result is a
stock checkpoint with exactly the student's parameter names and shapes. Every ``checkpoint_every`` steps the
adapters, the optimizer state, the step and the RNG state go into one safetensors file in ``work_dir``
(written atomically; the rest as JSON in its metadata), and a later call with the same models and settings
resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from miprun.atomic import atomic_write_bytes, interrupts_as_keyboard_interrupt
from miprun.data import eval_windows, load_text, token_windows
from miprun.errors import InvalidOptionError, MiprunError, NonFiniteError
from miprun.model.identity import model_fingerprint, tensor_fingerprint
from miprun.model.layouts import decoder_layers, is_linear, layers_parent
from miprun.model.loading import LoadedModel
from miprun.model.placement import input_device
from miprun.options import HealConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "heal-checkpoint.safetensors"
FORMAT = 1
_RESULT_FIELDS = ("tokens", "seq_len", "batch_size", "lr", "rank", "temperature", "seed", "source")


class HealCheckpointError(MiprunError, ValueError):
    """``work_dir`` holds a healing checkpoint made for another student, teacher or settings."""


@dataclass
class HealReport:
    """What a healing run did: steps and tokens in all (resumed ones included), this call's time, the loss."""

    steps: int
    tokens: int
    seconds: float  # wall time of this call's training
    cpu_seconds: float  # process CPU time of this call's training (all threads)
    loss_start: float  # KL(teacher || student) in nats per token, first batch of the run
    loss_end: float  # the same on the last batch
    resumed: bool
    resumed_at_step: int
    config: HealConfig
    target_modules: list[str] = field(default_factory=list)  # suffixes of the adapted linear layers
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)  # every step's KL, in order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- pure parts


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (unmasked) positions of KL(teacher || student) at ``temperature``, in nats, float32.

    Args:
        student_logits, teacher_logits: (batch, seq, vocab) logits of the same positions.
        mask: (batch, seq), true where a position counts (not padding); all count when None.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (batch, seq)
    if mask is None:
        return kl.mean()
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1.0)


def lr_at(step: int, total: int, lr: float) -> float:
    """Cosine decay from ``lr`` at step 0 to ``lr / 10`` at the last step (no warm-up: LoRA starts at 0)."""
    progress = step / max(1, total - 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


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


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """The state of one healing run: what a checkpoint holds, and what it is checked against."""

    key: dict[str, Any]  # fingerprints of the models and text, and the settings that change the result
    params: dict[str, nn.Parameter]  # the adapters, by name
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    saved: int = 0  # the step of the last checkpoint on disk


def heal(
    student: LoadedModel,
    teacher: LoadedModel,
    config: HealConfig,
    *,
    work_dir: Path,
    progress: bool = True,
    on_step: Callable[[int, float, nn.Module], None] | None = None,
) -> HealReport:
    """Distil ``teacher`` into ``student`` through LoRA adapters, then merge them into ``student.model``.

    Resumes from a checkpoint in ``work_dir`` made for the same models and settings (and refuses one made
    for others). ``on_step(step, loss, model)`` is called after every optimizer step, for measurements.
    An interrupt leaves the last checkpoint intact and ``student.model`` as it was passed in.
    """
    s_model, t_model = student.model, teacher.model
    _check_pair(s_model, t_model)
    work_dir = Path(work_dir)
    windows, text_fingerprint = _windows(student.tokenizer, config)
    key = {
        "student": model_fingerprint(s_model),
        "teacher": model_fingerprint(t_model),
        "text": text_fingerprint,
        "windows": tensor_fingerprint(windows),
        **{name: getattr(config, name) for name in _RESULT_FIELDS},
    }
    targets, device = linear_modules(s_model), input_device(s_model)
    with (
        _seeded_rng(config.seed, device),
        _adapters(s_model, targets, config) as peft_model,
        interrupts_as_keyboard_interrupt(),
    ):
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        run = _Run(key, params, optimizer)
        resumed = _resume(work_dir / CHECKPOINT_NAME, run)
        start, wall, cpu = run.step, time.perf_counter(), time.process_time()
        _train(peft_model, t_model, windows, config, run, work_dir, progress, on_step)
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        peft_model.merge_and_unload()  # student.model now holds the merged weights, stock names and shapes
    log.info(
        "healed %s: %d steps (%d this call), KL %.4f -> %.4f nats/token, %.0f s",
        student.name, run.step, run.step - start, run.losses[0], run.losses[-1], seconds,
    )  # fmt: skip
    return HealReport(
        steps=run.step,
        tokens=run.step * config.batch_size * config.seq_len,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        loss_start=run.losses[0],
        loss_end=run.losses[-1],
        resumed=resumed,
        resumed_at_step=start,
        config=dataclasses.replace(config),
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in targets}),
        trainable_parameters=sum(p.numel() for p in run.params.values()),
        losses=list(run.losses),
    )


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


def _windows(tokenizer: Any, config: HealConfig) -> tuple[torch.Tensor, str]:
    """The run's calibration windows (steps * batch_size, seq_len) and the text's fingerprint.

    Seeded draws without replacement; a text too short for the budget is read again in a new order
    (seed + 1, ...) each time, with a warning.
    """
    text = load_text(config.source, "calibration")
    count = config.steps * config.batch_size
    available = eval_windows(tokenizer, text, config.seq_len).shape[0]
    epochs = math.ceil(count / available)
    if epochs > 1:
        log.warning(
            "%s holds %d windows of %d tokens and healing reads %d, so it reads the text %d times; pass "
            "a larger text with --calib (or fewer --tokens) to train on fresh text",
            text.name, available, config.seq_len, count, epochs,
        )  # fmt: skip
    draws = [
        token_windows(tokenizer, text, available, config.seq_len, config.seed + e) for e in range(epochs)
    ]
    return torch.cat(draws)[:count].contiguous(), text.fingerprint


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
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora)  # adapters drawn from the run's seeded RNG
    peft_model.eval()  # no dropout anywhere: a resumed run repeats an uninterrupted one exactly
    merged = False
    try:
        yield peft_model
        merged = True
    finally:
        if not merged:
            peft_model.unload()  # remove the adapters unmerged: the caller's model is as it was
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])  # peft froze the base weights


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The run's own RNG, seeded: the caller's (CPU, and the student's CUDA device) is restored after."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _train(
    model: Any,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: HealConfig,
    run: _Run,
    work_dir: Path,
    progress: bool,
    on_step: Callable[[int, float, nn.Module], None] | None,
) -> None:
    """Run the remaining steps, checkpointing every ``checkpoint_every`` steps and at the end."""
    total, per_step = config.steps, config.batch_size * config.seq_len
    s_dev, t_dev = input_device(model.get_base_model()), input_device(teacher)
    bar = tqdm(
        total=total * per_step, initial=run.step * per_step, desc="healing", unit="tok", disable=not progress
    )
    try:
        while run.step < total:
            batch = windows[run.step * config.batch_size : (run.step + 1) * config.batch_size]
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(run.step, total, config.lr)
            loss = _step(model, teacher, batch, s_dev, t_dev, config.temperature, run.optimizer)
            run.losses.append(loss)
            run.step += 1
            bar.update(per_step)
            bar.set_postfix(kl=f"{loss:.4f}")
            if run.step % config.checkpoint_every == 0 or run.step == total:
                _checkpoint(work_dir, run, config.checkpoint_every)
            if on_step is not None:
                on_step(run.step, loss, model)
    except KeyboardInterrupt:
        log.warning(
            "healing stopped at step %d of %d; %s",
            run.step, total,
            f"the checkpoint in {work_dir} holds step {run.saved}, and the same call resumes from it"
            if run.saved else "no checkpoint was written yet",
        )  # fmt: skip
        raise
    finally:
        bar.close()


def _checkpoint(work_dir: Path, run: _Run, every: int) -> None:
    """Write the checkpoint and log the loss since the previous one."""
    _save(work_dir / CHECKPOINT_NAME, run)
    run.saved = run.step
    recent = run.losses[-every:]
    log.info(
        "heal step %d: KL %.4f nats/token (mean of the last %d steps), checkpoint written",
        run.step, sum(recent) / len(recent), len(recent),
    )  # fmt: skip


def _step(
    model: Any,
    teacher: nn.Module,
    batch: torch.Tensor,
    s_dev: torch.device,
    t_dev: torch.device,
    temperature: float,
    optimizer: torch.optim.Optimizer,
) -> float:
    """One optimizer step on one batch of windows (batch, seq); returns its KL in nats per token."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.to(t_dev), use_cache=False).logits  # (batch, seq, vocab)
    student_logits = model(input_ids=batch.to(s_dev), use_cache=False).logits
    kl = distill_loss(student_logits, teacher_logits.to(student_logits.device), temperature)
    if not torch.isfinite(kl):
        raise NonFiniteError(
            f"the healing loss (KL to the teacher) became {kl.item()} at learning rate "
            f"{optimizer.param_groups[0]['lr']:.2g}; lower --lr and start again in a new --work-dir"
        )
    optimizer.zero_grad(set_to_none=True)
    (kl * temperature**2).backward()  # T^2 keeps the gradient scale independent of the temperature
    optimizer.step()
    return float(kl.item())


# ----------------------------------------------------------------------------- checkpoints


def _save(path: Path, run: _Run) -> None:
    """Write adapters, optimizer moments, RNG state and the run's JSON into one file, atomically."""
    tensors = {f"adapter.{name}": p.detach().cpu().contiguous() for name, p in run.params.items()}
    state = run.optimizer.state_dict()["state"]
    for index, moments in state.items():
        for key, value in moments.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if (cuda := _cuda_device(run.params)) is not None:
        tensors["rng.cuda"] = torch.cuda.get_rng_state(cuda)
    meta = {"format": FORMAT, "key": run.key, "step": run.step, "losses": run.losses}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"miprun_heal": json.dumps(meta)}))


def _cuda_device(params: dict[str, nn.Parameter]) -> torch.device | None:
    """The CUDA device the adapters train on (its RNG is part of a checkpoint), or None."""
    return next((p.device for p in params.values() if p.is_cuda), None)


def _resume(path: Path, run: _Run) -> bool:
    """Load the checkpoint at ``path`` into the run if there is one for the same key; False if none."""
    if not path.is_file():
        return False
    meta = _read_meta(path)
    if meta.get("format") != FORMAT or meta.get("key") != run.key:
        raise HealCheckpointError(_mismatch(path, meta.get("key"), run.key))
    tensors = load_file(path)
    stored = {key.removeprefix("adapter.") for key in tensors if key.startswith("adapter.")}
    if stored != set(run.params):
        raise HealCheckpointError(
            f"{path} holds adapters on other layers than this run makes ({len(stored)} tensors, not "
            f"{len(run.params)}; another peft version?); pass another --work-dir (or delete it) to start over"
        )
    with torch.no_grad():
        for name, p in run.params.items():
            p.copy_(tensors[f"adapter.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = run.optimizer.state_dict()["param_groups"]
    run.optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if (cuda := _cuda_device(run.params)) is not None and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], cuda)
    run.step, run.losses = int(meta["step"]), [float(x) for x in meta["losses"]]
    run.saved = run.step
    log.info("resuming the healing run in %s at step %d", path.parent, run.step)
    return True


def _read_meta(path: Path) -> dict[str, Any]:
    """The JSON a checkpoint carries in its safetensors metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["miprun_heal"])
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise HealCheckpointError(
            f"{path} is not a readable healing checkpoint ({exc}); delete it to start over, or pass another "
            "--work-dir"
        ) from exc
    return meta if isinstance(meta, dict) else {}


def _mismatch(path: Path, found: Any, wanted: dict[str, Any]) -> str:
    """The message for a checkpoint made for other models or settings: which ones, and what to do."""
    found = found if isinstance(found, dict) else {}
    differ = [k for k in wanted if found.get(k) != wanted[k]]
    shown = "; ".join(f"{k}: checkpoint {found.get(k)!r}, now {wanted[k]!r}" for k in differ)
    return (
        f"{path} was written for another healing run ({shown or 'another checkpoint format'}); pass the "
        "same student, teacher and settings to resume it, or another --work-dir (or delete the file) to "
        "start over"
    )
