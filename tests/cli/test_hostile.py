"""A hostile user's inputs and faults, through the real CLI: nothing of theirs is lost, nothing silently
wrong is returned with exit 0, and every mistake names itself early (issue "never lose a user's files")."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from processes import popen
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from miprun.cli import main
from miprun.errors import MiprunError, ModelLoadError, ScoresError
from miprun.scores import ScoreResult

pytestmark = pytest.mark.integration
TINY = ["--calib", str(CALIBRATION_TXT), "--samples", "4", "--seq-len", "24", "--quiet", "--no-cache"]


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama")[0].save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def prune_args(model: Path, out: Path | str, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "-n", "2", "--out", str(out), *TINY, *extra]


# ----------------------------------------------------------------------------- the user's files


def test_out_dot_with_overwrite_keeps_the_users_files(tiny_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (work / "calib.txt").write_text(CALIBRATION_TXT.read_text())
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    args = ["prune", "--model", str(tiny_dir), "-n", "2", "--out", ".", "--overwrite", "--calib", "calib.txt"]
    code = main([*args, "--samples", "2", "--seq-len", "24", "--quiet"])
    assert code == 1
    assert "miprun: error:" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["calib.txt", "notes.txt"]
    assert (work / "notes.txt").read_text() == "keep"


def compare_args(model: Path, out: Path | str, *extra: str) -> list[str]:
    tiny = ["--methods", "last-n", "-n", "1", "--forward-repeats", "1", "--eval-text", str(HELDOUT_TXT)]
    tiny += ["--eval-samples", "2", "--eval-seq-len", "16", "--seq-len", "16", "--samples", "2", "--quiet"]
    return [
        "compare",
        "--model",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(CALIBRATION_TXT),
        *tiny,
        *extra,
    ]


def test_compare_follows_the_output_policy_of_prune(tiny_dir, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "c"
    mine.mkdir()
    (mine / "comparison.md").write_text("my own comparison")
    assert main(compare_args(tiny_dir, mine)) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(compare_args(tiny_dir, mine, "--overwrite")) == 1
    assert "holds files miprun did not write (comparison.md)" in capsys.readouterr().err
    monkeypatch.chdir(mine)
    assert main(compare_args(tiny_dir, ".", "--overwrite")) == 1
    assert "is or contains the current directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["comparison.md"]
    assert (mine / "comparison.md").read_text() == "my own comparison"

    out = tmp_path / "cmp"
    assert main(compare_args(tiny_dir, out)) == 0, capsys.readouterr().err
    written = json.loads((out / "comparison.json").read_text())
    assert sorted(written["outputs"]) == sorted(p.name for p in out.iterdir() if p.name != "comparison.json")
    assert main(compare_args(tiny_dir, out)) == 1  # an earlier comparison: only with --overwrite
    assert main(compare_args(tiny_dir, out, "--overwrite")) == 0
    (out / "my_plot.png").write_bytes(b"mine")
    assert main(compare_args(tiny_dir, out, "--overwrite")) == 1
    assert "my_plot.png in it is not listed in its comparison.json" in capsys.readouterr().err
    assert (out / "my_plot.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cmp.")) == []


def test_an_output_inside_the_model_folder_is_refused(tiny_dir, capsys):
    before = sorted(p.name for p in tiny_dir.iterdir())
    assert main(prune_args(tiny_dir, tiny_dir / "pruned")) == 1
    assert "lies inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_the_save_leaves_the_old_output(tiny_dir, tmp_path, sig):
    """A real `miprun prune` process, signalled while it writes the weights over an earlier output."""
    out = tmp_path / "out"
    assert main(prune_args(tiny_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    marker = tmp_path / "saving"
    script = f"""
import sys, time
from pathlib import Path
from miprun.output import save
real = save.save_weights
def slow(model, folder, dtype):
    real(model, folder, dtype)
    Path({str(marker)!r}).write_text("x")
    time.sleep(60)
save.save_weights = slow
from miprun.cli import main
sys.exit(main({prune_args(tiny_dir, out, "--overwrite", "--method", "last-n")!r}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIPRUN_CACHE": str(tmp_path / "cache")}
    child = popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), child.stderr.read() if child.stderr else ""
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + getattr(signal, sig)
    assert f"stopped by {sig}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out.tmp", ".out.old"))]


# ----------------------------------------------------------------------------- never silently wrong


