"""Every setting of a run, as typed dataclasses shared by the Python API and the command line.

Each field carries its help text, command-line flags and bounds as metadata: the CLI builds its options
from these fields (:mod:`miprun.cli.params`), so a default, a description and a check live in one place.
Values are checked when an options object is built, before any work, with errors that name the option
both ways (``num_blocks (--num-blocks)``).

    from miprun.options import PruneOptions
    opts = PruneOptions(num_blocks=3)                   # everything else at its default
    opts = with_overrides(opts, method="shortgpt", samples=8)  # flat field names reach nested groups
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from miprun.errors import InvalidOptionError, InvalidTypeError

T = TypeVar("T")

DTYPE_NAMES = ("float32", "float16", "bfloat16")
SEED_MAX = 2**63 - 2  # torch generators take 64-bit seeds, and projections use seed + 1
DEFAULT_METHOD = "mi-prun"
DEFAULT_ESTIMATOR = "coordinate"  # chosen by measurement: docs/estimator-study.md
DEFAULT_REPAIR = "none"
DEFAULT_COMPARE_METHODS = (
    "mi-prun",
    "mi-optimal",
    "mi-verified",
    "mi-search",
    "shortgpt",
    "angular",
    "angular-mean",
    "sleb",
    "ppl-oneshot",
    "last-n",
    "random",
)


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *extra_flags: str,
    factory: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    cli: bool = True,
    parse: Any = None,
    flags: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with its CLI flags, help and bounds (``min``/``max`` inclusive, ``above``/``below`` not).

    ``parse`` turns the command line's value into the field's (e.g. ``KEY=VALUE`` items into a dict).
    """
    meta = {
        "help": help,
        "flags": flags or extra_flags,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
    }
    meta |= {"cli": cli, "parse": parse}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; each value is typed later by what it configures."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidOptionError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def flag(f: dataclasses.Field) -> str:
    """The long command-line flag of a field (``--num-blocks``), for messages."""
    flags = [x for x in f.metadata.get("flags", ()) if x.startswith("--")]
    return flags[0].split("/")[0] if flags else "--" + f.name.replace("_", "-")


