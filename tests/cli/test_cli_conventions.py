"""Command-line conventions that need no model: shell completion, `--json` beside the folder `--out`,
`--revision`, and refusals that arrive before any model is loaded.

The refusal tests name a model path that does not exist: an option error printed instead of "model not
found" shows that the option was checked before the model was even looked for, let alone loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import SRC

from miprun.cli import main
from miprun.errors import InvalidOptionError
from miprun.model.loading import check_revision

MISSING_MODEL = "./no-such-model"


def _miprun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m miprun ARGS`` in a fresh process (completion is driven by environment variables)."""
    environ = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "miprun", *args], capture_output=True, text=True, env=environ, timeout=120
    )


def test_show_completion_prints_a_bash_script() -> None:
    # typer detects the user's shell from the process tree, which a background job (nohup, CI) may not show;
    # its own switch makes --show-completion take the shell's name instead
    named = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = _miprun("--show-completion", "bash", env=named)
    assert done.returncode == 0, done.stderr
    assert "complete " in done.stdout and "_MIPRUN_COMPLETE=complete_bash" in done.stdout
    unknown = _miprun("--show-completion", "cmd.exe", env=named)
    assert unknown.returncode == 2 and "is not one of 'bash'" in unknown.stderr and not unknown.stdout


def test_completion_completes_commands_and_flags() -> None:
    env = {"_MIPRUN_COMPLETE": "complete_bash", "COMP_WORDS": "miprun pru", "COMP_CWORD": "1"}
    assert _miprun(env=env).stdout.split() == ["prune"]
    env |= {"COMP_WORDS": "miprun prune --revi", "COMP_CWORD": "2"}
    assert _miprun(env=env).stdout.split() == ["--revision"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "-n", "1", "--calib", "missing.txt"], "text file not found: missing.txt"),
        (["prune", "-n", "1", "--calib", "wikk"], "unknown text source 'wikk'"),
        (["prune", "-n", "1", "--eval", "--eval-text", "missing.txt"], "text file not found"),
        (["prune", "-n", "1", "--scores", "missing.json"], "cannot read scores file missing.json"),
        (["prune", "-n", "1", "--device", "gpu"], "device (--device) must be auto or a torch device"),
        (["prune", "-n", "1", "--device-map", "everywhere"], "device_map (--device-map) must be one of"),
        (["prune", "-n", "1", "--revision", "v1"], "picks a version of a hub model"),
        (["prune", "-n", "1", "--gguf-type", "f16"], "--out-format is transformers"),
        (["score", "--json", "s.json", "--calib", "missing.txt"], "text file not found"),
        (["score", "--json", "s.json", "--revision", "v1"], "picks a version of a hub model"),
        (["eval", "--ppl", "missing.txt"], "text file not found"),
        (["eval", "--revision", "v1"], "picks a version of a hub model"),
        (["compare", "--calib", "missing.txt"], "text file not found"),
        (["compare", "--eval-text", "missing.txt"], "text file not found"),
    ],
)
def test_refusals_arrive_before_the_model_is_looked_for(tmp_path: Path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if args[0] in ("prune", "compare"):
        args = [*args, "--out", str(tmp_path / "out")]
    code = main([args[0], "--model", MISSING_MODEL, *args[1:]])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in " ".join(err.split()), err
    assert "model not found" not in err and not (tmp_path / "out").exists()


def test_an_unavailable_device_is_refused_before_the_embedded_model_is_built(tmp_path, capsys, monkeypatch):
    """The embedded model is built once through pip: a wrong --device must not wait for that."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("MIPRUN_CACHE", str(tmp_path / "empty-cache"))  # nothing built: building would show
    assert main(["prune", "-n", "1", "--device", "cuda", "--out", str(tmp_path / "o")]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "empty-cache" / "models").exists()


@pytest.mark.parametrize("model", [None, "smollm2-135m", MISSING_MODEL, "/abs/path", "a/b/c"])
def test_revision_is_refused_for_every_source_but_a_hub_name(model) -> None:
    with pytest.raises(InvalidOptionError, match="picks a version of a hub model"):
        check_revision(model, "main")


def test_revision_is_accepted_for_a_hub_name_and_refused_when_empty() -> None:
    check_revision("HuggingFaceTB/SmolLM2-135M", "main")
    check_revision("gpt2", "6c0e608")
    with pytest.raises(InvalidOptionError, match="is empty"):
        check_revision("gpt2", " ")


def test_revision_of_a_hub_model_offline_is_one_clear_line(tmp_path: Path) -> None:
    """No hub here: the error says so in one line, names the revision, and shows no traceback."""
    env = {"HF_HUB_OFFLINE": "1", "MIPRUN_CACHE": str(tmp_path / "cache")}
    done = _miprun(
        "score", "-m", "HuggingFaceTB/SmolLM2-135M", "--revision", "v1", "--json", "s.json", env=env
    )
    assert done.returncode == 1
    assert "at revision 'v1' from the Hugging Face Hub: the hub is unreachable" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "s.json").exists()


def test_json_names_the_file_and_the_old_out_still_works_with_a_warning(tmp_path: Path, capsys) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    for path in (old, new):
        path.write_text("{}")
    # both refused for the same reason, each naming the flag the user typed
    assert main(["eval", "--model", MISSING_MODEL, "--json", str(new), "--no-ppl"]) == 1
    err = capsys.readouterr().err
    assert "choose another --json" in " ".join(err.split()) and "deprecated" not in err
    assert main(["eval", "--model", MISSING_MODEL, "--out", str(old), "--no-ppl"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "`eval --out FILE` is deprecated" in err and f"--json {old}" in err
    assert "choose another --out" in err
    assert main(["score", "--json", str(new), "--out", str(old)]) == 2
    assert "give the file once, as --json FILE" in capsys.readouterr().err
    assert main(["score", "--model", MISSING_MODEL]) == 2
    assert "--json FILE" in capsys.readouterr().err
    assert json.loads(old.read_text()) == {} and json.loads(new.read_text()) == {}


def test_out_is_a_folder_in_every_command_that_has_it_in_help() -> None:
    """In --help, -o/--out appears only where it names a folder; the JSON writers show --json."""
    from typer.main import get_command

    from miprun.cli import app

    group = get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        shown = {opt for p in command.params if not getattr(p, "hidden", False) for opt in p.opts}
        if name in ("score", "eval", "bench"):
            assert "--json" in shown and "--out" not in shown, name
        elif "--out" in shown:
            help_text = next(p.help for p in command.params if "--out" in p.opts)
            assert "folder" in help_text.lower(), (name, help_text)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (["-n", "6"], "can remove between 1 and 5 of the model's 6 blocks"),
        (["--ratio", "0.99"], "can remove between 1 and 5"),
        (["--blocks", "2,6"], r"0-based indices in [0, 5] for this 6-block model"),
    ],
)
def test_a_budget_too_large_for_a_local_folder_is_refused_from_its_config(
    tmp_path: Path, capsys, budget, message
):
    folder = tmp_path / "config-only"  # no weights: a refusal that needed the model would fail on them first
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    assert main(["prune", "--model", str(folder), *budget, "--out", str(tmp_path / "o")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "no weights" not in err, err
    if budget[0] == "-n":  # compare's list of N too
        assert main(["compare", "--model", str(folder), "-n", "2,6", "--out", str(tmp_path / "c")]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "no weights" not in err and not (tmp_path / "c").exists(), err


def test_an_offline_task_whose_text_is_too_short_is_refused_before_the_model(tmp_path: Path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("One paragraph. Two sentences.\n\nAnother one. Also two.")
    args = ["eval", "--model", MISSING_MODEL, "--no-ppl", "-t", "next_sentence", "--task-text", str(text)]
    assert main(args) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "the next-sentence task needs at least" in err and "model not found" not in err, err
