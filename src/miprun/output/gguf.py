"""Writing a depth-pruned model as GGUF, straight from the GGUF it was loaded from.

Only the blocks change: the kept blocks' tensors are renamed `blk.N.*` in their new order, the block count
and every per-layer metadata array shrink to match, and everything else (tokenizer, chat template,
`general.*`) is carried over. A tensor nobody changed is copied as its raw bytes, quantised blocks and all,
so a Q4_1 file stays Q4_1 and no precision is lost. Tensors a repair changed come in as Hugging Face
parameters; they are renamed with the gguf package's own name map, put back into llama.cpp's layout (the
inverse of what transformers' GGUF loader undoes on load) and re-quantised to their source type where
`gguf.quants` can, else written as F16 (or F32).

Two traps are checked rather than left to the reader of the file:
- llama.cpp and transformers derive some per-layer choices from a layer's *position* (gemma3: every sixth
  layer is global attention; smollm3/llama4: every fourth layer has no RoPE) with no GGUF key to say
  otherwise, so removing blocks can silently change the kept layers. Such removals are refused unless the
  caller accepts the change.
- A sharded GGUF (`split.count` > 1) is refused: only its first shard would be read.
"""

from __future__ import annotations

import logging
import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from miprun.atomic import atomic_path
from miprun.errors import GgufError
from miprun.output.gguf_tensors import (
    encode_replaced,
    field_value,
    hard_coded_period,
    hf_to_gguf_names,
)

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Scalar keys (after `{arch}.`) that state the positional period of layer roles in the file itself; where
# none does, the family's `GgufFacts.period` in model/layouts.py says what llama.cpp hard-codes.
_PERIOD_KEYS = ("full_attention_interval", "interleave_moe_layer_step", "attention.sliding_window_pattern")


@dataclass(frozen=True)
class ReplacedTensor:
    """One tensor written from new values: where it came from and the type it was stored as."""

    hf_name: str  # Hugging Face parameter name, original numbering
    gguf_name: str  # name in the output file (renumbered)
    source_type: str  # GGML type in the source file, e.g. "Q4_1"
    written_type: str  # GGML type in the output: the source type, or F16/F32 where it cannot be re-quantised


@dataclass(frozen=True)
class GgufReport:
    """What `write_pruned_gguf` wrote: block counts, sizes, and the GGML type of every output tensor."""

    source: Path
    out: Path
    architecture: str
    blocks_before: int
    blocks_after: int
    removed: tuple[int, ...]  # 0-based, original numbering
    source_bytes: int
    out_bytes: int
    tensor_types: dict[str, str]  # output tensor name -> GGML type name
    replaced: tuple[ReplacedTensor, ...] = ()
    trimmed_keys: tuple[str, ...] = ()  # per-layer metadata arrays cut to the kept blocks
    layer_pattern_changed: tuple[int, ...] = ()  # new indices whose position-derived role changed

    @property
    def type_counts(self) -> dict[str, int]:
        """How many output tensors have each GGML type, most common first (e.g. {"Q4_1": 189, "F32": 55})."""
        return dict(Counter(self.tensor_types.values()).most_common())

    @property
    def shrink(self) -> float:
        """Fraction of the source file's bytes saved (0.1 = 10 % smaller)."""
        return 1.0 - self.out_bytes / self.source_bytes


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GgufError(f"{path} has no general.architecture key; is it a GGUF model file?")
    return arch


def _block_count(reader: GGUFReader, arch: str, path: Path) -> int:
    key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    count = field_value(reader, key)
    if not isinstance(count, int) or count <= 0:
        raise GgufError(
            f"{path} (architecture {arch!r}) has no positive {key} key (found {count!r}), so its blocks cannot be "
            "counted or removed. Only decoder-stack GGUF models with a block count can be pruned."
        )
    return count


def gguf_block_count(path: Path | str) -> int:
    """Number of decoder blocks of the GGUF model at `path` (its `{arch}.block_count`)."""
    reader = GGUFReader(path)
    return _block_count(reader, _architecture(reader, Path(path)), Path(path))


def gguf_license(path: Path | str) -> str | None:
    """The `general.license` the GGUF file at `path` declares (e.g. "apache-2.0"), or None."""
    value = field_value(GGUFReader(path), gguf.Keys.General.LICENSE)
    return value if isinstance(value, str) and value else None


def _check_removed(removed: Sequence[int], total: int) -> list[int]:
    """Sorted 0-based indices to drop, after checking they are integers, unique, in range and not all."""
    indices = []
    for raw in removed:
        if isinstance(raw, bool):
            raise GgufError(f"Block indices must be integers, got the bool {raw!r}.")
        try:
            indices.append(operator.index(raw))
        except TypeError:
            raise GgufError(f"Block indices must be integers, got {raw!r} ({type(raw).__name__}).") from None
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise GgufError(f"Block indices must be unique; {duplicates} appear more than once in {indices}.")
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise GgufError(
            f"Block indices are 0-based and must lie in [0, {total - 1}] for this {total}-block GGUF; got {bad}."
        )
    if len(indices) >= total:
        raise GgufError(f"Cannot remove all {total} blocks; keep at least one.")
    return sorted(indices)


