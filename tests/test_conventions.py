"""Command-line conventions: `--version`, an explicit removal set (`--blocks`), `-q` quiet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model

import miprun
from miprun.cli import main
from miprun.errors import InvalidOptionError
from miprun.model.surgery import remove_blocks

pytestmark = pytest.mark.integration  # the refusals build a tiny model too

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 7, 3, 12]])
CALIB = ["--calib", str(CALIBRATION_TXT), "--samples", "4", "--seq-len", "24"]


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_tokenizer) -> Path:
    model, _ = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_version(capsys) -> None:
    from miprun.versions import package_versions

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"miprun {package_versions()['miprun']}"


@pytest.mark.integration
def test_blocks_removes_exactly_those_blocks_without_a_scoring_pass(tiny_folder: Path) -> None:
    result = miprun.prune(str(tiny_folder), blocks=[4, 1], progress=False)
    expected, _ = tiny_model("llama")
    remove_blocks(expected, [1, 4])
    with torch.no_grad():
        assert torch.allclose(result.model(IDS).logits, expected.eval()(IDS).logits, atol=1e-5)
    plan = result.plan
    assert plan.removed == [1, 4] and plan.search.method == "explicit" and plan.search.num_evaluations == 0
    assert plan.calibration.tokens == 0 and plan.scores is None and "calibration_data" not in plan.timings


@pytest.mark.integration
def test_blocks_through_the_cli_with_repair_evaluation_and_card(
    tiny_folder: Path, tmp_path: Path, capsys
) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "pruned"
    args = ["prune", "-m", str(tiny_folder), "--blocks", "1,3", "--out", str(out), "--repair", "linear"]
    args += ["--repair-opt", "tokens=0", "--repair-opt", "guard=0", "--eval", "--eval-text", str(HELDOUT_TXT)]
    args += ["--eval-samples", "2", "--eval-seq-len", "24", *CALIB]
    assert main(args) == 0
    manifest = json.loads((out / "miprun.json").read_text())
    assert manifest["removed"] == [1, 3] and manifest["search"]["method"] == "explicit"
    assert manifest["repair"]["changed"] and manifest["evaluation"]["pruned_ppl"] > 0
    card = ModelCard.load(out / "README.md")
    assert "1, 3" in card.text and "`explicit`" in card.text
    (result,) = card.data.eval_results  # the final perplexity, machine-readable
    assert result.metric_value == pytest.approx(manifest["evaluation"]["pruned_ppl"])
    assert "explicit" in capsys.readouterr().out


@pytest.mark.integration
def test_blocks_with_a_sequential_repair_equals_the_whole_model_one(tiny_folder: Path) -> None:
    """docs/large-models.md's recipe: an explicit set, repaired one layer at a time."""
    common = dict(blocks=[1, 3], repair="linear", repair_params={"tokens": 0, "guard": 0}, progress=False)
    common |= dict(source=str(CALIBRATION_TXT), samples=4, seq_len=24)
    whole = miprun.prune(str(tiny_folder), **common)
    layered = miprun.prune(str(tiny_folder), sequential=True, **common)
    assert whole.plan.repair.changed and layered.plan.repair.changed == whole.plan.repair.changed
    with torch.no_grad():
        assert torch.allclose(layered.model(IDS).logits, whole.model(IDS).logits, atol=1e-4)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"blocks": [1, 1]}, "more than once"),
        ({"blocks": [6]}, r"in \[0, 5\]"),
        ({"blocks": list(range(6))}, "keep at least one"),
        ({"blocks": [1], "num_blocks": 2}, "exactly one of"),
        ({"blocks": [1], "scores": "scores.json"}, "pass one of them"),
    ],
)
def test_blocks_refusals(tiny_folder: Path, changes: dict, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        miprun.prune(str(tiny_folder), progress=False, **changes)


def test_blocks_needs_whole_numbers_on_the_command_line(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    assert main(["prune", "-m", str(tiny_folder), "--blocks", "1,x", "--out", str(tmp_path / "o")]) == 2
    assert "expected whole numbers" in capsys.readouterr().err


@pytest.mark.integration
def test_quiet_prints_no_progress_bar(tiny_folder: Path, tmp_path: Path, capfd) -> None:
    """-q: neither miprun's bars nor transformers' ("Loading weights") reach the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    args = [
        "prune",
        "-m",
        str(tiny_folder),
        "-n",
        "1",
        "--method",
        "last-n",
        "--out",
        str(tmp_path / "o"),
        *CALIB,
    ]
    assert main(args) == 0
    assert "Loading weights" in capfd.readouterr().err  # what -q must hide
    try:
        assert main([*args, "-q", "--overwrite"]) == 0
    finally:
        hf_logging.enable_progress_bar()  # -q turns transformers' bars off for the whole process
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading weights" not in err, err
