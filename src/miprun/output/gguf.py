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
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor

from miprun.atomic import atomic_path
from miprun.errors import GgufError

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Architectures whose layers alternate by position with a period that no GGUF key states (llama.cpp
# hard-codes it): the layer at index i is the odd one out (global attention, no RoPE) when (i + 1) % n == 0.
_HARD_CODED_PERIOD = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma-embedding": 6,
    "cohere2": 4,
    "gpt-oss": 2,
    "llama4": 4,
    "smollm3": 4,
}
# Scalar keys (after `{arch}.`) that state such a period in the file itself.
_PERIOD_KEYS = ("full_attention_interval", "interleave_moe_layer_step", "attention.sliding_window_pattern")

# How transformers' GGUF loader changes a tensor on load, per GGUF architecture; we apply the inverse.
# Architectures in none of these sets get no replaced tensors (plain pruning still works for them).
_NO_TRANSFORM = frozenset({"qwen2", "qwen3", "phi3", "starcoder2", "stablelm"})
_PLUS_ONE_NORMS = frozenset({"gemma2", "gemma3", "nemotron"})  # stored as w + 1, loaded as w - 1
_PERMUTED_QK = frozenset({"llama"})  # llama.cpp permutes Q/K rows for its RoPE layout
_TRANSPOSED = {"gpt2": ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")}

_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F64})


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


def _field_value(reader: GGUFReader, key: str) -> Any:
    """The decoded value of metadata `key`, or None when the file lacks it."""
    found = reader.get_field(key)
    return None if found is None else found.contents()


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GgufError(f"{path} has no general.architecture key; is it a GGUF model file?")
    return arch