def _period(reader: GGUFReader, arch: str) -> int | None:
    """The positional period of this architecture's layer roles, when it has one (see module docstring)."""
    for key in _PERIOD_KEYS:
        value = field_value(reader, f"{arch}.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return hard_coded_period(arch)


def pattern_changes(kept: Sequence[int], period: int) -> list[int]:
    """New indices of kept blocks whose positional role ((i + 1) % period == 0) differs from their old one."""
    return [new for new, old in enumerate(kept) if ((old + 1) % period == 0) != ((new + 1) % period == 0)]


def _per_layer_arrays(reader: GGUFReader, arch: str, total: int) -> list[str]:
    """Keys under `{arch}.` whose value is an array with one entry per block."""
    keys = []
    for name, found in reader.fields.items():
        if (
            name.startswith(f"{arch}.")
            and found.types[:1] == [GGUFValueType.ARRAY]
            and len(found.data) == total
        ):
            keys.append(name)
    return keys


def _metadata(reader: GGUFReader, arch: str, total: int, kept: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Replacement values for the keys that depend on the block list, and the per-layer keys trimmed."""
    changed: dict[str, Any] = {gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch): len(kept)}
    trimmed = _per_layer_arrays(reader, arch, total)
    for key in trimmed:
        values = field_value(reader, key)
        changed[key] = [values[i] for i in kept]
    leading = f"{arch}.leading_dense_block_count"  # dense blocks before the MoE ones, counted from the bottom
    value = field_value(reader, leading)
    if isinstance(value, int):
        changed[leading] = sum(1 for i in kept if i < value)
    return changed, trimmed


def _check_tail_blocks(reader: GGUFReader, arch: str, total: int, drop: list[int]) -> None:
    """Refuse removing the multi-token-prediction blocks that some files count as the last blocks."""
    nextn = field_value(reader, f"{arch}.nextn_predict_layers")
    if isinstance(nextn, int) and nextn > 0 and any(i >= total - nextn for i in drop):
        raise GgufError(
            f"Blocks {total - nextn}..{total - 1} of this {arch} GGUF are its {nextn} multi-token-prediction "
            f"block(s), not decoder blocks; remove only blocks below {total - nextn}."
        )


@dataclass
class _Planned:
    """One output tensor: its new name, its type, and the array whose bytes are written."""

    name: str
    data: np.ndarray
    qtype: GGMLQuantizationType
    raw: bool  # copied from the source file as is (its endianness), not computed here


def _new_name(name: str, new_index: Mapping[int, int]) -> str | None:
    """`name` renumbered to the kept blocks' new order; None for a tensor of a removed block."""
    match = _BLOCK.match(name)
    if match is None:
        return name
    old = int(match.group(1))
    return f"blk.{new_index[old]}.{match.group(2)}" if old in new_index else None


def _match_replaced(
    reader: GGUFReader, arch: str, total: int, new_index: Mapping[int, int], hf_names: Sequence[str]
) -> dict[str, str]:
    """Source GGUF tensor name -> Hugging Face name, for each replaced tensor, after checking it can be written."""
    tensors = {tensor.name for tensor in reader.tensors}
    by_gguf: dict[str, str] = {}
    for hf_name, gguf_name in hf_to_gguf_names(hf_names, arch, total).items():
        if gguf_name in by_gguf:
            raise GgufError(
                f"Replaced tensors {by_gguf[gguf_name]!r} and {hf_name!r} both map to {gguf_name!r}; pass one."
            )
        if gguf_name not in tensors:
            raise GgufError(
                f"Replaced tensor {hf_name!r} maps to GGUF tensor {gguf_name!r}, which the source file does not "
                "have (tied embeddings have no output.weight); replace the tensor the file stores instead."
            )
        if _new_name(gguf_name, new_index) is None:
            raise GgufError(
                f"Replaced tensor {hf_name!r} belongs to a removed block; pass only tensors of kept blocks."
            )
        by_gguf[gguf_name] = hf_name
    return by_gguf


def _plan_tensors(
    reader: GGUFReader,
    arch: str,
    total: int,
    new_index: Mapping[int, int],
    replaced: Mapping[str, torch.Tensor],
) -> tuple[list[_Planned], list[ReplacedTensor]]:
    """Every output tensor in source order, with the replaced ones encoded, and what became of those."""
    by_gguf = _match_replaced(reader, arch, total, new_index, list(replaced))
    planned, report = [], []
    for tensor in reader.tensors:
        name = _new_name(tensor.name, new_index)
        if name is None:
            continue
        hf_name = by_gguf.get(tensor.name)
        if hf_name is None:
            planned.append(_Planned(name, tensor.data, tensor.tensor_type, raw=True))
            continue
        data, qtype = encode_replaced(reader, arch, tensor, hf_name, replaced[hf_name])
        planned.append(_Planned(name, data, qtype, raw=False))
        report.append(ReplacedTensor(hf_name, name, tensor.tensor_type.name, qtype.name))
    return planned, report


def _copy_metadata(reader: GGUFReader, writer: gguf.GGUFWriter, changed: Mapping[str, Any]) -> None:
    """Every key of the source, with the values in `changed` substituted (the writer adds the architecture)."""
    for key, found in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        value = changed.get(key, found.contents())
        sub_type = found.types[-1] if found.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, found.types[0], sub_type=sub_type)


def _write_atomically(
    reader: GGUFReader, arch: str, changed: Mapping[str, Any], planned: list[_Planned], out: Path
) -> None:
    """Write the GGUF beside `out` and move it into place in one step (:func:`miprun.atomic.atomic_path`)."""
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
        if isinstance(alignment, int):
            writer.data_alignment = alignment
        _copy_metadata(reader, writer, changed)
        for item in planned:
            writer.add_tensor_info(item.name, item.data.shape, item.data.dtype, item.data.nbytes, item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in planned:
            writer.write_tensor_data(item.data, tensor_endianess=reader.endianess if item.raw else None)
        writer.close()


def check_pruned_gguf(source: Path | str, removed: Sequence[int]) -> None:
    """Raise the error :func:`write_pruned_gguf` would raise for this removal, without writing anything."""
    reader = GGUFReader(Path(source))
    arch = _architecture(reader, Path(source))
    total = _block_count(reader, arch, Path(source))
    drop = _check_removed(removed, total)
    _check_tail_blocks(reader, arch, total, drop)
    period = _period(reader, arch)
    shifted = pattern_changes([i for i in range(total) if i not in set(drop)], period) if period else []
    if shifted:
        raise GgufError(_pattern_message(arch, period, drop, shifted))


def _pattern_message(arch: str, period: int | None, drop: Sequence[int], shifted: Sequence[int]) -> str:
    return (
        f"{arch} gives every {period}th layer a different role by its position, with no GGUF key to say "
        f"otherwise, so removing {list(drop)} would change the role of the blocks that become {list(shifted)}; "
        f"readers would run a different model from the pruned one. Only runs of {period} consecutive blocks or "
        "trailing blocks keep the pattern: try another --num-blocks or --method, or save as transformers "
        "(--out-format transformers) instead."
    )


def write_pruned_gguf(
    source: Path | str,
    out: Path | str,
    removed: Sequence[int],
    *,
    replaced: Mapping[str, torch.Tensor] | None = None,
    allow_layer_pattern_change: bool = False,
) -> GgufReport:
    """Write the GGUF at `source` without blocks `removed` (0-based, original numbering) to `out`.

    `replaced` holds new values for tensors a repair changed, keyed by Hugging Face parameter name in the
    original numbering and in Hugging Face layout. Set `allow_layer_pattern_change` to write a file whose
    position-derived layer roles differ from the source's (see module docstring).

    Raises:
        ValueError: bad indices; no block count; a sharded source; `out` is `source`; a replaced name with no
            GGUF counterpart or of the wrong shape; or a removal that changes position-derived layer roles.
    """
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise GgufError(f"out {out} is the source GGUF itself; write the pruned file to another path.")
    reader = GGUFReader(source)
    arch = _architecture(reader, source)
    split = field_value(reader, "split.count")
    if isinstance(split, int) and split > 1:
        raise GgufError(
            f"{source} is shard 1 of a {split}-file split GGUF; merge it first (llama-gguf-split --merge) and "
            "prune the merged file."
        )
    total = _block_count(reader, arch, source)
    drop = _check_removed(removed, total)
    _check_tail_blocks(reader, arch, total, drop)
    kept = [i for i in range(total) if i not in set(drop)]
    period = _period(reader, arch)
    shifted = pattern_changes(kept, period) if period else []
    if shifted and not allow_layer_pattern_change:
        raise GgufError(_pattern_message(arch, period, drop, shifted))
    changed, trimmed = _metadata(reader, arch, total, kept)
    new_index = {old: new for new, old in enumerate(kept)}
    planned, replaced_report = _plan_tensors(reader, arch, total, new_index, replaced or {})
    _write_atomically(reader, arch, changed, planned, out)
    report = GgufReport(
        source=source,
        out=out,
        architecture=arch,
        blocks_before=total,
        blocks_after=len(kept),
        removed=tuple(drop),
        source_bytes=source.stat().st_size,
        out_bytes=out.stat().st_size,
        tensor_types={item.name: item.qtype.name for item in planned},
        replaced=tuple(replaced_report),
        trimmed_keys=tuple(trimmed),
        layer_pattern_changed=tuple(shifted),
    )
    log.info(
        "Wrote %s: %s blocks %d -> %d (removed %s), %.1f -> %.1f MB, %d replaced tensor(s).",
        out.name,  # its folder may be the output's temporary one, which the user never sees
        arch,
        total,
        len(kept),
        drop,
        report.source_bytes / 1e6,
        report.out_bytes / 1e6,
        len(replaced_report),
    )
    return report
