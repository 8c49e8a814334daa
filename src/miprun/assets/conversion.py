"""A GGUF causal LM dequantised into an ordinary Hugging Face folder (fp32 safetensors plus tokenizer).

The folder is written beside its target and renamed into place, so an interrupted conversion never leaves
a half-written model that a later run would trust.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from miprun.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a Hugging Face folder (fp32 safetensors + tokenizer).

    A GGUF-loaded model refuses ``save_pretrained``, so the weights are moved into a fresh model built
    from the same config without its ``quantization_config``. The folder is written beside ``out_dir``
    and renamed into place; if ``out_dir`` already holds a model it is returned untouched.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_model_dir(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("Converting %s into %s (once; later runs load the converted folder)", gguf_path.name, out_dir)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        with gguf_progress_bar():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, dtype=torch.float32, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:  # numpy's reshape, a short read
        raise ModelLoadError(
            f"cannot read the GGUF file {gguf_path} ({type(exc).__name__}: {exc}): it is truncated or "
            "damaged (compare its size with the source's), or transformers cannot read its architecture "
            "from GGUF; download or convert it again, or pass the model's Hugging Face folder"
        ) from exc
    gguf_model, report = loaded
    _check_every_weight(report, gguf_path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        if len(layer_types) < config.num_hidden_layers:
            raise ModelLoadError(
                f"{gguf_path}: config.layer_types has {len(layer_types)} entries for "
                f"{config.num_hidden_layers} layers; the GGUF metadata is inconsistent"
            )
        config.layer_types = list(layer_types[: config.num_hidden_layers])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return out_dir


def _check_every_weight(report: dict[str, Any], gguf_path: Path) -> None:
    """Refuse a GGUF file that lacks a weight of its model: transformers would initialise it at random."""
    missing = sorted(str(k) for k in report.get("missing_keys") or [])
    mismatched = sorted(
        str(m[0]) if isinstance(m, tuple) else str(m) for m in report.get("mismatched_keys") or []
    )
    if not (missing or mismatched):
        return
    bad = missing or mismatched
    what = "missing" if missing else "of the wrong shape"
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ModelLoadError(
        f"{gguf_path} lacks weights of its model: {len(bad)} {what} ({', '.join(bad[:3])}{more}), which "
        "would be filled with random values; use a complete GGUF file (download or convert it again)"
    )


@contextlib.contextmanager
def gguf_progress_bar() -> Iterator[None]:
    """Hide the bar transformers' GGUF loader draws when its progress bars are off (``-q``).

    That loader calls ``tqdm`` itself, deaf to ``transformers.utils.logging.disable_progress_bar()``, so
    for the duration its ``tqdm`` is one that draws nothing.
    """
    import transformers.modeling_gguf_pytorch_utils as loader
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled() or not hasattr(loader, "tqdm"):
        yield
        return
    original = loader.tqdm
    loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp and some writers make private files; a model cache is not secret
    for child in tmp.iterdir():
        os.chmod(child, 0o644)
    if target.exists() and not is_model_dir(target):
        shutil.rmtree(target)  # a leftover without a model in it
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_model_dir(target):
            raise
