"""Shared fixtures: real English text files and a tiny tokenizer trained on them (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from markers import _models_only_in_marked_tests, pytest_runtest_protocol  # noqa: F401  (models: marked tests)
from paths import FIXTURES
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from miprun.assets.packages import cache_dir

CALIBRATION_TXT = FIXTURES / "calibration.txt"
HELDOUT_TXT = FIXTURES / "heldout.txt"
# Under `pytest -n N` (pytest-xdist) the workers share the cores: each real-model test gets its share.
_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
REAL_CACHE = cache_dir()  # the user's cache, before a fast test gets an empty one of its own


def train_tiny_tokenizer(vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on the fixture text; ids 0/1/2 are unk/bos/eos like the tiny configs."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=80
    )
    tok.train([str(CALIBRATION_TXT), str(HELDOUT_TXT)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _offline(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never reach the hub; fast tests get an empty cache, slow ones share the real one (as the demo)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("MIPRUN_CACHE", str(tmp_path / "miprun-cache"))
        # tiny models: extra threads only spin (and stall badly on a shared 2-core machine)
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(_THREADS)
