"""The options of ``miprun heal``: distillation settings and the run around them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from miprun.errors import InvalidOptionError
from miprun.options.fields import Options, opt
from miprun.options.groups import DTYPE_NAMES, SEED_MAX, HeldoutOptions, RuntimeOptions


@dataclass
class HealConfig(Options):
    """How ``miprun heal`` distils the dense model into the pruned one (LoRA adapters, then merged).

    Defaults measured on SmolLM2-135M cut by 6 of 30 blocks, 2 CPU threads (benchmarks/heal.py): 20 steps
    of 4 x 256 tokens take about 15 CPU-minutes and bring held-out perplexity from 23.2 to 18.7 (dense 13.6).
    """

    tokens: int = opt(
        20_480, "Calibration tokens the distillation trains on (whole batches).", "--tokens", min=1
    )
    seq_len: int = opt(256, "Tokens per training window.", "--seq-len", "-l", min=2)
    batch_size: int = opt(
        4, "Windows per optimizer step, all processes together (the global batch).", "--batch-size", min=1
    )
    lr: float = opt(
        5e-3, "Peak learning rate of the adapters (cosine decay to a tenth of it).", "--lr", above=0
    )
    rank: int = opt(8, "LoRA rank (alpha = 2 x rank) on every linear layer of every block.", "--rank", min=1)
    temperature: float = opt(1.0, "Distillation temperature of the KL.", "--temperature", above=0)
    checkpoint_every: int = opt(
        4, "Optimizer steps between resumable checkpoints.", "--checkpoint-every", min=1
    )
    seed: int = opt(
        0, "Seed of the windows and of the adapters' initialisation.", "--seed", min=0, max=SEED_MAX
    )
    source: str | None = opt(
        None, "Calibration text to train on (its calibration split; default: novel).", "--calib"
    )
    gradient_accumulation: int = opt(
        1,
        "Split each step's --batch-size windows into this many passes per process (same result, less memory).",
        "--gradient-accumulation",
        min=1,
    )
    bf16: bool = opt(False, "Train in bfloat16 autocast (Trainer's bf16).", "--bf16/--no-bf16")
    gradient_checkpointing: bool = opt(
        False,
        "Recompute activations in the backward pass (less memory, more compute).",
        "--gradient-checkpointing/--no-gradient-checkpointing",
    )
    fsdp: bool = opt(
        False,
        "Shard the student over the processes with FSDP2 (Trainer's fsdp=True) instead of replicating it (DDP).",
        "--fsdp/--no-fsdp",
    )
    teacher_topk: int | None = opt(
        None,
        "Run the teacher once, cache its top-k next-token probabilities in --work-dir and train on them "
        "(KL on the top k plus a tail bucket): teacher and student are never in memory together.",
        "--teacher-topk",
        min=1,
    )

    @property
    def steps(self) -> int:
        """Optimizer steps: the token budget in whole batches of ``batch_size`` windows."""
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))


@dataclass
class HealOptions(Options):
    """``miprun heal``: distil a pruned model (a ``miprun prune`` output) toward its dense parent."""

    teacher: str | None = opt(
        None,
        "The dense model the folder was pruned from (default: the one its miprun.json names).",
        "--teacher",
    )
    config: HealConfig = field(default_factory=HealConfig)
    work_dir: str | None = opt(
        None,
        "Folder for resumable checkpoints (default: .OUT.heal-work beside --out); rerunning the same command "
        "resumes from it.",
        "--work-dir",
    )
    evaluate: bool = opt(
        False, "Held-out perplexity of the dense, the pruned and the healed model.", "--eval/--no-eval"
    )
    heldout: HeldoutOptions = field(default_factory=HeldoutOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    save_dtype: str | None = opt(
        None,
        "dtype of the saved weights: float32, bfloat16, float16; default: the pruned checkpoint's.",
        "--save-dtype",
    )
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)

    def check(self) -> None:
        if self.save_dtype is not None and self.save_dtype not in DTYPE_NAMES:
            raise InvalidOptionError(
                f"save_dtype (--save-dtype) must be one of {', '.join(DTYPE_NAMES)}, got {self.save_dtype!r}"
            )