def test_a_nan_span_in_a_scores_file_is_refused(tiny_dir, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    assert main(["score", "--model", str(tiny_dir), "--json", str(scores), *TINY]) == 0
    data = json.loads(scores.read_text())
    data["scores"]["spans"][3]["nmi"] = math.nan
    scores.write_text(json.dumps(data))  # Python writes the bare NaN that strict parsers reject
    assert (
        main(
            ["prune", "--model", str(tiny_dir), "--scores", str(scores), "-n", "2", "-o", str(tmp_path / "p")]
        )
        == 1
    )
    assert "non-finite number NaN" in capsys.readouterr().err
    data["scores"]["spans"][3]["nmi"] = 1.5
    scores.write_text(json.dumps(data))
    with pytest.raises(ScoresError, match="nmi in \\[0, 1\\]"):
        ScoreResult.read(scores)
    del data["scores"]["spans"][0]
    data["scores"]["spans"][2]["nmi"] = 0.5
    scores.write_text(json.dumps(data))
    with pytest.raises(ScoresError, match="lack blocks"):
        ScoreResult.read(scores)


def test_manifests_are_strict_json(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert (
        main(prune_args(tiny_dir, out, "--eval", "--eval-text", str(HELDOUT_TXT), "--eval-seq-len", "24"))
        == 0
    )
    text = (out / "miprun.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in miprun.json"))


@pytest.mark.parametrize("fault", ["missing tensor", "more layers than weights"])
def test_a_checkpoint_with_missing_weights_is_refused(tiny_dir, capsys, fault):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_dir / "model.safetensors")
    if fault == "missing tensor":
        del weights["model.layers.1.mlp.down_proj.weight"]
        save_file(weights, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        config = json.loads((tiny_dir / "config.json").read_text())
        config["num_hidden_layers"] = 8
        (tiny_dir / "config.json").write_text(json.dumps(config))
    assert main(prune_args(tiny_dir, tiny_dir.parent / "out")) == 1
    err = capsys.readouterr().err
    assert "does not match its config" in err and "missing" in err
    assert not (tiny_dir.parent / "out").exists()


@pytest.mark.parametrize(
    ("value", "expected"), [("no", False), ("off", False), ("0", False), ("yes", True), ("TRUE", True)]
)
def test_boolean_estimator_options_mean_what_they_say(tiny_dir, tmp_path, value, expected):
    out = tmp_path / "out"
    assert main(prune_args(tiny_dir, out, "--est-opt", f"center={value}")) == 0
    manifest = json.loads((out / "miprun.json").read_text())
    assert manifest["estimator"]["center"] is expected


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("center=maybe", "true/false"),
        ("centre=true", "Did you mean 'center'"),
        ("shrinkage=abc", "must be float"),
    ],
)
def test_bad_estimator_options_are_usage_errors(tiny_dir, tmp_path, capsys, flag, message):
    assert main(prune_args(tiny_dir, tmp_path / "out", "--est-opt", flag)) == 2
    assert message in capsys.readouterr().err


def test_proj_dim_must_be_positive(tiny_dir, tmp_path, capsys):
    assert (
        main(prune_args(tiny_dir, tmp_path / "o", "--estimator", "gaussian", "--est-opt", "proj_dim=-5")) == 2
    )
    assert "proj_dim" in capsys.readouterr().err


def test_the_compute_dtype_is_not_the_saved_dtype(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(prune_args(tiny_dir, out, "--dtype", "bfloat16")) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32  # the source's dtype
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"
    out16 = tmp_path / "out16"
    assert main(prune_args(tiny_dir, out16, "--save-dtype", "bfloat16")) == 0
    assert AutoModelForCausalLM.from_pretrained(out16, dtype="auto").dtype == torch.bfloat16


# ----------------------------------------------------------------------------- early, named mistakes


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--samples", "0"], "--samples"),
        (["--seq-len", "1"], "--seq-len"),
        (["-n", "2.5"], "-n"),
        (["-r", "abc"], "--ratio"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--repair-opt", "tokens"], "--repair-opt"),
        (["--method", "shortgtp"], "shortgpt"),
    ],
)
def test_command_line_mistakes_exit_2_with_the_usage_line(tiny_dir, tmp_path, capsys, flags, named):
    args = ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *flags]
    if "-n" not in flags and "-r" not in flags:
        args += ["-n", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Usage: miprun prune" in err and named in err


def test_a_sequence_longer_than_the_model_is_refused_before_reading_text(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    import miprun.pipeline.scoring as pipeline

    monkeypatch.setattr(pipeline, "load_text", lambda *a: pytest.fail("text was read"))
    assert (
        main(
            ["prune", "--model", str(tiny_dir), "-n", "2", "--out", str(tmp_path / "o"), "--seq-len", "4096"]
        )
        == 1
    )
    assert "longer than the 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["score", "eval", "bench"])
def test_a_results_file_never_replaces_an_input(tiny_dir, tmp_path, capsys, command):
    text = tmp_path / "text.txt"
    text.write_text(HELDOUT_TXT.read_text())
    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    reads_text = {  # small enough that a run that is not refused completes (and writes) in seconds
        "score": ["--calib", str(text), "--samples", "2", "--seq-len", "16", "--no-cache"],
        "eval": ["--ppl", str(text), "--ppl-seq-len", "16", "--ppl-windows", "2"],
        "bench": ["--prompt-len", "8", "--new-tokens", "2", "--batch-sizes", "1", "--repeats", "1"],
    }[command]
    targets = [tiny_dir / "config.json", tiny_dir / "results.json"]
    targets += [text] if command != "bench" else [tiny_dir / "model.safetensors"]
    for out in targets:
        args = [command, "--model", str(tiny_dir), "--json", str(out), "--overwrite", *reads_text]
        assert main([*args, "--quiet"]) == 1, out
        err = capsys.readouterr().err
        assert "that this run reads" in err and ("is the input" in err or "lies inside the input" in err)
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir()} == before
    assert text.read_text() == HELDOUT_TXT.read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--no-ppl"], "nothing to evaluate: --no-ppl skips perplexity"), (["--ppl", ","], "names no text")],
)
def test_an_evaluation_that_measures_nothing_is_refused(tiny_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_dir), "--json", str(out), "--ppl-seq-len", "16", "--quiet"]
    assert main([*args, *flags]) == 1
    assert message in capsys.readouterr().err and not out.exists()


