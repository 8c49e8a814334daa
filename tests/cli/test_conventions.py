"""Command-line conventions on a tiny model: `--version`, an explicit removal set (`--blocks`), `-q` quiet, the
revision recorded (the conventions that need no model: test_cli_conventions.py)."""

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
    result = miprun.prune(str(tiny_folder), blocks=[4, 1], repair="none", progress=False)  # the cut alone
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


@pytest.mark.integration
def test_quiet_eval_prints_nothing_on_stderr(tiny_folder: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    """-q: lm-eval's bars, datasets' "Generating test split" and git's "fatal: not a git repository" (lm-eval
    asks git for the working folder's commit) stay off; without -q the bars are there."""
    monkeypatch.chdir(tmp_path)  # not a git repository
    text = tmp_path / "text.txt"  # next_sentence reads the evaluation split: a fifth of these paragraphs
    text.write_text(
        "\n\n".join(f"Paragraph {i} begins here. It goes on a while. It ends at {i}." for i in range(60))
    )
    args = ["eval", "-m", str(tiny_folder), "--ppl", str(HELDOUT_TXT), "--ppl-seq-len", "16"]
    args += ["--ppl-windows", "2", "-t", "next_sentence", "--task-text", str(text), "--limit", "3"]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" in err and "fatal" not in err
    assert main([*args, "-q", "--json", str(tmp_path / "eval.json")]) == 0
    assert capfd.readouterr().err == ""
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["next_sentence"]["acc"] >= 0


@pytest.mark.integration
def test_quiet_prune_with_a_search_and_a_guarded_repair_prints_nothing(
    tiny_folder: Path, tmp_path: Path, capfd
):
    args = ["prune", "-m", str(tiny_folder), "-n", "2", "--method", "mi-search", "--repair", "linear"]
    args += ["--repair-opt", "tokens=0", "--out", str(tmp_path / "o"), *CALIB[:2], "--samples", "8"]
    args += ["--seq-len", "24"]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "greedy removals" in err and "repair guard" in err  # the long phases have bars
    assert main([*args, "-q", "--overwrite"]) == 0
    assert capfd.readouterr().err == ""


@pytest.mark.integration
def test_the_revision_is_recorded_in_the_manifest_and_the_card(tiny_folder: Path, tmp_path: Path) -> None:
    """A hub model loaded at a revision (no hub here: a folder's LoadedModel marked as one) keeps it."""
    import dataclasses

    from huggingface_hub import ModelCard

    from miprun.model.loading import load_model

    loaded = dataclasses.replace(load_model(str(tiny_folder), device="cpu"), revision="0123abc")
    miprun.prune(loaded, blocks=[1], repair="none", out=tmp_path / "o", progress=False)
    assert json.loads((tmp_path / "o" / "miprun.json").read_text())["model"]["revision"] == "0123abc"
    assert "(revision `0123abc`)" in ModelCard.load(tmp_path / "o" / "README.md").text