class Options:
    """Base of the option groups: checks every field's type and bounds when the object is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(f, getattr(self, f.name), hints[f.name])
        self.check()

    def validate(self) -> None:
        """Check every field again, nested groups included: for an object changed after it was built."""
        for _, group in groups(self):
            group.validate()
        self.__post_init__()

    def check(self) -> None:
        """Checks across fields; subclasses extend it."""


def _allowed(tp: Any) -> tuple[type, ...]:
    """The runtime types a field annotation admits (``int | None`` -> ``(int, NoneType)``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return tuple(t for arg in typing.get_args(tp) for t in _allowed(arg))
    if origin is not None:
        return (origin,)
    if tp is Any:
        return (object,)
    return (tp,) if isinstance(tp, type) else (object,)


def _check_field(f: dataclasses.Field, value: Any, tp: Any) -> None:
    name = f"{f.name} ({flag(f)})"
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise InvalidOptionError(
                f"{name} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}"
            )
        return
    allowed = _allowed(tp)
    if value is None and type(None) in allowed:
        return
    is_bool = isinstance(value, bool)
    ok = any(
        (t is int and isinstance(value, int) and not is_bool)
        or (t is float and isinstance(value, (int, float)) and not is_bool)
        or (t not in (int, float) and isinstance(value, t))
        for t in allowed
    )
    if not ok:
        names = sorted({getattr(t, "__name__", str(t)) for t in allowed if t is not type(None)})
        want = " or ".join(names) + (" (or None)" if type(None) in allowed else "")
        raise InvalidTypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if isinstance(value, (int, float)) and not is_bool:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
        meta = f.metadata
        bounds = [
            (meta.get("min"), lambda v, b: v >= b, "at least"),
            (meta.get("max"), lambda v, b: v <= b, "at most"),
            (meta.get("above"), lambda v, b: v > b, "greater than"),
            (meta.get("below"), lambda v, b: v < b, "less than"),
        ]
        for bound, holds, words in bounds:
            if bound is not None and not holds(value, bound):
                shown = bound if isinstance(bound, int) else f"{bound:g}"
                raise InvalidOptionError(f"{name} must be {words} {shown}, got {value!r}{_hint(meta)}")


def _hint(meta: Any) -> str:
    text = meta.get("help", "")
    return f" ({text[0].lower() + text[1:].rstrip('.')})" if text else ""


def groups(obj: Any) -> list[tuple[str, Any]]:
    """``(field name, value)`` of the nested option groups of an options object."""
    return [
        (f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if _is_group(getattr(obj, f.name))
    ]


def _is_group(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and isinstance(value, Options)


def flat_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Every leaf field of an options class and its nested groups: flat name -> (path of groups, field)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Options) and dataclasses.is_dataclass(tp):
            for name, (path, leaf) in flat_fields(tp).items():
                _add_unique(out, name, ((f.name, *path), leaf), cls)
        else:
            _add_unique(out, f.name, ((), f), cls)
    return out


def _add_unique(out: dict, name: str, entry: Any, cls: type) -> None:
    if name in out:
        raise TypeError(f"{cls.__name__}: option {name!r} is defined twice in its groups")
    out[name] = entry


def with_overrides(options: T, **flat: Any) -> T:
    """A copy of ``options`` with fields replaced by flat name (``samples=8`` reaches the calibration group).

    A whole group can be replaced by its own name (``calibration=CalibrationConfig(...)``).
    """
    if not flat:
        if isinstance(options, Options):
            options.validate()  # an object changed after it was built (``opts.calibration.samples = 0``)
        return options
    leaves = flat_fields(type(options))
    group_names = {name for name, _ in groups(options)}
    _refuse_unknown(type(options), [k for k in flat if k not in leaves and k not in group_names])
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        path = () if name in group_names else leaves[name][0]
        if path:
            nested.setdefault(path[0], {})[name] = value
        else:
            changes[name] = value
    for group, sub in nested.items():
        changes[group] = with_overrides(changes.get(group, getattr(options, group)), **sub)
    return dataclasses.replace(options, **changes)  # type: ignore[type-var]


def _refuse_unknown(cls: type, unknown: list[str]) -> None:
    """An :class:`InvalidOptionError` for the first of ``unknown`` option names, with a "did you mean"."""
    if not unknown:
        return
    known = sorted({*flat_fields(cls), *(f.name for f in dataclasses.fields(cls))})
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InvalidOptionError(
        f"unknown option {unknown[0]!r} for {cls.__name__}.{hint} Options: {', '.join(known)}"
    )


def _accept_flat_names(cls: type) -> None:
    """Let ``cls(...)`` take the flat names of its nested groups' fields, as :func:`with_overrides` does:
    ``PruneOptions(num_blocks=6, repair="linear", samples=8)``; an unknown name is an InvalidOptionError."""
    init: Any = cls.__init__  # type: ignore[misc]
    own = {f.name for f in dataclasses.fields(cls)}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name not in own}
        if flat:
            leaves = flat_fields(cls)
            _refuse_unknown(cls, [name for name in flat if name not in leaves])
            nested: dict[str, dict[str, Any]] = {}
            for name, value in flat.items():
                nested.setdefault(leaves[name][0][0], {})[name] = value
            defaults = {f.name: f for f in dataclasses.fields(cls)}
            for group, sub in nested.items():
                base = kwargs[group] if group in kwargs else defaults[group].default_factory()  # type: ignore[misc,operator]
                kwargs[group] = with_overrides(base, **sub)
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


# ----------------------------------------------------------------------------- the groups


@dataclass
class CalibrationConfig(Options):
    """Which calibration text and how windows are drawn. Defaults fit a 135M model on a 2-core laptop CPU."""

    source: str | None = opt(
        None,
        "Calibration text: wiki (default, SQuAD Wikipedia paragraphs), new_wiki, nyt, reddit, amazon, "
        "a local .txt/.jsonl file, or a hub data set (wikitext2, c4, alpaca, pg19).",
        "--calib",
    )
    samples: int = opt(32, "Calibration windows.", "--samples", "-s", min=1)
    seq_len: int = opt(256, "Tokens per calibration window.", "--seq-len", "-l", min=2)
    seed: int = opt(
        0, "Seed for window sampling, projections and token samples.", "--seed", min=0, max=SEED_MAX
    )
    batch_size: int = opt(4, "Windows per forward pass.", "--batch-size", min=1)
    exclude_first_token: bool = opt(
        False, "Leave each window's first token out of the statistics.", "--exclude-first-token"
    )


@dataclass
class RuntimeOptions(Options):
    """Where and how the model runs."""

    device: str = opt("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps ...", "--device")
    dtype: str = opt(
        "auto",
        "Compute dtype: auto (bf16 on CUDA, else fp32), float32, bfloat16, float16. The saved model "
        "keeps the source checkpoint's dtype unless --save-dtype says otherwise.",
        "--dtype",
    )
    device_map: str | None = opt(
        None,
        "Spread a model larger than one device with accelerate: auto, balanced, balanced_low_0, "
        "sequential (layers on several GPUs, the rest offloaded to CPU). Default: all on --device.",
        "--device-map",
    )
    trust_remote_code: bool = opt(
        False, "Allow model code from the hub (off by default: it runs code).", "--trust-remote-code"
    )

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise InvalidOptionError(
                f"dtype (--dtype) must be auto or one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}"
            )


@dataclass
class EstimatorOptions(Options):
    """Which MI estimator scores blocks and spans."""

    estimator: str = opt(
        DEFAULT_ESTIMATOR,
        "MI estimator: coordinate (default: per-coordinate Gaussian MI under a zero-mean model, i.e. from "
        "moments about zero, not shift-invariant; --est-opt center=true centres), gaussian, renyi, binned "
        "(see `miprun list estimators`).",
        "--estimator",
        "-e",
    )
    estimator_params: dict[str, Any] = opt(
        help="Estimator parameter KEY=VALUE (repeatable), e.g. --est-opt center=true; typed and "
        "checked against the estimator's parameters.",
        factory=dict,
        parse=parse_key_values,
        flags=("--est-opt",),
    )


@dataclass
class ScoringOptions(Options):
    """How blocks are scored and chosen."""

    method: str = opt(
        DEFAULT_METHOD,
        "Pruning method: mi-prun (default), mi-optimal, mi-verified, mi-search, shortgpt, angular, angular-mean, sleb, ppl-oneshot, "
        "last-n, random; `miprun list methods` says what each does and reads.",
        "--method",
    )
    estimation: EstimatorOptions = field(default_factory=EstimatorOptions)
    method_params: dict[str, Any] = opt(
        help="Method parameter KEY=VALUE (repeatable), e.g. --method-opt rank=mi; typed and checked "
        "against the method's parameters.",
        factory=dict,
        parse=parse_key_values,
        flags=("--method-opt",),
    )
    k: int = opt(
        5, "Fast-Block-Select candidate surplus: floor(ln L)+k windows per group (mi-prun).", "--k", min=0
    )
    cache: bool = opt(
        True,
        "Reuse (and store) scores computed before for the same model, windows and settings.",
        "--cache/--no-cache",
    )
    sequential: bool = opt(
        False,
        "Keep the model on the CPU and calibrate one decoder layer at a time on --device "
        "(scores equal to the whole-model pass; device memory: one layer and one batch).",
        "--sequential",
    )


@dataclass
class HeldoutOptions(Options):
    """Held-out text for perplexity: the evaluation split of a source, disjoint from calibration text."""

    eval_source: str | None = opt(None, "Held-out text (default: wiki, its evaluation split).", "--eval-text")
    eval_samples: int = opt(16, "Held-out windows.", "--eval-samples", min=1)
    eval_seq_len: int = opt(256, "Held-out window length.", "--eval-seq-len", min=2)


@dataclass
class RepairOptions(Options):
    """What repairs the model after the cut."""

    repair: str = opt(
        DEFAULT_REPAIR,
        "Repair after the cut: none (default), linear; `miprun list repairs` says what each does.",
        "--repair",
    )
    repair_params: dict[str, Any] = opt(
        help="Repair parameter KEY=VALUE (repeatable), typed and checked against the repair's parameters.",
        factory=dict,
        parse=parse_key_values,
        flags=("--repair-opt",),
    )


@dataclass
class OutputOptions(Options):
    """How the pruned model is written."""

    out_format: Literal["transformers", "gguf", "both"] = opt(
        "transformers",
        "transformers (safetensors folder, default), gguf (model.gguf: from a GGUF source its quantised tensors "
        "copied as they are; from any other source written by llama.cpp's converter, fetched once), or both.",
        "--out-format",
    )
    gguf_type: str | None = opt(
        None,
        "Tensor type of model.gguf from a transformers source: f32, f16 (default), bf16, q8_0. A GGUF source "
        "keeps its own types.",
        "--gguf-type",
    )
    save_dtype: str | None = opt(
        None,
        "dtype of the saved weights: float32, bfloat16, float16; default: the source checkpoint's.",
        "--save-dtype",
    )

    def check(self) -> None:
        from miprun.output.llama_cpp import GGUF_TYPES

        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            raise InvalidOptionError(
                f"gguf_type (--gguf-type) must be one of {', '.join(GGUF_TYPES)}, got {self.gguf_type!r}; "
                "K-quants such as Q4_K_M need llama.cpp's compiled llama-quantize, run on the f16 file"
            )
        if self.save_dtype is not None and self.save_dtype not in DTYPE_NAMES:
            raise InvalidOptionError(
                f"save_dtype (--save-dtype) must be one of {', '.join(DTYPE_NAMES)}, got {self.save_dtype!r}"
            )


@dataclass
class ScoreOptions(Options):
    """``miprun score``: one calibration pass, every block and span scored, for any later N."""

    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
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
        parse=lambda items: split_ints(items),  # defined below
        flags=("--blocks",),
    )
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    repair_config: RepairOptions = field(default_factory=RepairOptions)
    evaluate: bool = opt(False, "Held-out perplexity of the dense and pruned model.", "--eval/--no-eval")
    heldout: HeldoutOptions = field(default_factory=HeldoutOptions)
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


