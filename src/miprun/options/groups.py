"""The option groups that several commands share: calibration, runtime, scoring, held-out text, repair, output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from miprun.errors import InvalidOptionError
from miprun.options.fields import Options, opt
from miprun.options.parsers import parse_key_values

DTYPE_NAMES = ("float32", "float16", "bfloat16")
SEED_MAX = 2**63 - 2  # torch generators take 64-bit seeds, and projections use seed + 1
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's converter writes without its compiled tools
DEFAULT_METHOD = "mi-search"  # chosen by measurement: docs/comparison.md (issue 16)
LAYERWISE_METHOD = "mi-prun"  # the default with --sequential: one pass, never the whole model at once
DEFAULT_ESTIMATOR = "coordinate"  # chosen by measurement: docs/estimator-study.md
DEFAULT_REPAIR = "linear"  # where the model's family can fold it (else none): docs/repair.md


def default_method(sequential: bool) -> str:
    """The method a run without ``--method`` uses: ``mi-search`` measures candidates with the whole model, so
    a layer-by-layer run (a model larger than the device) gets MI-PRUN's one pass."""
    return LAYERWISE_METHOD if sequential else DEFAULT_METHOD


REVISION_HELP = (
    "Branch, tag or commit of a hub --model (e.g. a commit hash for a run you can repeat); recorded in "
    "miprun.json. Refused for local folders, .gguf files and embedded models."
)


@dataclass
class CalibrationConfig(Options):
    """Which calibration text and how windows are drawn. Defaults fit a 135M model on a 2-core laptop CPU."""

    source: str | None = opt(
        None,
        "Calibration text: novel (default: a public-domain novel from SentencePiece's source archive), wiki, "
        "new_wiki, nyt, reddit, amazon (SQuAD-shifts: need the BIG-bench archive, see docs/troubleshooting.md), "
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
        if self.device != "auto" and not _is_torch_device(self.device):
            raise InvalidOptionError(
                f"device (--device) must be auto or a torch device such as cpu, cuda, cuda:1 or mps, got "
                f"{self.device!r}"
            )
        if self.device_map is not None and not (
            self.device_map in DEVICE_MAPS or _is_torch_device(self.device_map)
        ):
            raise InvalidOptionError(
                f"device_map (--device-map) must be one of {', '.join(DEVICE_MAPS)} or a device such as "
                f"cuda:0, got {self.device_map!r}"
            )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # what from_pretrained spreads by name


def _is_torch_device(name: str) -> bool:
    """Whether torch parses ``name`` as a device (``cuda:1`` yes, ``gpu`` no); availability is not checked."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


@dataclass
class EstimatorOptions(Options):
    """Which MI estimator scores blocks and spans."""

    estimator: str = opt(
        DEFAULT_ESTIMATOR,
        "MI estimator (the default, coordinate, was chosen by measurement: docs/estimator-study.md; "
        "--est-opt center=true centres it).",
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

    method: str | None = opt(
        None,
        f"Pruning method (default: {DEFAULT_METHOD}; {LAYERWISE_METHOD}, MI-PRUN's one pass, with --sequential).",
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

    eval_source: str | None = opt(
        None, "Held-out text (default: novel, its evaluation split).", "--eval-text"
    )
    eval_samples: int = opt(16, "Held-out windows.", "--eval-samples", min=1)
    eval_seq_len: int = opt(256, "Held-out window length.", "--eval-seq-len", min=2)


@dataclass
class RepairOptions(Options):
    """What repairs the model after the cut."""

    repair: str | None = opt(
        None,
        f"Repair after the cut (default: {DEFAULT_REPAIR} where the model's family can fold it, else none).",
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
        if self.gguf_type is not None and self.gguf_type not in GGUF_TYPES:
            raise InvalidOptionError(
                f"gguf_type (--gguf-type) must be one of {', '.join(GGUF_TYPES)}, got {self.gguf_type!r}; "
                "K-quants such as Q4_K_M need llama.cpp's compiled llama-quantize, run on the f16 file"
            )
        if self.save_dtype is not None and self.save_dtype not in DTYPE_NAMES:
            raise InvalidOptionError(
                f"save_dtype (--save-dtype) must be one of {', '.join(DTYPE_NAMES)}, got {self.save_dtype!r}"
            )
