"""The real embedded model and text: built through pip on first use (a minute or two), then cached."""

from __future__ import annotations

import math

import pytest

from miprun.assets import DEFAULT_MODEL, embedded_model_dir
from miprun.data import eval_windows, load_text
from miprun.loading import load_model
from miprun.perplexity import mean_nll

pytestmark = pytest.mark.slow


def test_embedded_smollm2_builds_loads_and_predicts_wikipedia() -> None:
    folder = embedded_model_dir(DEFAULT_MODEL)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert embedded_model_dir(DEFAULT_MODEL) == folder  # cached: no second conversion

    loaded = load_model(None, device="cpu", dtype="float32")
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert len(loaded.model.model.layers) == 30
    assert loaded.path == str(folder) and not loaded.model.training

    text = load_text("wiki", "evaluation")
    windows = eval_windows(loaded.tokenizer, text, 256, max_windows=4)
    assert windows.shape == (4, 256)
    nll, count = mean_nll(loaded.model, windows, batch_size=2)
    assert count == 4 * 255
    assert 5.0 < math.exp(nll) < 100.0  # about 14 on these windows; a broken conversion gives thousands
