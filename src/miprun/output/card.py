"""A Hugging Face model card (`README.md`) for a pruned model's output folder.

The card states what a reader of the hub page needs before trusting the model: which blocks were removed
and how they were chosen, what data chose them, what a repair changed, how much quality it cost, and how
to load it. Uploading is left to the hub's own CLI (`hf upload`); miprun has no uploader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from miprun.atomic import atomic_write_text
from miprun.versions import package_versions

log = logging.getLogger(__name__)

TAGS = ("pruned", "miprun", "depth-pruning")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Calibration:
    """The text the removed blocks were chosen on."""

    source: str  # a file name, a dataset name, or "embedded"
    windows: int
    seq_len: int
    tokens: int


@dataclass(frozen=True)
class Result:
    """One evaluation of the dense and the pruned model on the same data (dense may be unknown)."""

    name: str  # e.g. "held-out text (heldout.txt)" or "hellaswag"
    metric: str  # e.g. "perplexity", "acc_norm"
    pruned: float
    dense: float | None = None
    lower_is_better: bool = False
    final: bool = True  # a result of the model in this folder (not of an intermediate, e.g. before repair)


@dataclass(frozen=True)
class OutputFile:
    """A model file in the folder; for a GGUF, how many tensors have each GGML type."""

    name: str  # e.g. "model.safetensors", "model.gguf"
    tensor_types: Mapping[str, int] = field(default_factory=dict)
    note: str | None = None  # what a reader must know about it (e.g. a tokenizer transformers cannot read)

    @property
    def is_gguf(self) -> bool:
        return self.name.endswith(".gguf")


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says about one pruning run."""

    base_model: str  # hub id ("org/name"), local path, or embedded model name
    layers_before: int
    removed: Sequence[int]  # 0-based, original numbering
    method: str
    estimator: str | None = None  # None for methods that read no estimator
    estimator_params: Mapping[str, Any] = field(default_factory=dict)
    license: str | None = None
    repair: str | None = None
    repaired: Sequence[str] = ()  # what the repair changed: parameter names or short descriptions
    calibration: Calibration | None = None
    results: Sequence[Result] = ()
    files: Sequence[OutputFile] = ()
    base_model_id: str | None = None  # its hub id when known (embedded model, config); else from base_model
    miprun_version: str = field(default_factory=lambda: package_versions()["miprun"])
    name: str | None = None  # the card's title; defaults to "<base> pruned to <n> blocks"
    base_model_revision: str | None = None  # the hub revision it was loaded at (``--revision``)

    @property
    def layers_after(self) -> int:
        return self.layers_before - len(self.removed)

    @property
    def has_gguf(self) -> bool:
        return any(f.is_gguf for f in self.files)


def hub_id(name: str) -> str | None:
    """`name` when it reads as a hub repo id (`org/name`, not an existing local path), else None."""
    if not _HUB_ID.match(name) or ".." in name or Path(name).exists():
        return None
    return name


