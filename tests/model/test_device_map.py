"""Models placed by an accelerate device map (here CPU and disk offload) score as the plain model does."""

from __future__ import annotations

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from miprun.api import CalibrationConfig, prune, score
from miprun.model.identity import model_fingerprint
from miprun.model.layouts import num_blocks
from miprun.model.loading import LoadedModel
from miprun.model.placement import input_device

CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, seed=0, batch_size=4)
KW = dict(
    calibration=CAL, estimator="gaussian", estimator_params={"proj_dim": 16}, cache=False, progress=False
)
IDS = torch.tensor([[5, 9, 17, 33, 4, 8]])


@pytest.fixture
def folder(tmp_path, tiny_tokenizer):
    """A tiny Llama saved as a normal Hugging Face folder, with its tokenizer."""
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def offloaded(folder, tokenizer, where: dict[int, str]) -> LoadedModel:
    """The model with layer ``i`` on ``where[i]`` ("cpu" or "disk"); accelerate hooks move the weights in."""
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.layers.{i}": where.get(i, "cpu") for i in range(6)}
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=str(folder.parent / "offload"), dtype=torch.float32
    )
    return LoadedModel(model, tokenizer, "tiny-offloaded", str(folder))


@pytest.mark.integration
def test_device_map_auto_scores_as_the_plain_path(folder, monkeypatch):
    import miprun.model.loading as loading

    maps: list[str | None] = []
    real = loading.load_model

    def spy(*args, **kwargs):
        maps.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy)
    plain = score(str(folder), **KW)
    mapped = score(str(folder), device_map="auto", **KW)
    assert mapped.table.to_json() == plain.table.to_json()
    assert maps == [
        None,
        "auto",
    ]  # the option reached the loader (on a CPU-only machine it places all on CPU)


@pytest.mark.integration
def test_disk_offloaded_layers_score_and_prune_as_the_plain_path(folder, tiny_tokenizer):
    lm = offloaded(folder, tiny_tokenizer, {2: "disk", 3: "disk", 5: "disk"})
    assert any(p.device.type == "meta" for p in lm.model.parameters())  # really offloaded
    plain = score(str(folder), **KW)
    assert score(lm, **KW).model.fingerprint == plain.model.fingerprint  # scores files interchange
    assert score(lm, **KW).table.to_json() == plain.table.to_json()
    assert score(lm, sequential=True, **KW).table.to_json() == plain.table.to_json()
    ev = dict(evaluate=True, eval_source=str(HELDOUT_TXT), eval_samples=2, eval_seq_len=24)
    out = folder.parent / "pruned"
    mapped = prune(lm, num_blocks=2, method="mi-optimal", out=out, **ev, **KW)
    # the default repair edits weights in place, which disk-offloaded ones are not: it steps aside
    assert mapped.plan.repair.name == "none"
    reference = prune(str(folder), num_blocks=2, method="mi-optimal", repair="none", **ev, **KW)
    assert mapped.plan.removed == reference.plan.removed
    assert mapped.plan.evaluation.pruned_ppl == pytest.approx(reference.plan.evaluation.pruned_ppl)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert num_blocks(reloaded) == 4
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, reference.model(IDS).logits, atol=1e-5)


@pytest.mark.integration
def test_input_device_sees_through_full_offload(folder, tiny_tokenizer):
    lm = offloaded(folder, tiny_tokenizer, {})
    assert input_device(lm.model) == torch.device("cpu")
    everything = AutoModelForCausalLM.from_pretrained(
        folder, device_map={"": "disk"}, offload_folder=str(folder.parent / "off2"), dtype=torch.float32
    )
    assert all(p.device.type == "meta" for p in everything.parameters())
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model_fingerprint(everything) == model_fingerprint(plain)
    assert input_device(everything) == torch.device("cpu")  # the hook's execution device, not "meta"
