"""The refusals of ``--out-format gguf|both``, each made as early as what it reads allows.

Two ways to a GGUF: a GGUF source (a ``.gguf`` file or an embedded model) is copied without the removed
blocks (:mod:`miprun.output.gguf`); any other source is saved and converted by llama.cpp's converter
(:mod:`miprun.output.llama_cpp`). What can be checked from the name and the folder's ``config.json`` is
checked before the model is loaded, a hub model's from its ``config.json`` alone (fetched before the weights);
whether a cut is writable is known once the blocks are chosen, before the repair and the cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miprun.errors import GgufError

if TYPE_CHECKING:
    from miprun.model.loading import LoadedModel
    from miprun.options import OutputOptions


def gguf_source(model: Any) -> bool | None:
    """Whether ``model`` (a name, path or :class:`LoadedModel`) comes from a GGUF file; None: not known yet."""
    from miprun.assets import DEFAULT_MODEL, EMBEDDED_MODELS
    from miprun.model.loading import LoadedModel

    if isinstance(model, LoadedModel):
        return model.gguf is not None
    name = DEFAULT_MODEL if model is None else str(model)
    if name in EMBEDDED_MODELS or name.lower().endswith(".gguf"):
        return True
    return False if Path(name).expanduser().is_dir() else None


def check_before_load(
    model: Any, output: OutputOptions, blocks: list[int] | None = None, revision: str | None = None
) -> None:
    """Everything the name and the ``config.json`` of a local folder or a hub model tell, and fetching the
    converter once.

    With an explicit removal set (``--blocks``) whether the cut is writable is known too, and checked.
    """
    if output.out_format == "transformers":
        if output.gguf_type is not None:
            raise GgufError(
                f"--gguf-type {output.gguf_type} sets the type of model.gguf, but --out-format is transformers; "
                "add --out-format gguf (or both), or drop --gguf-type"
            )
        return
    from_gguf = gguf_source(model)
    if from_gguf and output.gguf_type is not None:
        raise GgufError(
            f"--gguf-type {output.gguf_type} applies to transformers sources, which llama.cpp's converter writes; "
            f"{model or 'the embedded model'} is a GGUF source, whose pruned copy keeps each tensor's own type "
            "(a Q4_1 file stays Q4_1). Drop --gguf-type, or pass the model's transformers folder."
        )
    if from_gguf is None and isinstance(model, str):  # a hub name
        config = _hub_config(model, revision)
        if config is not None:
            from miprun.output.llama_cpp import check_convertible

            check_convertible(config, model)
    elif from_gguf is False:
        from miprun.output.llama_cpp import check_convertible

        config_path = Path(str(model)).expanduser() / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        check_convertible(config, str(model))
        text = config.get("text_config") or config
        if blocks and isinstance(text.get("num_hidden_layers"), int):
            from miprun.output.llama_cpp import check_layer_roles

            check_layer_roles({"model_type": config.get("model_type"), **text}, blocks)
    elif from_gguf and blocks and str(model).lower().endswith(".gguf") and Path(str(model)).is_file():
        from miprun.output.gguf import check_pruned_gguf

        check_pruned_gguf(Path(str(model)), blocks)


def _hub_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """A hub model's ``config.json`` (a few kB, from the hub's cache when offline); None when it cannot be
    fetched, for the model's load to say why."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, "config.json", revision=revision)
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # an unknown name, a private model: the load reports it in full
        from miprun.assets import is_hub_unreachable

        if is_hub_unreachable(exc):  # the load would fail the same way, after waiting as long again
            from miprun.model.loading import _load_error

            raise _load_error(exc, name, None, revision) from exc
        return None
    return config if isinstance(config, dict) else None


def check_after_load(loaded: LoadedModel, output: OutputOptions) -> None:
    """A hub model's (or a passed :class:`LoadedModel`'s) config, once it is loaded."""
    if output.out_format == "transformers" or loaded.gguf is not None:
        return
    from miprun.output.llama_cpp import check_convertible

    check_convertible(loaded.model.config.to_dict(), loaded.name)


def check_removal(loaded: LoadedModel, output: OutputOptions, removed: list[int]) -> None:
    """Whether the chosen cut can be written as GGUF (before the repair and the cut, not after them)."""
    if output.out_format == "transformers":
        return
    if loaded.gguf is not None:
        from miprun.output.gguf import check_pruned_gguf

        check_pruned_gguf(loaded.gguf, removed)
        return
    from miprun.model.layouts import model_config, text_config
    from miprun.output.llama_cpp import check_layer_roles

    check_layer_roles(text_config(model_config(loaded.model)).to_dict(), removed)
