"""The command line on a tiny saved model: help text, prune, score then prune --scores."""

from __future__ import annotations

import json
import re

import pytest
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model

from miprun.cli import main

TINY = ["--calib", str(CALIBRATION_TXT), "--samples", "4", "--seq-len", "24", "--quiet"]


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    model, _ = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["prune", "score"])
def test_help_documents_every_option(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--calib", "--estimator", "--samples", "--seq-len", "--seed", "--out"):
        assert flag in text
    if command == "prune":
        for flag in ("--num-blocks", "--ratio", "--method", "--overwrite", "--scores", "--eval"):
            assert flag in text
    # every option carries a description: the text between one option and the next is never empty
    entries = re.split(r"^\s{2}(?=-)", text.split("Options:", 1)[1], flags=re.M)[1:]
    assert len(entries) > 20
    for entry in entries:
        first, *rest = entry.strip().splitlines()
        described = (
            re.sub(r"^(-\w, )?--[a-z-]+(/ --[a-z-]+)?( [^ ]+)?", "", first).strip() or "".join(rest).strip()
        )
        assert described, f"no description for {first!r}"


@pytest.mark.parametrize(
    ("registry", "flag"), [("methods", "--method"), ("estimators", "--estimator"), ("repairs", "--repair")]
)
def test_help_names_every_registered_choice(registry, flag, capsys):
    """The choices written in --help are the registry's, no more and no fewer, each with its own summary."""
    from miprun import estimators, methods, repair

    names = {"methods": methods.REGISTRY, "estimators": estimators.REGISTRY, "repairs": repair.REGISTRY}[
        registry
    ]
    assert main(["prune", "--help"]) == 0
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(capsys.readouterr().out.split()))  # undo hyphen wraps
    block = text.split(f"{flag} ", 1)[1].split("Choices: ", 1)[1].split("Parameters: `miprun list", 1)[0]
    listed = [entry.split(":", 1) for entry in block.rstrip(". ").split(" | ")]
    assert {name.removesuffix(" (default)") for name, _ in listed} == set(names), listed
    for name, summary in listed:  # generated from the plugin's own summary, not written in the help
        plain = name.removesuffix(" (default)")
        assert summary.strip() == re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(names[plain].summary.split()))


@pytest.mark.integration
def test_prune_through_the_cli(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            str(tiny_folder),
            "-n",
            "2",
            "--out",
            str(out),
            "--eval",
            "--eval-text",
            str(HELDOUT_TXT),
            "--eval-samples",
            "2",
            "--eval-seq-len",
            "24",
            "--est-opt",
            "proj_dim=16",
            "--estimator",
            "gaussian",
            *TINY,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pruned model:" in printed and str(out) in printed.replace("\n", "")
    manifest = json.loads((out / "miprun.json").read_text())
    assert len(manifest["removed"]) == 2 and manifest["estimator"]["proj_dim"] == 16
    assert manifest["evaluation"]["pruned_ppl"] > 0


@pytest.mark.integration
def test_mi_verified_shows_every_candidate_with_its_mi_rank_and_measured_score(tiny_folder, tmp_path, capsys):
    out = tmp_path / "verified"
    args = ["prune", "--model", str(tiny_folder), "-n", "2", "--method", "mi-verified", "--out", str(out)]
    assert main([*args, "--method-opt", "candidates=5", *TINY]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "miprun.json").read_text())["search"]["params"]
    title = (
        f"{len(record['candidates'])} MI candidates measured (kl on {record['verification_tokens']} tokens"
    )
    flat = " ".join(printed.split())  # rich wraps the title
    assert title in flat and f"MI's #{record['chosen_mi_rank']}" in flat
    for candidate in record["candidates"]:  # every candidate's measured objective is on screen
        assert f"{candidate['measured']:.4f}" in printed
    assert "(chosen)" in printed


@pytest.mark.integration
def test_mi_search_with_a_repair_shows_the_sets_it_measured_after_the_repair(tiny_folder, tmp_path, capsys):
    out = tmp_path / "searched"
    args = ["prune", "--model", str(tiny_folder), "-n", "2", "--method", "mi-search", "--out", str(out)]
    args += ["--repair", "linear", "--repair-opt", "tokens=0", "--method-opt", "tokens=96"]
    assert main([*args, "--method-opt", "probe_tokens=24", *TINY]) == 0
    flat = " ".join(capsys.readouterr().out.split())  # rich wraps titles
    record = json.loads((out / "miprun.json").read_text())["search"]["params"]
    assert record["repaired_probe"] and "the best cuts measured after the repair on 24 tokens" in flat
    for rehearsed in record["repaired_probe"]:
        assert f"{rehearsed['measured']:.4f}" in flat
    assert "(finalist)" in flat and "(chosen)" in flat
    stages = ", ".join(f"{name} {passes:.2f}" for name, passes in record["passes_by_stage"].items())
    assert f"forward passes by stage: {stages}" in flat and "repaired probe" in record["passes_by_stage"]
    gave_way = f" ({', '.join(record['budget_gave_way'])} gave way)" if record["budget_gave_way"] else ""
    assert f"budget: {record['budget_passes']:.2f} forward passes{gave_way}" in flat
    assert f"measured at the end on {record['final_tokens']} tokens" in flat


@pytest.mark.integration
def test_show_prints_a_saved_run_as_prune_printed_it(tiny_folder, tmp_path, capsys):
    """`miprun show DIR` reads miprun.json back: the same summary, the search's record included, without a
    model; a folder without a manifest is a one-line error."""
    out = tmp_path / "searched"
    args = ["prune", "--model", str(tiny_folder), "-n", "2", "--method", "mi-search", "--out", str(out)]
    assert (
        main([*args, "--repair", "linear", "--repair-opt", "tokens=0", "--method-opt", "tokens=96", *TINY])
        == 0
    )
    printed = capsys.readouterr().out
    summary = printed.split("pruned model:")[0]
    assert "finalists" in summary and "calibration" in summary
    for shown in (out, out / "miprun.json"):
        assert main(["show", str(shown)]) == 0
        assert capsys.readouterr().out == summary
    assert main(["show", str(tiny_folder)]) == 1
    err = capsys.readouterr().err
    assert (
        "cannot read the pruning plan" in err and "miprun.json" in err and len(err.strip().splitlines()) == 1
    )


@pytest.mark.integration
def test_score_then_prune_with_scores(tiny_folder, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert main(["score", "--model", str(tiny_folder), "--json", str(scores), *TINY]) == 0
    assert "scores written" in capsys.readouterr().out
    before = scores.read_text()
    assert main(["score", "--model", str(tiny_folder), "--json", str(scores), "--seed", "1", *TINY]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err and scores.read_text() == before
    data = json.loads(scores.read_text())
    assert data["scores"]["num_blocks"] == 6 and len(data["scores"]["spans"]) == 21
    for n in ("1", "3"):
        out = tmp_path / f"p{n}"
        assert (
            main(
                ["prune", "--model", str(tiny_folder), "--scores", str(scores), "-n", n, "-o", str(out), "-q"]
            )
            == 0
        )
        assert len(json.loads((out / "miprun.json").read_text())["removed"]) == int(n)


@pytest.mark.integration
def test_errors_are_one_line_without_traceback(tiny_folder, tmp_path, capsys):
    code = main(["prune", "--model", str(tiny_folder), "-n", "6", "--out", str(tmp_path / "x"), *TINY])
    err = capsys.readouterr().err
    assert code != 0
    assert "between 1 and 5" in err and "Traceback" not in err
