"""The options of ``miprun score``, ``prune``, ``eval``, ``bench`` and ``compare``, built from the shared groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from miprun.errors import InvalidOptionError
from miprun.options.fields import Options, opt
from miprun.options.groups import (
    REVISION_HELP,
    SEED_MAX,
    CalibrationConfig,
    EstimatorOptions,
    HeldoutOptions,
    OutputOptions,
    RepairOptions,
    RuntimeOptions,
    ScoringOptions,
)
from miprun.options.parsers import parse_key_values, split_ints, split_list


@dataclass
class ScoreOptions(Options):
    """``miprun score``: one calibration pass, every block and span scored, for any later N."""

    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    revision: str | None = opt(None, REVISION_HELP, "--revision")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    all_spans: bool = opt(True, "Score every span (a scores file serves any N and method).", cli=False)
    max_blocks: int | None = opt(
        None,
        "Largest N the file must serve for N-dependent evidence such as sleb's (default: T/4).",
        "--max-blocks",
        min=1,
    )
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)


@dataclass
class PruneOptions(Options):
    """``miprun prune``: score, select, repair, cut, evaluate and save."""

    num_blocks: int | None = opt(None, "Blocks to remove (N).", "--num-blocks", "-n", min=1)
    ratio: float | None = opt(
        None, "Fraction of blocks to remove: N = ceil(T*R).", "--ratio", "-r", above=0, below=1
    )
    blocks: list[int] = opt(
        help="Remove exactly these blocks (0-based, e.g. 12,14,17: a set from a paper, another tool or an earlier "
        "run); no scoring pass. Repair, evaluation, card and GGUF as for any method.",
        factory=list,
        parse=split_ints,
        flags=("--blocks",),
    )
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    repair_config: RepairOptions = field(default_factory=RepairOptions)
    evaluate: bool = opt(False, "Held-out perplexity of the dense and pruned model.", "--eval/--no-eval")
    heldout: HeldoutOptions = field(default_factory=HeldoutOptions)
    revision: str | None = opt(None, REVISION_HELP, "--revision")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)

    def check_budget(self) -> None:
        """Exactly one of ``num_blocks``, ``ratio`` and ``blocks`` (checked when a run starts: a default object
        has none)."""
        given = [
            f"{name} {value}"
            for name, value in (
                ("--num-blocks", self.num_blocks),
                ("--ratio", self.ratio),
                ("--blocks", self.blocks),
            )
            if value not in (None, [])
        ]
        if len(given) != 1:
            got = "none" if not given else " and ".join(given)
            raise InvalidOptionError(
                f"give exactly one of num_blocks (--num-blocks N), ratio (--ratio R) or blocks (--blocks I,J,...), "
                f"got {got}; e.g. --num-blocks 3, --ratio 0.2 or --blocks 12,14,17"
            )


@dataclass
class EvaluateOptions(Options):
    """``miprun eval``: held-out perplexity and zero-shot accuracy of a model."""

    ppl: list[str] = opt(
        help="Perplexity text (repeatable or comma-separated; evaluation split): novel (default), wiki, new_wiki, "
        "nyt, reddit, amazon, a local .txt/.jsonl file, or a hub data set.",
        factory=lambda: ["novel"],
        parse=split_list,
        flags=("--ppl",),
    )
    no_ppl: bool = opt(False, "Skip perplexity.", "--no-ppl")
    ppl_seq_len: int = opt(256, "Tokens per perplexity window.", "--ppl-seq-len", min=2)
    ppl_windows: int = opt(64, "First N windows of each text (0: all).", "--ppl-windows", min=0)
    tasks: list[str] = opt(
        help="Zero-shot tasks (repeatable or comma-separated): next_sentence runs offline; social_iqa too, from "
        "the BIG-bench archive (MIPRUN_BIGBENCH_ARCHIVE where the package index lacks it); any other lm-eval "
        "task name (or lm-eval:NAME) needs the hub.",
        factory=list,
        parse=split_list,
        flags=("--tasks", "-t"),
    )
    limit: int | None = opt(None, "First N examples per task.", "--limit", min=1)
    task_text: str | None = opt(None, "Held-out text for next_sentence (default: novel).", "--task-text")
    seed: int = opt(0, "Seed of the next_sentence distractors.", "--seed", min=0, max=SEED_MAX)
    batch_size: int = opt(4, "Windows (and task requests) per forward pass.", "--batch-size", min=1)
    revision: str | None = opt(None, REVISION_HELP, "--revision")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)


@dataclass
class BenchConfig(Options):
    """What ``miprun bench`` measures; defaults take about a minute for two 135M models on a 2-core CPU."""

    prompt_len: int = opt(256, "Prompt tokens.", "--prompt-len", min=1)
    new_tokens: int = opt(32, "Greedy tokens decoded per run.", "--new-tokens", min=1)
    batch_sizes: list[int] = opt(
        help="Decode batch sizes, comma-separated.",
        factory=lambda: [1, 8],
        parse=split_ints,
        flags=("--batch-sizes",),
    )
    warmup: int = opt(1, "Untimed rounds first.", "--warmup", min=0)
    repeats: int = opt(5, "Timed rounds; medians are reported.", "--repeats", min=1)
    seed: int = opt(0, "Seed of the random prompt.", "--seed", min=0, max=SEED_MAX)

    def check(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidOptionError(
                f"batch_sizes (--batch-sizes) must be positive integers, got {self.batch_sizes}"
            )


@dataclass
class BenchOptions(Options):
    """``miprun bench``: speed, memory and size, optionally against the dense model, interleaved."""

    against: str | None = opt(None, "Dense model to compare with, measured interleaved.", "--against")
    config: BenchConfig = field(default_factory=BenchConfig)
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice).", "--threads", min=1)
    revision: str | None = opt(None, REVISION_HELP, "--revision")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    progress: bool = opt(True, "A progress bar over the rounds.", cli=False)


@dataclass
class CompareOptions(Options):
    """``miprun compare``: every method (and repair) at every N on the same data, side by side."""

    num_blocks: list[int] = opt(
        help="Blocks to remove; repeat or comma-separate: -n 3 -n 6,9.",
        factory=lambda: [3, 6, 9],
        parse=split_ints,
        flags=("--num-blocks", "-n"),
    )
    methods: list[str] = opt(
        help="Methods to compare (repeat or comma-separate); default: every method that says it belongs in the "
        "default comparison (`miprun list methods`).",
        factory=list,
        parse=split_list,
        flags=("--methods",),
    )
    repairs: list[str] = opt(
        help="Repairs to apply to every method's choice (repeat or comma-separate); default: none.",
        factory=lambda: ["none"],
        parse=split_list,
        flags=("--repairs",),
    )
    repair_params: dict[str, Any] = opt(
        help="Repair parameter KEY=VALUE (repeatable), given to every repair that has that parameter, "
        "e.g. --repair-opt tokens=8192.",
        factory=dict,
        parse=parse_key_values,
        flags=("--repair-opt",),
    )
    method_params: dict[str, Any] = opt(
        help="Method parameter KEY=VALUE (repeatable), given to every method that has that parameter, "
        "e.g. --method-opt rank=mi.",
        factory=dict,
        parse=parse_key_values,
        flags=("--method-opt",),
    )
    k: int = opt(
        5, "Fast-Block-Select candidate surplus: floor(ln L)+k windows per group (mi-prun).", "--k", min=0
    )
    sequential: bool = opt(
        False,
        "Keep the model on the CPU and calibrate one decoder layer at a time on --device (as in prune).",
        "--sequential",
    )
    estimation: EstimatorOptions = field(default_factory=EstimatorOptions)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    heldout: HeldoutOptions = field(default_factory=HeldoutOptions)
    tasks: list[str] = opt(
        help="Zero-shot tasks for each pruned model (repeat or comma-separate).",
        factory=list,
        parse=split_list,
        flags=("--tasks", "-t"),
    )
    limit: int | None = opt(None, "Examples per task.", "--limit", min=1)
    task_max_ppl: float | None = opt(
        None,
        "Skip the tasks for pruned models whose held-out perplexity exceeds this multiple of dense (they answer "
        "at chance); default: run them for every row.",
        "--task-max-ppl",
        min=1.0,
    )
    forward_repeats: int = opt(
        3, "Timed plain forward passes (the pruning-time reference).", "--forward-repeats", min=1
    )
    revision: str | None = opt(None, REVISION_HELP, "--revision")
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)

    def check(self) -> None:
        if not self.num_blocks or min(self.num_blocks) < 1:
            raise InvalidOptionError(f"num_blocks (--num-blocks) must be positive, got {self.num_blocks}")
