"""What healing trains on: seeded calibration windows, and optionally the teacher's top-k targets cached on disk.

With ``teacher_topk`` the teacher runs once over every window; its top-k log-probabilities, their token
ids and the tail go into one safetensors file (written atomically), so the student trains without the
teacher in memory, and a rerun (or a resumed run) reads the file instead of loading the teacher again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from miprun.atomic import atomic_write_bytes
from miprun.data import eval_windows, load_text, token_windows
from miprun.model.identity import tensor_fingerprint
from miprun.model.placement import input_device
from miprun.options import HealConfig
from miprun.repair.heal.loss import teacher_top_k

log = logging.getLogger(__name__)

TARGETS_NAME = "teacher-top-k.safetensors"
TARGETS_FORMAT = 1
# The settings that decide the windows and the targets, besides the teacher and the text.
_TARGET_FIELDS = ("tokens", "seq_len", "batch_size", "seed", "source", "teacher_topk", "temperature")


def heal_windows(tokenizer: Any, config: HealConfig) -> tuple[torch.Tensor, str]:
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


@dataclass
class TeacherTargets:
    """The teacher's next-token distribution on every window, as top-k log-probabilities plus a tail."""

    windows: torch.Tensor  # (num_windows, seq) the token ids they were computed on
    values: torch.Tensor  # (num_windows, seq, k) float32 log-probabilities at the run's temperature
    indices: torch.Tensor  # (num_windows, seq, k) token ids
    tail: torch.Tensor  # (num_windows, seq) log of the probability outside the top k
    teacher: str  # the teacher's fingerprint


class HealWindows(torch.utils.data.Dataset):
    """Windows in their drawn order, each with its cached teacher targets when there are some."""

    def __init__(self, windows: torch.Tensor, targets: TeacherTargets | None = None) -> None:
        self.windows, self.targets = windows, targets

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.windows[i]}
        if self.targets is not None:
            t = self.targets
            item |= {"top_values": t.values[i], "top_indices": t.indices[i].long(), "top_tail": t.tail[i]}
        return item


def targets_key(config: HealConfig, teacher: str, text: str) -> dict[str, Any]:
    """What a targets file is checked against before it is reused."""
    return {"teacher": teacher, "text": text, **{name: getattr(config, name) for name in _TARGET_FIELDS}}


def cached_targets(
    path: Path,
    config: HealConfig,
    teacher_fingerprint: str,
    load_teacher: Callable[[], Any],
    progress: bool = False,
) -> TeacherTargets:
    """The teacher's top-k targets from ``path`` if it was written for the same teacher, text and settings;
    else load the teacher (a :class:`~miprun.model.loading.LoadedModel`), compute them, and write the file."""
    text = load_text(config.source, "calibration")
    key = targets_key(config, teacher_fingerprint, text.fingerprint)
    found = _read(path, key)
    if found is not None:
        log.info("reusing the teacher's top-%d targets in %s", config.teacher_topk, path)
        return found
    teacher = load_teacher()
    windows, _ = heal_windows(teacher.tokenizer, config)
    targets = compute_targets(teacher.model, windows, config, teacher_fingerprint, progress)
    tensors = {"windows": windows, "values": targets.values, "indices": targets.indices, "tail": targets.tail}
    meta = {"format": TARGETS_FORMAT, "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"miprun_heal_targets": json.dumps(meta)}))
    log.info(
        "wrote the teacher's top-%d targets on %d windows to %s", config.teacher_topk, len(windows), path
    )
    return targets


def compute_targets(
    teacher: torch.nn.Module,
    windows: torch.Tensor,
    config: HealConfig,
    fingerprint: str,
    progress: bool = False,
) -> TeacherTargets:
    """Run the teacher over ``windows`` in batches and keep its top-k distribution (on the CPU)."""
    assert config.teacher_topk is not None
    device, parts = input_device(teacher), []
    batches = torch.split(windows, config.batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, desc="teacher top-k", disable=not progress):
            logits = teacher(input_ids=batch.to(device), use_cache=False).logits  # (batch, seq, vocab)
            values, indices, tail = teacher_top_k(logits, config.teacher_topk, config.temperature)
            parts.append((values.cpu(), indices.to(torch.int32).cpu(), tail.cpu()))
    values, indices, tail = (torch.cat(p) for p in zip(*parts, strict=True))
    return TeacherTargets(windows, values, indices, tail, fingerprint)


def _read(path: Path, key: dict[str, Any]) -> TeacherTargets | None:
    """The targets in ``path`` if it is a readable file made for ``key``; None (to recompute) otherwise."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["miprun_heal_targets"])
        if meta.get("format") != TARGETS_FORMAT or meta.get("key") != key:
            log.warning("%s was computed for another teacher, text or settings; computing it again", path)
            return None
        t = load_file(path)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        log.warning("%s is not a readable targets file (%s); computing it again", path, exc)
        return None
    return TeacherTargets(t["windows"], t["values"], t["indices"], t["tail"], key["teacher"])


def check_windows(targets: TeacherTargets, windows: torch.Tensor) -> None:
    """Refuse targets computed on other windows than the student trains on (another tokenizer)."""
    from miprun.errors import InvalidOptionError

    if targets.windows.shape != windows.shape or tensor_fingerprint(targets.windows) != tensor_fingerprint(
        windows
    ):
        raise InvalidOptionError(
            "the teacher's cached targets were computed on other token windows than the student's tokenizer "
            "makes; teacher and student must share a tokenizer (heal the pruned folder against its own dense "
            "parent), or delete the targets file in --work-dir to compute them again"
        )
