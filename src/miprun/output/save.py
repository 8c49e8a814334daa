"""Saving a pruned model: weights in the source checkpoint's dtype, tokenizer, manifest, report, in one
atomic folder (see :mod:`miprun.atomic`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from miprun.output.manifest import MANIFEST_NAME, PrunePlan

if TYPE_CHECKING:
    from miprun.model.loading import LoadedModel


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
    import json

    from miprun.atomic import write_json

    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    if isinstance(config.get("text_config"), dict):
        for key in ("dtype", "torch_dtype"):
            if key in config["text_config"]:
                config["text_config"][key] = name
    write_json(path, config)


def save(
    loaded: LoadedModel,
    plan: PrunePlan,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    save_dtype: torch.dtype | None = None,
    inputs: tuple[Path, ...] = (),
) -> None:
    """Write weights (safetensors), tokenizer, ``miprun.json`` and the report, atomically.

    The weights keep the source checkpoint's dtype (``loaded.source_dtype``) unless ``save_dtype`` is
    given. ``plan.timings["save"]`` records the time up to the manifest (weights and tokenizer: nearly all).
    """
    from miprun.atomic import write_steps
    from miprun.output.report import write_report  # matplotlib is only imported when a report is written

    start = time.perf_counter()
    dtype = save_dtype or loaded.source_dtype

    def manifest(folder: Path) -> None:
        plan.timings["save"] = round(time.perf_counter() - start, 3)
        plan.outputs = sorted(p.name for p in folder.iterdir())
        plan.write(folder / MANIFEST_NAME)

    write_steps(
        out,
        [
            ("weights", lambda d: save_weights(loaded.model, d, dtype)),
            ("tokenizer", lambda d: loaded.tokenizer.save_pretrained(d)),
            ("manifest", manifest),
            ("report", lambda d: write_report(plan, d)),
        ],
        overwrite=overwrite,
        progress=progress,
    )
