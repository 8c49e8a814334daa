"""Tensors between Hugging Face and llama.cpp: GGUF names for Hugging Face parameters, the layout llama.cpp
stores them in (the inverse of what transformers' GGUF loader does on load), and re-quantisation. What each
family needs is its `GgufFacts` in :mod:`miprun.model.layouts`, never a table here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor

from miprun.errors import GgufError
from miprun.model.layouts import GgufFacts, gguf_facts

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F64})


def hard_coded_period(arch: str) -> int | None:
    """The positional period of layer roles llama.cpp hard-codes for ``arch`` (no GGUF key states it)."""
    return next((facts.period for facts in gguf_facts(arch) if facts.period is not None), None)


def _on_load(arch: str) -> GgufFacts | None:
    """The facts of ``arch`` that say how transformers' loader changes its tensors (None: nobody knows)."""
    return next((facts for facts in gguf_facts(arch) if facts.on_load is not None), None)


def hf_to_gguf_names(hf_names: Sequence[str], arch: str, total: int) -> dict[str, str]:
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
        prefixes = [facts.wrapper_prefix for facts in gguf_facts(arch) if facts.wrapper_prefix]
        candidates = (hf_name, *(hf_name.replace(prefix, "model.", 1) for prefix in prefixes))
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


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for its RoPE: within each head, interleave the two rotary halves."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def is_transposed(arch: str, gguf_name: str) -> bool:
    """Whether Hugging Face stores this tensor transposed (GPT-2's Conv1D weights are (in, out))."""
    facts = _on_load(arch)
    return facts is not None and gguf_name.endswith(facts.transposed)


def to_gguf_layout(
    values: np.ndarray, arch: str, gguf_name: str, n_head: int | None = None, n_head_kv: int | None = None
) -> np.ndarray:
    """A Hugging Face parameter in the layout llama.cpp stores it in, inverting transformers' GGUF loader.

    `n_head` and `n_head_kv` (the file's attention head counts) are needed for llama's Q and K only.

    Raises:
        ValueError: the loader transforms this architecture's tensors in a way not inverted here, or a
            head count needed for that is missing.
    """
    facts = _on_load(arch)
    how = facts.on_load if facts is not None else None
    if how == "permuted_qk":
        if ".attn_q." not in gguf_name and ".attn_k." not in gguf_name:
            return values
        heads = n_head if ".attn_q." in gguf_name else (n_head_kv or n_head)
        if not heads:
            raise GgufError(
                f"Writing {gguf_name!r} needs the {arch}.attention.head_count key, which the source GGUF lacks."
            )
        return _permute_qk(values, heads)
    if how == "plus_one_norms":
        return values + 1 if "norm.weight" in gguf_name else values
    if how == "transposed" and facts is not None:
        return np.ascontiguousarray(values.T) if is_transposed(arch, gguf_name) else values
    if how == "none":
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


def field_value(reader: GGUFReader, key: str) -> Any:
    """The decoded value of metadata `key`, or None when the file lacks it."""
    found = reader.get_field(key)
    return None if found is None else found.contents()


def block_index(name: str) -> int | None:
    """The block a tensor belongs to (`blk.N.*`), or None for the embedding, output norm and head."""
    match = _BLOCK.match(name)
    return None if match is None else int(match.group(1))


def _head_count(reader: GGUFReader, key: str, block: int) -> int | None:
    """A head count that may be stored once or per layer."""
    value = field_value(reader, key)
    if isinstance(value, list):
        return int(value[block])
    return value if isinstance(value, int) else None


def encode_replaced(
    reader: GGUFReader, arch: str, tensor: ReaderTensor, hf_name: str, value: torch.Tensor
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A replaced tensor's new value in llama.cpp's layout, encoded like the source tensor where possible."""
    values = value.detach().to("cpu", torch.float32).numpy()
    expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if is_transposed(arch, tensor.name):
        expected = expected[::-1]
    if values.shape != expected:
        raise GgufError(
            f"Replaced tensor {hf_name!r} has shape {tuple(values.shape)} but {tensor.name} in the source file "
            f"holds {expected}; pass it in the Hugging Face model's own shape and orientation."
        )
    block = block_index(tensor.name) or 0
    n_head = _head_count(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), block)
    n_head_kv = _head_count(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), block)
    values = to_gguf_layout(values, arch, tensor.name, n_head, n_head_kv)
    return requantize(np.ascontiguousarray(values, dtype=np.float32), tensor.tensor_type)
