"""Saving a pruned model into one atomic folder (see :mod:`miprun.atomic`): the checkpoint in the source
checkpoint's dtype and/or a pruned GGUF, the tokenizer, ``miprun.json``, the report and a model card."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from miprun.model.layouts import layout_for, model_config
from miprun.output.manifest import MANIFEST_NAME, PrunePlan

if TYPE_CHECKING:
    from miprun.model.loading import LoadedModel

GGUF_NAME = "model.gguf"
TOKENIZER_SOURCES = ("tokenizer.model",)  # files of a source folder llama.cpp's converter reads
log = logging.getLogger(__name__)


@dataclass
class SaveSettings:
    """How the output folder is written."""

    overwrite: bool = False
    progress: bool = True
    save_dtype: torch.dtype | None = None  # None: the source checkpoint's dtype
    out_format: str = "transformers"  # transformers, gguf or both
    gguf_type: str | None = (
        None  # a transformers source's GGUF type (llama.cpp's converter); None: its default
    )
    inputs: tuple[Path, ...] = ()  # what the run read: the output may neither be nor contain it


def save_weights(model: Any, folder: Path, dtype: torch.dtype | None) -> None:
    """``save_pretrained`` as safetensors, cast to ``dtype`` on the way out when it differs (the model is kept)."""
    current = next(model.parameters()).dtype
    if dtype is None or dtype == current:
        model.save_pretrained(folder, safe_serialization=True)
        return
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    _set_config_dtype(folder / "config.json", dtype)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    from miprun.atomic import write_json

    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            for key in ("dtype", "torch_dtype"):
                if key in holder:
                    holder[key] = name
    write_json(path, config)


def renumbered(name: str, layers_path: str, removed: list[int]) -> str:
    """A parameter name of the dense model (original numbering) as it is named after ``removed`` are cut."""
    prefix = layers_path + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix) :].partition(".")
    old = int(index)
    return f"{prefix}{old - sum(1 for r in removed if r < old)}.{rest}"


def write_gguf(loaded: LoadedModel, plan: PrunePlan, folder: Path) -> Any:
    """The source GGUF without the removed blocks; tensors a repair changed are written from the model."""
    from miprun.output.gguf import write_pruned_gguf

    assert loaded.gguf is not None
    layers_path = layout_for(model_config(loaded.model)).layers_path
    params = dict(loaded.model.named_parameters())
    replaced = {
        name: params[renumbered(name, layers_path, plan.removed)].detach() for name in plan.repair.changed
    }
    return write_pruned_gguf(loaded.gguf, folder / GGUF_NAME, plan.removed, replaced=replaced)


def convert(loaded: LoadedModel, folder: Path, opts: SaveSettings) -> Any:
    """``model.gguf`` through llama.cpp's converter, from ``folder`` when it holds the checkpoint already
    (``both``), else from a scratch checkpoint in the model's own dtype, deleted afterwards."""
    from miprun.output.llama_cpp import DEFAULT_GGUF_TYPE, convert_folder, tokenizer_problem

    gguf_type = opts.gguf_type or DEFAULT_GGUF_TYPE
    source = folder
    if opts.out_format == "gguf":
        source = folder / ".checkpoint-for-gguf"
        save_weights(loaded.model, source, None)
        loaded.tokenizer.save_pretrained(source)
    _copy_tokenizer_sources(loaded, source)
    try:
        converted = convert_folder(source, folder / GGUF_NAME, gguf_type, progress=opts.progress)
    finally:
        if source != folder:
            shutil.rmtree(source, ignore_errors=True)
    problem = tokenizer_problem(folder / GGUF_NAME, loaded.tokenizer)
    if problem is not None:
        log.warning(
            "%s holds the model, but its tokenizer does not survive the round trip: %s. llama.cpp reads the "
            "file's own vocabulary; with transformers, load the tokenizer from the source (%s) instead.",
            GGUF_NAME,
            problem,
            loaded.name,
        )
    return dataclasses.replace(converted, tokenizer_problem=problem)


