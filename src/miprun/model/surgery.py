"""Removing decoder blocks from a causal LM, for good (`remove_blocks`) or for one `with` block (`skip_blocks`).

Both compute the same list of edits: the shorter layer list, the config's layer count, every per-layer
config list trimmed, bottom-counting fields recounted, layer-index lists renumbered, and each kept layer's
`layer_idx` set to its new position. That last one matters: attention layers read and write the KV cache
at `layer_idx`, so a stale value makes cached generation use the wrong slot (or run past the cache).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from miprun.errors import InvalidOptionError, InvalidTypeError, UnsupportedArchitectureError
from miprun.model.layouts import (
    Layout,
    decoder_layers,
    layers_parent,
    layout_for,
    model_config,
    text_config,
)

log = logging.getLogger(__name__)

# List-valued config fields that are never per-layer, even if their length happens to equal the layer count.
_NOT_PER_LAYER = frozenset(
    {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"}
)


@dataclass(frozen=True)
class _Edit:
    """Set `target.name = value` (a module attribute or a config field)."""

    target: Any
    name: str
    value: Any


def _validate(removed: Sequence[int], total: int) -> list[int]:
    """Sorted 0-based indices to remove, after checking they are unique, in range and not every layer."""
    removed = list(removed)  # may be any iterable of ints; it is read more than once
    indices: list[int] = []
    for raw in removed:
        if isinstance(raw, bool):
            raise InvalidTypeError(f"Block indices must be integers, got the bool {raw!r}.")
        try:
            indices.append(operator.index(raw))
        except TypeError:
            raise InvalidTypeError(
                f"Block indices must be integers, got {raw!r} ({type(raw).__name__})."
            ) from None
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise InvalidOptionError(
            f"Block indices must be unique; {duplicates} appear more than once in {list(removed)}."
        )
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise InvalidOptionError(
            f"Block indices are 0-based and must lie in [0, {total - 1}] for this {total}-block model; "
            f"got {bad}. Negative indices are not accepted, to keep removal plans unambiguous."
        )
    if len(indices) >= total and total > 0:
        raise InvalidOptionError(f"Cannot remove all {total} blocks; keep at least one.")
    return sorted(indices)


def check_exact(config: Any, layout: Layout) -> None:
    """Refuse a config whose layers depend on their index in a way a pruned checkpoint cannot restate."""
    if getattr(config, "is_heterogeneous", False):
        raise UnsupportedArchitectureError(
            "This config sets a heterogeneous `per_layer_config` (overrides keyed by layer index); miprun "
            "cannot renumber those yet. Remove the overrides or open an issue."
        )
    for field, required in layout.exact_only_if:
        value = getattr(config, field, required)
        if value != required:
            raise UnsupportedArchitectureError(
                f"model_type {config.model_type!r} with {field}={value!r} makes each layer depend on its "
                f"index in a way a pruned checkpoint cannot restate, so removing blocks would change the "
                f"kept layers. Block removal needs {field}={required!r}."
            )


def _per_layer_fields(config: Any, layout: Layout, total: int) -> list[str]:
    """Names of config fields that hold one entry per layer (lists or tuples of length `total`)."""
    names = []
    for name, value in vars(config).items():
        if (
            name.startswith("_")
            or name in _NOT_PER_LAYER
            or name in layout.layer_index_fields
            or name.endswith(("_token_id", "_token_ids"))
        ):
            continue
        if isinstance(value, (list, tuple)) and len(value) == total:
            names.append(name)
    return names


def _plan(model: nn.Module, removed: Sequence[int]) -> list[_Edit]:
    """Every edit that turns `model` into the model without blocks `removed`."""
    layout = layout_for(model_config(model))
    config = text_config(model_config(model))
    layers = decoder_layers(model)
    total = len(layers)
    drop = set(_validate(removed, total))
    check_exact(config, layout)
    count = getattr(config, layout.num_layers_field)
    if count != total:
        raise UnsupportedArchitectureError(
            f"config.{layout.num_layers_field} is {count} but the model has {total} decoder layers; "
            "was it edited by hand? Reload the model before removing blocks."
        )
    kept = [i for i in range(total) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}

    parent, attr = layers_parent(model)
    edits = [_Edit(parent, attr, nn.ModuleList([layers[i] for i in kept]))]
    edits.append(_Edit(config, layout.num_layers_field, len(kept)))
    for name in _per_layer_fields(config, layout, total):
        value = getattr(config, name)
        edits.append(_Edit(config, name, type(value)(value[i] for i in kept)))
    for name in layout.layer_count_fields:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            edits.append(_Edit(config, name, sum(1 for i in kept if i < value)))
    for name in layout.layer_index_fields:
        value = getattr(config, name, None)
        if value is not None:
            edits.append(_Edit(config, name, type(value)(new_index[i] for i in value if i in new_index)))
    for new, old in enumerate(kept):
        for module in layers[old].modules():
            for name in layout.layer_idx_attrs:
                value = getattr(module, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value != new:
                    edits.append(_Edit(module, name, new))
    return edits


def _apply(edits: list[_Edit]) -> list[_Edit]:
    """Apply `edits` all or nothing; returns the edits that undo them, in the order to run them."""
    undo: list[_Edit] = []
    try:
        for edit in edits:
            undo.append(_Edit(edit.target, edit.name, getattr(edit.target, edit.name)))
            setattr(edit.target, edit.name, edit.value)
    except BaseException:
        _revert(undo)
        raise
    return undo[::-1]


def _revert(undo: list[_Edit]) -> None:
    for edit in undo:
        setattr(edit.target, edit.name, edit.value)


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """Delete decoder blocks `removed` (0-based) from `model` in place and fix its config; returns `model`.

    The result saves with `save_pretrained` and reloads as an ordinary checkpoint with fewer layers.

    Raises:
        ValueError: the indices are not unique, not in range, or name every block; or the architecture's
            config makes an exact removal impossible.
        UnsupportedArchitectureError: the model_type has no known layout.
    """
    removed = list(removed)
    edits = _plan(model, removed)
    before = len(decoder_layers(model))
    _apply(edits)
    log.info(
        "Removed blocks %s of %s (%d -> %d blocks).",
        sorted(removed),
        model_config(model).model_type,
        before,
        len(decoder_layers(model)),
    )
    return model


@contextmanager
def skip_blocks(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` without blocks `removed` inside the `with` block, then restore it exactly.

    Inside, the model behaves as `remove_blocks(copy_of_model, removed)` would, cached generation
    included, without copying any weights.
    """
    undo = _apply(_plan(model, removed))
    try:
        yield model
    finally:
        _revert(undo)