def split_list(items: list[str] | None) -> list[str]:
    """Repeatable options that also accept comma-separated values: ``-t a,b -t c`` -> [a, b, c]."""
    return [part.strip() for item in items or [] for part in str(item).split(",") if part.strip()]


def split_ints(items: list[str] | None) -> list[int]:
    """``-n 3 -n 6,9`` -> [3, 6, 9]; a non-integer is an error naming it."""
    out = []
    for part in split_list(items):
        try:
            out.append(int(part))
        except ValueError:
            raise InvalidOptionError(f"expected whole numbers like 3,6,9, got {part!r}") from None
    return out


@dataclass
class EvaluateOptions(Options):
    """``miprun eval``: held-out perplexity and zero-shot accuracy of a model."""

    ppl: list[str] = opt(
        help="Perplexity text (repeatable or comma-separated; evaluation split): wiki (default), new_wiki, nyt, "
        "reddit, amazon, a local .txt/.jsonl file, or a hub data set.",
        factory=lambda: ["wiki"],
        parse=split_list,
        flags=("--ppl",),
    )
    no_ppl: bool = opt(False, "Skip perplexity.", "--no-ppl")
    ppl_seq_len: int = opt(256, "Tokens per perplexity window.", "--ppl-seq-len", min=2)
    ppl_windows: int = opt(64, "First N windows of each text (0: all).", "--ppl-windows", min=0)
    tasks: list[str] = opt(
        help="Zero-shot tasks (repeatable or comma-separated): social_iqa and next_sentence run offline; any "
        "other lm-eval task name (or lm-eval:NAME) needs the hub.",
        factory=list,
        parse=split_list,
        flags=("--tasks", "-t"),
    )
    limit: int | None = opt(None, "First N examples per task.", "--limit", min=1)
    task_text: str | None = opt(None, "Held-out text for next_sentence (default: wiki).", "--task-text")
    seed: int = opt(0, "Seed of the next_sentence distractors.", "--seed", min=0, max=SEED_MAX)
    batch_size: int = opt(4, "Windows (and task requests) per forward pass.", "--batch-size", min=1)
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
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


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
        help="Methods to compare (repeat or comma-separate); default: every method.",
        factory=lambda: list(DEFAULT_COMPARE_METHODS),
        parse=split_list,
        flags=("--methods",),
    )
    repairs: list[str] = opt(
        help="Repairs to apply to every method's choice (repeat or comma-separate); default: none.",
        factory=lambda: [DEFAULT_REPAIR],
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
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    progress: bool = opt(True, "Progress bars and log lines.", cli=False)

    def check(self) -> None:
        if not self.num_blocks or min(self.num_blocks) < 1:
            raise InvalidOptionError(f"num_blocks (--num-blocks) must be positive, got {self.num_blocks}")
        if not self.methods:
            raise InvalidOptionError("methods (--methods) names no method")


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
        None, "Calibration text to train on (its calibration split; default: wiki).", "--calib"
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


for _options in Options.__subclasses__():
    _accept_flat_names(_options)