def _copy_tokenizer_sources(loaded: LoadedModel, folder: Path) -> None:
    """The source folder's ``tokenizer.model`` beside the saved tokenizer: llama.cpp's converter reads a
    sentencepiece vocabulary from it (Llama-2, Gemma), which ``save_pretrained`` of a fast tokenizer drops."""
    if loaded.path is None:
        return
    for name in TOKENIZER_SOURCES:
        found = Path(loaded.path) / name
        if found.is_file() and not (folder / name).exists():
            shutil.copy2(found, folder / name)


def save(loaded: LoadedModel, plan: PrunePlan, out: Path, settings: SaveSettings | None = None) -> None:
    """Write the pruned model, ``miprun.json``, the report and a model card (``README.md``), atomically.

    ``plan.timings["save"]`` records the time up to the manifest (the weights: nearly all of it).
    """
    from miprun.atomic import write_steps
    from miprun.output.report import write_report  # matplotlib is only imported when a report is written

    opts = settings or SaveSettings()
    start = time.perf_counter()
    dtype = opts.save_dtype or loaded.source_dtype
    written: dict[str, Any] = {}

    def manifest(folder: Path) -> None:
        plan.timings["save"] = round(time.perf_counter() - start, 3)
        plan.outputs = sorted(p.name for p in folder.iterdir())
        plan.write(folder / MANIFEST_NAME)

    steps = []
    if opts.out_format in ("transformers", "both"):
        steps += [
            ("weights", lambda d: save_weights(loaded.model, d, dtype)),
            ("tokenizer", lambda d: loaded.tokenizer.save_pretrained(d)),
        ]
    if opts.out_format in ("gguf", "both") and loaded.gguf is not None:
        steps.append(("gguf", lambda d: written.__setitem__("gguf", write_gguf(loaded, plan, d))))
    elif opts.out_format in ("gguf", "both"):
        steps.append(
            ("gguf (llama.cpp's converter)", lambda d: written.__setitem__("gguf", convert(loaded, d, opts)))
        )
    steps += [
        ("manifest", manifest),
        ("report", lambda d: write_report(plan, d)),
        ("model card", lambda d: write_card(loaded, plan, d, written.get("gguf"))),
    ]
    write_steps(out, steps, overwrite=opts.overwrite, progress=opts.progress, inputs=opts.inputs)
    plan.outputs = PrunePlan.read(out / MANIFEST_NAME).outputs  # every file, as written into the manifest


def write_card(loaded: LoadedModel, plan: PrunePlan, folder: Path, gguf_report: Any) -> None:
    """``README.md``: a Hugging Face model card built from the plan (see :mod:`miprun.output.card`)."""
    from miprun.output.card import write_model_card

    write_model_card(folder, card_facts(loaded, plan, folder, gguf_report))


def card_facts(loaded: LoadedModel, plan: PrunePlan, folder: Path, gguf_report: Any) -> Any:
    from miprun.output.card import Calibration, CardFacts, OutputFile, Result, source_license

    files = [OutputFile(p.name) for p in sorted(folder.glob("*.safetensors"))]
    if gguf_report is not None:
        problem = getattr(gguf_report, "tokenizer_problem", None)
        note = (
            f"Its tokenizer does not load back in transformers ({problem}); use the base model's"
            if problem
            else None
        )
        files.append(OutputFile(GGUF_NAME, gguf_report.type_counts, note))
    ev = plan.evaluation
    results = []
    if ev is not None and ev.pruned_ppl is not None:
        text = f"held-out text ({ev.source}, {ev.windows} x {ev.seq_len} tokens)"
        results.append(Result(text, "perplexity", ev.pruned_ppl, ev.dense_ppl, lower_is_better=True))
        if ev.cut_ppl is not None:
            results.append(
                Result(f"{text}, cut before repair", "perplexity", ev.cut_ppl, ev.dense_ppl, True, False)
            )
    results += _heal_results(plan)
    cal = plan.calibration
    return CardFacts(
        base_model=loaded.name,
        base_model_id=base_model_id(loaded),
        base_model_revision=loaded.revision,
        layers_before=plan.num_blocks_before,
        removed=plan.removed,
        method=plan.search.method,
        estimator=plan.estimator["name"] if plan.estimator else None,
        estimator_params={k: v for k, v in (plan.estimator or {}).items() if k != "name"},
        license=_license(loaded, source_license),
        repair=_repair_name(plan),
        repaired=[*plan.repair.changed, *_healed(plan)],
        calibration=Calibration(cal.source, cal.num_windows, cal.seq_len, cal.tokens)
        if cal.num_windows
        else None,
        results=results,
        files=files,
    )