def _block_count(reader: GGUFReader, arch: str, path: Path) -> int:
    key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    count = _field_value(reader, key)
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
    value = _field_value(GGUFReader(path), gguf.Keys.General.LICENSE)
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
        value = _field_value(reader, f"{arch}.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return _HARD_CODED_PERIOD.get(arch)


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
        values = _field_value(reader, key)
        changed[key] = [values[i] for i in kept]
    leading = f"{arch}.leading_dense_block_count"  # dense blocks before the MoE ones, counted from the bottom
    value = _field_value(reader, leading)
    if isinstance(value, int):
        changed[leading] = sum(1 for i in kept if i < value)
    return changed, trimmed


def _check_tail_blocks(reader: GGUFReader, arch: str, total: int, drop: list[int]) -> None:
    """Refuse removing the multi-token-prediction blocks that some files count as the last blocks."""
    nextn = _field_value(reader, f"{arch}.nextn_predict_layers")
    if isinstance(nextn, int) and nextn > 0 and any(i >= total - nextn for i in drop):
        raise GgufError(
            f"Blocks {total - nextn}..{total - 1} of this {arch} GGUF are its {nextn} multi-token-prediction "
            f"block(s), not decoder blocks; remove only blocks below {total - nextn}."
        )


def _hf_to_gguf_names(hf_names: Sequence[str], arch: str, total: int) -> dict[str, str]:
    """GGUF tensor name (original numbering) for each Hugging Face parameter name, via gguf's own name map."""
    model_arch = next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if model_arch is None:
        raise GgufError(
            f"The installed gguf package has no name map for architecture {arch!r}, so replaced tensors "
            "cannot be named; upgrade gguf, or write the GGUF without a repair (--repair none) or as "
            "transformers (--out-format transformers)."
        )
    name_map = gguf.get_tensor_name_map(model_arch, total)
    names = {}
    for hf_name in hf_names:
        # A multimodal wrapper (gemma3) nests the text decoder one level down; a GGUF holds only that decoder.
        candidates = (hf_name, hf_name.replace("model.language_model.", "model.", 1))
        found = (name_map.get_name(name, try_suffixes=(".weight", ".bias")) for name in candidates)
        gguf_name = next((name for name in found if name is not None), None)
        if gguf_name is None:
            raise GgufError(
                f"Replaced tensor {hf_name!r} has no GGUF counterpart for architecture {arch!r} in gguf's name "
                "map; pass Hugging Face parameter names in the original block numbering, such as "
                "'model.layers.3.mlp.down_proj.weight'."
            )
        names[hf_name] = gguf_name
    return names


def _head_count(reader: GGUFReader, key: str, block: int) -> int | None:
    """A head count that may be stored once or per layer."""
    value = _field_value(reader, key)
    if isinstance(value, list):
        return int(value[block])
    return value if isinstance(value, int) else None


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for its RoPE: within each head, interleave the two rotary halves."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _is_transposed(arch: str, gguf_name: str) -> bool:
    """Whether Hugging Face stores this tensor transposed (GPT-2's Conv1D weights are (in, out))."""
    return gguf_name.endswith(_TRANSPOSED.get(arch, ()))


def to_gguf_layout(
    values: np.ndarray, arch: str, gguf_name: str, n_head: int | None = None, n_head_kv: int | None = None
) -> np.ndarray:
    """A Hugging Face parameter in the layout llama.cpp stores it in, inverting transformers' GGUF loader.

    `n_head` and `n_head_kv` (the file's attention head counts) are needed for llama's Q and K only.

    Raises:
        ValueError: the loader transforms this architecture's tensors in a way not inverted here, or a
            head count needed for that is missing.
    """
    if arch in _PERMUTED_QK:
        if ".attn_q." not in gguf_name and ".attn_k." not in gguf_name:
            return values
        heads = n_head if ".attn_q." in gguf_name else (n_head_kv or n_head)
        if not heads:
            raise GgufError(
                f"Writing {gguf_name!r} needs the {arch}.attention.head_count key, which the source GGUF lacks."
            )
        return _permute_qk(values, heads)
    if arch in _PLUS_ONE_NORMS:
        return values + 1 if "norm.weight" in gguf_name else values
    if arch in _TRANSPOSED:
        return np.ascontiguousarray(values.T) if _is_transposed(arch, gguf_name) else values
    if arch in _NO_TRANSFORM:
        return values
    raise GgufError(
        f"miprun does not know how transformers' GGUF loader lays out {arch!r} tensors, so it cannot write the "
        f"replaced tensor {gguf_name!r}: write the GGUF without a repair (--repair none), or save the repaired "
        "model as transformers (--out-format transformers)."
    )


def requantize(
    values: np.ndarray, source_type: GGMLQuantizationType
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`values` encoded in `source_type` where gguf.quants can, else F16 (F32 where F16 overflows or is lower)."""
    block, _ = gguf.GGML_QUANT_SIZES[source_type]
    if values.shape[-1] % block == 0:
        try:
            return gguf.quants.quantize(values, source_type), source_type
        except NotImplementedError:
            pass
    if source_type not in _FLOAT_TYPES and np.abs(values).max(initial=0.0) <= np.finfo(np.float16).max:
        return values.astype(np.float16), GGMLQuantizationType.F16
    return values.astype(np.float32), GGMLQuantizationType.F32


@dataclass
class _Planned:
    """One output tensor: its new name, its type, and the array whose bytes are written."""

    name: str
    data: np.ndarray
    qtype: GGMLQuantizationType
    raw: bool  # copied from the source file as is (its endianness), not computed here


def _block_index(name: str) -> int | None:
    """The block a tensor belongs to (`blk.N.*`), or None for the embedding, output norm and head."""
    match = _BLOCK.match(name)
    return None if match is None else int(match.group(1))


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
    for hf_name, gguf_name in _hf_to_gguf_names(hf_names, arch, total).items():
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


def _encode_replaced(
    reader: GGUFReader, arch: str, tensor: ReaderTensor, hf_name: str, value: torch.Tensor
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A replaced tensor's new value in llama.cpp's layout, encoded like the source tensor where possible."""
    values = value.detach().to("cpu", torch.float32).numpy()
    expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if _is_transposed(arch, tensor.name):
        expected = expected[::-1]
    if values.shape != expected:
        raise GgufError(
            f"Replaced tensor {hf_name!r} has shape {tuple(values.shape)} but {tensor.name} in the source file "
            f"holds {expected}; pass it in the Hugging Face model's own shape and orientation."
        )
    block = _block_index(tensor.name) or 0
    n_head = _head_count(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), block)
    n_head_kv = _head_count(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), block)
    values = to_gguf_layout(values, arch, tensor.name, n_head, n_head_kv)
    return requantize(np.ascontiguousarray(values, dtype=np.float32), tensor.tensor_type)


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
        data, qtype = _encode_replaced(reader, arch, tensor, hf_name, replaced[hf_name])
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
        alignment = _field_value(reader, gguf.Keys.General.ALIGNMENT)
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
    split = _field_value(reader, "split.count")
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