def source_license(folder: Path | str) -> str | None:
    """The license declared in the front matter of `folder/README.md` (a hub model card), if any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        card = ModelCard.load(readme)
    except (ValueError, OSError) as error:  # malformed front matter: say so, but a card can go without
        log.warning("Could not read the license from %s (%s); the card will state none.", readme, error)
        return None
    value = card.data.license
    return value if isinstance(value, str) and value else None


def _blocks(indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in sorted(indices))


def _estimator_line(facts: CardFacts) -> str:
    if facts.estimator is None:
        return "none (this method reads no estimator)"
    params = ", ".join(f"{key}={value!r}" for key, value in sorted(facts.estimator_params.items()))
    return f"`{facts.estimator}`" + (f" ({params})" if params else "")


def _repair_line(facts: CardFacts) -> str:
    if facts.repair is None:
        return "none: the kept blocks are the base model's weights, unchanged"
    changed = list(facts.repaired)
    shown = ", ".join(f"`{name}`" for name in changed[:8]) + (
        f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    )
    return f"`{facts.repair}`" + (f", which changed {shown}" if changed else "")


def _calibration_line(calibration: Calibration | None) -> str:
    if calibration is None:
        return "none (this method reads no calibration text)"
    return (
        f"{calibration.source}: {calibration.windows} windows x {calibration.seq_len} tokens "
        f"({calibration.tokens:,} tokens)"
    )


def _removal_section(facts: CardFacts) -> str:
    return "\n".join(
        [
            "## What was removed",
            "",
            f"- **Removed blocks** (0-based, original numbering): {_blocks(facts.removed)}",
            f"- **Blocks**: {facts.layers_before} -> {facts.layers_after}",
            f"- **Method**: `{facts.method}`",
            f"- **Estimator**: {_estimator_line(facts)}",
            f"- **Calibration**: {_calibration_line(facts.calibration)}",
            f"- **Repair**: {_repair_line(facts)}",
            f"- **miprun**: {facts.miprun_version}",
        ]
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _change(result: Result) -> str:
    if result.dense is None or result.dense == 0:
        return "n/a"
    return f"{(result.pruned - result.dense) / abs(result.dense):+.1%}"


def _results_section(results: Sequence[Result]) -> str | None:
    if not results:
        return None
    rows = [
        "## Results",
        "",
        "| Evaluation | Metric | Dense | Pruned | Change |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        arrow = " (lower is better)" if r.lower_is_better else ""
        rows.append(
            f"| {r.name} | {r.metric}{arrow} | {_number(r.dense)} | {_number(r.pruned)} | {_change(r)} |"
        )
    return "\n".join(rows)


def _files_section(files: Sequence[OutputFile]) -> str | None:
    if not files:
        return None
    lines = ["## Files", ""]
    for f in files:
        types = ", ".join(f"{name} x{count}" for name, count in f.tensor_types.items())
        lines.append(
            f"- `{f.name}`" + (f": tensor types {types}" if types else "") + (f". {f.note}" if f.note else "")
        )
    return "\n".join(lines)


def _usage_section(facts: CardFacts) -> str:
    gguf = next((f.name for f in facts.files if f.is_gguf), None)
    has_transformers_weights = any(f.name.endswith((".safetensors", ".bin")) for f in facts.files)
    load_args = (
        '"ORG/NAME"' if has_transformers_weights or gguf is None else f'"ORG/NAME", gguf_file="{gguf}"'
    )
    parts = [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({load_args})",
        f"model = AutoModelForCausalLM.from_pretrained({load_args})",
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
    ]
    if gguf is not None:
        parts += [
            "",
            "With llama.cpp:",
            "",
            "```sh",
            f'llama-cli -m {gguf} -p "The capital of France is" -n 20',
            "```",
        ]
    parts += [
        "",
        "## Upload",
        "",
        "From this folder, with the Hugging Face CLI (`pip install huggingface_hub`):",
        "",
        "```sh",
        "hf auth login",
        "hf upload ORG/NAME .",
        "```",
    ]
    return "\n".join(parts)


def _title(facts: CardFacts) -> str:
    return facts.name or f"{Path(facts.base_model).name} pruned to {facts.layers_after} blocks"


def _eval_results(results: Sequence[Result]) -> list[EvalResult]:
    """The folder's own results as the hub's machine-readable ``model-index`` (intermediate ones left out)."""
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=re.sub(r"[^a-z0-9]+", "-", r.name.lower()).strip("-")[:80] or "text",
            dataset_name=r.name,
            metric_type=r.metric,
            metric_value=float(r.pruned),
        )
        for r in results
        if r.final
    ]


def _at(revision: str | None) -> str:
    return f" (revision `{revision}`)" if revision is not None else ""


def _body(facts: CardFacts) -> str:
    title = _title(facts)
    intro = (
        f"`{facts.base_model}`{_at(facts.base_model_revision)} with {len(facts.removed)} of its "
        f"{facts.layers_before} decoder blocks removed "
        "by miprun (depth pruning): whole transformer blocks are deleted and the rest are kept as they were "
        "(unless a repair is listed below). Expect some loss of quality against the base model; check it on "
        "your own task before use."
    )
    sections = [
        f"# {title}",
        intro,
        _removal_section(facts),
        _results_section(facts.results),
        _files_section(facts.files),
        _usage_section(facts),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def model_card(facts: CardFacts) -> ModelCard:
    """The model card for a pruned model: hub metadata (front matter) and a body a person can read."""
    tags = [*TAGS, "gguf"] if facts.has_gguf else list(TAGS)
    results = _eval_results(facts.results)
    data = ModelCardData(
        base_model=facts.base_model_id or hub_id(facts.base_model),
        license=facts.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=_title(facts) if results else None,
        eval_results=results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts)}")


def write_model_card(folder: Path | str, facts: CardFacts) -> Path:
    """Write `folder/README.md` atomically and return its path."""
    path = Path(folder) / "README.md"
    atomic_write_text(path, str(model_card(facts)))
    log.info("Wrote the model card (%s).", path.name)  # the folder may be a temporary one the user never sees
    return path
