"""Perplexity and model loading, on small fixtures (no network, no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from miprun.assets import HubUnreachableError
from miprun.data import load_text
from miprun.errors import InvalidOptionError, ModelLoadError, ModelNotFoundError
from miprun.model.loading import load_model, resolve_device, resolve_dtype
from miprun.model.perplexity import mean_nll, perplexity

# --------------------------------------------------------------------------------------------- fixtures


def _tiny_llama(vocab: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------------------------------ perplexity


@pytest.mark.integration
def test_perplexity_matches_the_models_own_loss() -> None:
    model = _tiny_llama()
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    nll, count = mean_nll(model, windows, batch_size=2)
    assert count == 5 * 11  # position 0 of each window is not predicted
    with torch.no_grad():
        reference = model(input_ids=windows, labels=windows).loss.item()  # HF shifts labels itself
    assert nll == pytest.approx(reference, rel=1e-5)
    assert perplexity(model, windows, batch_size=3) == pytest.approx(math.exp(reference), rel=1e-5)


@pytest.mark.integration
def test_perplexity_rejects_bad_windows() -> None:
    with pytest.raises(ValueError, match="seq_len >= 2"):
        perplexity(_tiny_llama(), torch.zeros(3, 1, dtype=torch.long))


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.integration
def test_load_local_folder(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    _tiny_llama(vocab=len(tiny_tokenizer)).train().save_pretrained(tmp_path / "m")
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="</s>")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token == "</s>"  # pad falls back to eos
    assert loaded.path == str(tmp_path / "m") and loaded.model.dtype == torch.float32
    assert loaded.gguf is None and loaded.source_dtype == torch.float32
    half = load_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    assert half.source_dtype == torch.float32  # what a saved pruned model keeps, whatever the compute dtype


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", r"weights 1 missing \(model\.norm\.weight\)"),
        ("add", r"weights 1 unexpected \(model\.extra\.weight\)"),
        # transformers refuses this one itself; miprun names the folder
        ("reshape", r"of the wrong shape \(model\.norm\.weight\)|could not load the model folder .*/m: "),
    ],
)
@pytest.mark.integration
def test_incomplete_checkpoint_is_refused_not_filled_with_random_weights(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast, edit: str, message: str
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    _tiny_llama(vocab=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    if edit == "drop":
        del weights["model.norm.weight"]
    elif edit == "add":
        weights["model.extra.weight"] = torch.ones(3)
    else:
        weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(str(folder), device="cpu")
    if edit != "reshape":
        assert "does not match its config" in str(info.value) and "random values" in str(info.value)


def test_missing_local_paths_are_file_not_found(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nothing"), "./nothing", "weights.gguf", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="not found"):
            load_model(name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path / "empty"))
    assert issubclass(ModelNotFoundError, FileNotFoundError) and issubclass(
        ModelNotFoundError, ModelLoadError
    )


def test_hub_names_fail_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # The env var is read at import time, so patch the imported flags as well (fails fast, no retries).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match=r"unreachable.*smollm2-135m") as info:
        load_model("some-org/some-model", device="cpu")
    assert info.value.__cause__ is not None
    with pytest.raises(HubUnreachableError, match=r"wikitext2.*unreachable.*\.jsonl.*wiki"):
        load_text("wikitext2", "evaluation")


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in {"cpu", "cuda", "mps"}
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(InvalidOptionError, match=r"unknown dtype 'fp8'.*float32"):
        resolve_dtype("fp8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOptionError, match="CUDA is not available"):
            resolve_device("cuda")