def test_eval_refuses_a_manifest_that_disagrees_with_the_weights(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(prune_args(tiny_dir, out)) == 0
    manifest = json.loads((out / "miprun.json").read_text())
    (out / "miprun.json").write_text(json.dumps({**manifest, "removed": [*manifest["removed"], 0]}))
    args = [
        "eval",
        "--model",
        str(out),
        "--ppl",
        str(HELDOUT_TXT),
        "--ppl-seq-len",
        "16",
        "--ppl-windows",
        "2",
    ]
    assert main([*args, "--quiet"]) == 1
    assert "3 = 3 blocks remain, but the model beside it has 4" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_bad_names_and_outputs_fail_before_any_work(tiny_dir, tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    if command == "compare":
        args = [
            "compare",
            "--model",
            str(tiny_dir),
            "--methods",
            "mi-prun,shortgtp",
            "--out",
            str(tmp_path / "c"),
        ]
        assert main(args) == 2 and "Did you mean 'shortgpt'" in capsys.readouterr().err
        args = ["compare", "--model", str(tiny_dir), "--out", str(blocker)]
        assert main(args) == 1 and "is a file" in capsys.readouterr().err
    else:
        out = tmp_path / "eval.json"
        out.write_text("{}")
        assert main(["eval", "--model", str(tiny_dir), "--json", str(out), "--no-ppl"]) == 1
        assert "already exists" in capsys.readouterr().err and out.read_text() == "{}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: p.write_bytes(b"text\x00\x01binary"), "NUL bytes"),
        (lambda p: os.mkfifo(p), "is a named pipe (FIFO)"),  # was "text file not found" (issue #19)
    ],
)
def test_bad_calibration_files_are_named(tiny_dir, tmp_path, capsys, make, message):
    calib = tmp_path / "calib.txt"
    make(calib)
    args = ["prune", "--model", str(tiny_dir), "-n", "2", "--out", str(tmp_path / "o"), "--calib", str(calib)]
    assert main([*args, "--samples", "2", "--seq-len", "24"]) == 1
    assert message in capsys.readouterr().err


def test_jsonl_without_text_fields_names_what_it_found(tiny_dir, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"id": "a1", "title": "Dickens"}\n')
    args = ["prune", "--model", str(tiny_dir), "-n", "2", "--out", str(tmp_path / "o"), "--calib", str(calib)]
    assert main([*args, "--seq-len", "24"]) == 1
    assert 'no "text" string field (found: id, title)' in capsys.readouterr().err


def test_missing_tokenizer_files_are_named(tiny_dir, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_dir / name).unlink()
    assert main(prune_args(tiny_dir, tmp_path / "o")) == 1
    assert "has no tokenizer files" in capsys.readouterr().err


def test_a_one_layer_model_says_so(tmp_path, tiny_tokenizer, capsys):
    from tiny_models import tiny_variant

    folder = tmp_path / "one"
    tiny_variant("llama", 1, 64).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    assert main(prune_args(folder, tmp_path / "o")) == 1
    assert "has 1 decoder block" in capsys.readouterr().err


def test_the_same_file_for_calibration_and_held_out_text_warns(tiny_dir, tmp_path, caplog):
    args = ["prune", "--model", str(tiny_dir), "-n", "2", "--out", str(tmp_path / "o"), "--no-cache"]
    args += ["--calib", str(CALIBRATION_TXT), "--eval-text", str(CALIBRATION_TXT), "--eval", "--samples", "4"]
    with caplog.at_level("WARNING"):
        assert main([*args, "--seq-len", "24", "--eval-seq-len", "24", "--eval-samples", "2"]) == 0
    assert "both the calibration and the held-out text" in caplog.text


def test_every_deliberate_error_is_a_miprun_error():
    assert issubclass(ModelLoadError, MiprunError) and issubclass(ScoresError, ValueError)


def test_a_second_run_to_the_same_output_fails_before_any_work(tiny_dir, tmp_path, capsys):
    import threading

    from miprun.atomic import locked_output

    out, held, release = tmp_path / "out", threading.Event(), threading.Event()

    def first_run() -> None:  # stands in for a run that is still working on `out`
        with locked_output(out):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=first_run)
    worker.start()
    try:
        assert held.wait(10)
        assert main(prune_args(tiny_dir, out)) == 1
        assert "is writing --out" in capsys.readouterr().err and not out.exists()
    finally:
        release.set()
        worker.join()