def base_model_id(loaded: LoadedModel) -> str | None:
    """The source's hub id, when miprun knows it: a hub name, an embedded model (or its cached folder), or a
    folder whose ``config.json`` names one (``_name_or_path``)."""
    from miprun.output.card import hub_id

    if (found := hub_id(loaded.name)) is not None:
        return found
    spec = _embedded_spec(loaded)
    if spec is not None:
        return str(spec.hub_id)
    if loaded.path is not None and (config := Path(loaded.path) / "config.json").is_file():
        named = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        return hub_id(named) if isinstance(named, str) else None
    return None


def _embedded_spec(loaded: LoadedModel) -> Any:
    """The embedded model ``loaded`` is, by name or by its converted folder passed as a path; else None."""
    from miprun.assets import EMBEDDED_MODELS, cache_dir

    spec = EMBEDDED_MODELS.get(loaded.name)
    if spec is None and loaded.path is not None:
        folder = Path(loaded.path).resolve()
        spec = next(
            (s for s in EMBEDDED_MODELS.values() if folder == (cache_dir() / "models" / s.name).resolve()),
            None,
        )
    return spec


def _license(loaded: LoadedModel, source_license: Any) -> str | None:
    """The source's license, when it declares one: its model card, its GGUF metadata, or the embedded model's."""

    if loaded.path is not None and (found := source_license(loaded.path)):
        return str(found)
    if loaded.gguf is not None:
        from miprun.output.gguf import gguf_license

        if found := gguf_license(loaded.gguf):
            return str(found)
    spec = _embedded_spec(loaded)
    return str(spec.license_id) if spec is not None else None


def _heal_results(plan: PrunePlan) -> list[Any]:
    from miprun.output.card import Result

    healed = plan.heal.evaluation if plan.heal is not None else None
    if healed is None or healed.healed_ppl is None or healed.pruned_ppl is None:
        return []
    text = f"held-out text ({healed.source}, {healed.windows} x {healed.seq_len} tokens)"
    dense = healed.dense_ppl
    return [
        Result(f"{text}, pruned before healing", "perplexity", healed.pruned_ppl, dense, True, False),
        Result(f"{text}, healed", "perplexity", healed.healed_ppl, dense, True),
    ]


def _repair_name(plan: PrunePlan) -> str | None:
    names = [plan.repair.name] if _changes_weights(plan.repair.name) else []
    if plan.heal is not None:
        names.append("heal (distillation toward the dense model)")
    return " + ".join(names) or None


def _changes_weights(name: str) -> bool:
    """Whether the repair a plan names edits weights (a repair this install does not know is assumed to)."""
    from miprun import repair

    return name not in repair.REGISTRY or repair.REGISTRY.get(name).changes_weights


def _healed(plan: PrunePlan) -> list[str]:
    if plan.heal is None:
        return []
    report = plan.heal.report
    return [
        f"LoRA (rank {report.config.rank}) distilled on {report.tokens} tokens, merged into every linear layer"
    ]
