"""Robustness: bad input gets one clear line and a non-zero exit, nothing the user had is damaged, weights
load only from safetensors, and runs are reproducible and resumable (scores cache)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model
from transformers import BertConfig, PreTrainedModel, T5Config

import miprun.api
import miprun.model.loading
from miprun.api import CalibrationConfig, prune, select
from miprun.assets import cache_dir
from miprun.capture.engine import NonFiniteHiddenStateError, non_finite_message
from miprun.capture.statistic import Tap
from miprun.cli import main
from miprun.errors import MiprunError, NonFiniteError
from miprun.model.layouts import decoder_layers
from miprun.model.loading import LoadedModel, load_model
from miprun.output.manifest import MANIFEST_NAME
from miprun.scores import ScoreResult

FAST = ["--estimator", "gaussian", "--est-opt", "proj_dim=16", "--quiet"]
TINY = ["--calib", str(CALIBRATION_TXT), "--samples", "4", "--seq-len", "24", *FAST]
CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24, seed=0, batch_size=2)
EST = {"estimator": "gaussian", "estimator_params": {"proj_dim": 16}}
# MI-PRUN without a repair: a run that reuses scores needs no forward pass (the default, mi-search + linear,
# measures and repairs with the model)
ONE_PASS = {**EST, "method": "mi-prun", "repair": "none"}
# Fields that hold wall-clock times: the only things allowed to differ between two identical runs.
TIME_KEYS = {"timings", "seconds", "optimum_seconds", "verify_seconds"}


def save_tiny(folder: Path, tokenizer, seed: int = 0, arch: str = "llama") -> Path:
    model, _ = tiny_model(arch, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", tiny_tokenizer)


EARLIER = {"schema_version": 2, "removed": [1], "num_blocks_before": 6, "outputs": ["keep.txt"]}


@pytest.fixture
def previous(tmp_path) -> Path:
    """An earlier miprun output (so ``--overwrite`` may replace it) that must survive every failed run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    (out / MANIFEST_NAME).write_text(json.dumps(EARLIER))
    return out


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``miprun`` in-process; returns (exit code, stderr) after checking the error is one line."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("miprun: error:")]
        assert len(errors) == 1, err
    return code, err


def prune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--out", str(out), *TINY, *extra]


def assert_intact(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", MANIFEST_NAME]
    assert (out / "keep.txt").read_text() == "earlier result"
    assert json.loads((out / MANIFEST_NAME).read_text()) == EARLIER


def assert_no_temp_folders(parent: Path) -> None:
    """Nothing left beside the outputs but their (released, empty) lock files ``.NAME.lock``."""
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == [], leftovers
    for lock in parent.glob(".*.lock"):
        assert lock.is_file() and lock.stat().st_size == 0


def no_forward(*_args, **_kwargs):
    raise AssertionError("the model must not run")


# ------------------------------------------------------------------------------------------ the model


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, *prune_args(tmp_path / "nope", tmp_path / "out", "-n", "1"))
    assert code == 1 and "model not found" in err and "nope" in err and "embedded model" in err


def test_model_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, *prune_args(tmp_path / "empty", tmp_path / "out", "-n", "1"))
    assert code == 1 and "has no config.json" in err and "Hugging Face model folder" in err


def test_unreadable_config(capsys, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"")
    code, err = run_cli(capsys, *prune_args(folder, tmp_path / "out", "-n", "1"))
    assert code == 1 and "could not load the model folder" in err and "not a valid JSON" in err


@pytest.mark.integration
def test_unreadable_weights(capsys, tmp_path, tiny_tokenizer):
    folder = save_tiny(tmp_path / "corrupt", tiny_tokenizer)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    code, err = run_cli(capsys, *prune_args(folder, tmp_path / "out", "-n", "1"))
    assert code == 1 and "could not load the model folder" in err and "safetensors" in err


@pytest.mark.parametrize("config", [BertConfig, T5Config])
def test_unsupported_architecture_before_reading_weights(capsys, tmp_path, config):
    folder = tmp_path / "other"
    config(vocab_size=64, hidden_size=32, num_hidden_layers=2).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config alone is refused
    code, err = run_cli(capsys, *prune_args(folder, tmp_path / "out", "-n", "1"))
    model_type = config.model_type
    assert code == 1 and f"model_type {model_type!r}" in err and "Supported model_types: " in err


@pytest.mark.integration
def test_out_may_not_replace_the_model_folder(capsys, tmp_path, tiny_tokenizer):
    folder = save_tiny(tmp_path / "model", tiny_tokenizer)
    before = (folder / "model.safetensors").read_bytes()
    listing = sorted(os.listdir(folder))
    code, err = run_cli(capsys, *prune_args(folder, folder, "-n", "1", "--overwrite"))  # the folder itself
    assert code == 1 and f"--out {folder.resolve()} is the input {folder.resolve()}" in err
    code, err = run_cli(capsys, *prune_args(folder, tmp_path, "-n", "1", "--overwrite"))  # one that holds it
    assert code == 1 and f"--out {tmp_path.resolve()} contains the input {folder.resolve()}" in err
    assert "choose an output folder apart from the inputs" in err
    code, err = run_cli(capsys, *prune_args(folder, folder / "pruned", "-n", "1"))  # nor lie inside it
    assert code == 1 and f"lies inside the input {folder.resolve()}" in err
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == listing  # nothing added, nothing removed


# ----------------------------------------------------------------------------------------- the budget


# A value the command line can judge alone is a usage error (exit 2) naming the option; one that needs the
# model (its block count) or the combination of options is a run error (exit 1).
@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["-n", "0"], 2, r"(--num-blocks|'-n').*(at least 1|greater than or equal to 1)"),
        (["-n", "-2"], 2, r"(--num-blocks|'-n').*(at least 1|greater than or equal to 1)"),
        (["-n", "two"], 2, r"(--num-blocks|'-n')"),
        (["-n", "6"], 1, re.escape("between 1 and 5 of the model's 6 blocks")),
        (["-n", "40"], 1, re.escape("between 1 and 5 of the model's 6 blocks")),
        (["--ratio", "0.99"], 1, re.escape("ratio 0.99 gives ceil(6 * 0.99) = 6")),
        (["--ratio", "1.5"], 2, re.escape("ratio (--ratio) must be less than 1, got 1.5")),
        (["--ratio", "0"], 2, re.escape("ratio (--ratio) must be greater than 0, got 0.0")),
        (["--ratio", "-0.2"], 2, re.escape("ratio (--ratio) must be greater than 0, got -0.2")),
        (
            ["-n", "2", "--ratio", "0.2"],
            2,  # a command-line mistake: the usage line, before any work
            re.escape(
                "exactly one of num_blocks (--num-blocks N), ratio (--ratio R) or blocks (--blocks I,J,...), got"
            )
            + r"\s+"
            + re.escape("--num-blocks 2 and --ratio 0.2"),
        ),
        (
            [],
            2,
            re.escape("exactly one of num_blocks (--num-blocks N), ratio (--ratio R) or blocks")
            + r".*got none",
        ),
    ],
)
@pytest.mark.integration
def test_bad_budget(capsys, tmp_path, tiny_dir, previous, flags, code, message):
    got, err = run_cli(capsys, *prune_args(tiny_dir, previous, "--overwrite", *flags))
    assert got == code and re.search(message, err), err
    if code == 2:  # shown as click shows usage errors, not as a run's one-line error
        assert "Error: " in err and "miprun: error:" not in err
    assert_intact(previous)


# ------------------------------------------------------------------------------------ calibration text


@pytest.mark.integration
def test_calibration_too_short_for_one_window(capsys, tmp_path, tiny_dir):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    code, err = run_cli(capsys, *prune_args(tiny_dir, tmp_path / "out", "-n", "1", "--calib", str(short)))
    assert code == 1 and "0 windows of 24" in err and "--samples" in err and "--seq-len" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_non_utf8_calibration(capsys, tmp_path, tiny_dir):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Un café au lait, s'il vous plaît.\n".encode("latin-1"))
    code, err = run_cli(capsys, *prune_args(tiny_dir, tmp_path / "out", "-n", "1", "--calib", str(latin)))
    assert code == 1 and "is not valid UTF-8" in err and "re-encode it as UTF-8" in err


@pytest.mark.parametrize(
    ("name", "content"), [("empty.txt", ""), ("blank.txt", "\n \n\n"), ("empty.jsonl", "\n")]
)
@pytest.mark.integration
def test_empty_calibration(capsys, tmp_path, tiny_dir, name, content):
    path = tmp_path / name
    path.write_text(content)
    code, err = run_cli(capsys, *prune_args(tiny_dir, tmp_path / "out", "-n", "1", "--calib", str(path)))
    assert code == 1 and "holds no text" in err and "expected" in err


@pytest.mark.integration
def test_missing_calibration_file(capsys, tmp_path, tiny_dir):
    code, err = run_cli(
        capsys, *prune_args(tiny_dir, tmp_path / "out", "-n", "1", "--calib", str(tmp_path / "gone.txt"))
    )
    assert code == 1 and "text file not found" in err


# ---------------------------------------------------------------------------------------- scores files


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory, tiny_dir) -> Path:
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    assert main(["score", "--model", str(tiny_dir), "--json", str(path), "--no-cache", *TINY]) == 0
    return path


@pytest.mark.integration
def test_scores_for_another_model(capsys, tmp_path, tiny_tokenizer, scores_file, previous):
    other = save_tiny(tmp_path / "other", tiny_tokenizer, seed=1)
    code, err = run_cli(
        capsys, "prune", "--model", other, "--scores", scores_file, "-n", "1", "-o", previous, "--overwrite"
    )
    assert code == 1 and "was made for model" in err and "re-run `miprun score`" in err
    assert_intact(previous)


@pytest.mark.integration
def test_scores_for_another_calibration(capsys, tmp_path, tiny_dir, scores_file):
    args = ["prune", "--model", tiny_dir, "--scores", scores_file, "-n", "1", "-o", tmp_path / "out"]
    code, err = run_cli(capsys, *args, "--calib", HELDOUT_TXT)
    assert code == 1 and "holds other text" in err and "drop --calib" in err
    # the same text under another spelling of its path is accepted
    relative = os.path.relpath(CALIBRATION_TXT)
    assert run_cli(capsys, *args, "--calib", relative)[0] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("this is not json", "cannot read scores file"),
        ('{"some": "json"}', "is not a miprun scores file"),
        ('{"kind": "miprun-scores", "model": {}}', "incomplete, invalid or incompatible miprun scores file"),
        ('{"kind": "miprun-scores", "version": 2, "x": NaN}', "non-finite number NaN"),
    ],
)
@pytest.mark.integration
def test_bad_scores_file(capsys, tmp_path, tiny_dir, content, message):
    path = tmp_path / "scores.json"
    path.write_text(content)
    code, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--scores", path, "-n", "1", "-o", tmp_path / "o"
    )
    assert code == 1 and message in err and "miprun score --json FILE" in err


# ---------------------------------------------------------------------------------- the forward pass


@pytest.mark.integration
def test_non_finite_hidden_states_name_the_block(capsys, tmp_path, tiny_tokenizer):
    model, _ = tiny_model("llama")
    with torch.no_grad():
        decoder_layers(model)[2].mlp.down_proj.weight.fill_(float("inf"))
    folder = tmp_path / "overflowing"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    code, err = run_cli(capsys, *prune_args(folder, tmp_path / "out", "-n", "1"))
    assert code == 1 and "NaN/Inf in the hidden states produced by block 2 in torch.float32" in err
    assert "non-finite weights: model.layers.2.mlp.down_proj.weight" in err
    assert "--dtype float32" not in err  # already float32: a higher precision would not help
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_non_finite_message_advises_float32_only_for_half_precision():
    model, _ = tiny_model("llama")
    for dtype in (torch.bfloat16, torch.float16):
        message = non_finite_message(Tap(state=3), dtype, model)
        assert message.startswith("NaN/Inf in the hidden states produced by block 2")
        assert f"overflows in {dtype}" in message and "Run with --dtype float32" in message
    message = non_finite_message(Tap(state=0), torch.float32, model)
    assert "the embeddings (input of block 0)" in message and "--dtype" not in message
    assert "non-finite weights" not in message  # the weights are finite: not blamed
    assert issubclass(NonFiniteHiddenStateError, MiprunError) and NonFiniteHiddenStateError is NonFiniteError


@pytest.mark.integration
def test_debug_shows_the_traceback(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="between 1 and 5"):
        main(prune_args(tiny_dir, tmp_path / "out", "-n", "6", "--debug"))


# --------------------------------------------------------------------------------------- the output


@pytest.mark.integration
def test_existing_out_without_overwrite(capsys, tiny_dir, previous):
    code, err = run_cli(capsys, *prune_args(tiny_dir, previous, "-n", "1"))
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert_intact(previous)


def _failing_save(exc: BaseException):
    def save_pretrained(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise exc

    return save_pretrained


@pytest.mark.integration
@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_while_saving(capsys, monkeypatch, tmp_path, tiny_dir, previous, existing):
    out = previous if existing else tmp_path / "fresh"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _failing_save(OSError(errno.ENOSPC, "No space")))
    code, err = run_cli(capsys, *prune_args(tiny_dir, out, "-n", "1", "--overwrite"))
    assert code == 1 and "no space left" in err and "free some space" in err
    if existing:
        assert_intact(previous)
    else:
        assert not out.exists()
    assert_no_temp_folders(tmp_path)


@pytest.mark.integration
def test_interrupt_while_saving(capsys, monkeypatch, tmp_path, tiny_dir, previous):
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _failing_save(KeyboardInterrupt()))
    code = main(prune_args(tiny_dir, previous, "-n", "1", "--overwrite"))
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert_intact(previous)
    assert_no_temp_folders(tmp_path)


@pytest.mark.integration
def test_overwrite_replaces_an_earlier_output_but_nothing_else(capsys, tmp_path, tiny_dir, previous):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not miprun's")
    code, err = run_cli(capsys, *prune_args(tiny_dir, foreign, "-n", "1", "--overwrite"))
    assert code == 1 and "holds files miprun did not write (holiday.jpg)" in err
    assert "--overwrite will not replace it" in err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    code, _ = run_cli(capsys, *prune_args(tiny_dir, previous, "-n", "1", "--overwrite"))
    assert code == 0
    names = {p.name for p in previous.iterdir()}
    assert "keep.txt" not in names and {"model.safetensors", MANIFEST_NAME, "report.md"} <= names
    assert json.loads((previous / MANIFEST_NAME).read_text())["num_blocks_before"] == 6
    assert_no_temp_folders(tmp_path)


# -------------------------------------------------------------------------------------- safe loading


@pytest.mark.integration
def test_pickle_only_folder_is_refused_without_unpickling(capsys, monkeypatch, tmp_path, tiny_tokenizer):
    model, _ = tiny_model("llama")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", no_forward)
    code, err = run_cli(capsys, *prune_args(folder, tmp_path / "out", "-n", "1"))
    assert code == 1 and "pickle" in err and "pytorch_model.bin" in err
    assert "safetensors only" in err and "save_pretrained" in err


@pytest.mark.integration
def test_loading_is_safetensors_only_and_trusts_no_code_by_default(monkeypatch, tiny_dir):
    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def record(*args, _name=cls.__name__, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    for trust in (False, True):
        calls.clear()
        load_model(str(tiny_dir), device="cpu", trust_remote_code=trust)
        assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
        assert all(kwargs.get("trust_remote_code") is trust for _, kwargs in calls)
        assert [kw.get("use_safetensors") for name, kw in calls if name == "AutoModelForCausalLM"] == [True]


def test_cli_passes_trust_remote_code(capsys, monkeypatch, tmp_path):
    seen: list[bool] = []

    def fake_load(model, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(miprun.model.loading, "load_model", fake_load)
    for flags in ([], ["--trust-remote-code"]):
        code, err = run_cli(capsys, *prune_args(tmp_path / "m", tmp_path / "o", "-n", "1", *flags))
        assert code == 1 and "stop here" in err
    assert seen == [False, True]


def test_no_pickle_loading_in_the_library():
    src = Path(miprun.api.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


# ------------------------------------------------------------------------- reproducible and resumable


def _without_times(data):
    if isinstance(data, dict):
        return {k: _without_times(v) for k, v in data.items() if k not in TIME_KEYS}
    if isinstance(data, list):
        return [_without_times(v) for v in data]
    return data


def manifest_bytes(out: Path) -> str:
    """``miprun.json`` without its times, re-serialised the way miprun writes it (floats as exact repr)."""
    return json.dumps(_without_times(json.loads((out / MANIFEST_NAME).read_text())), indent=2)


@pytest.mark.integration
def test_same_inputs_give_byte_identical_runs(capsys, tmp_path, tiny_dir):
    outs = {name: tmp_path / name for name in ("cached1", "cached2", "fresh1", "fresh2")}
    for name, out in outs.items():
        flags = ["--no-cache"] if name.startswith("fresh") else []
        assert run_cli(capsys, *prune_args(tiny_dir, out, "-n", "2", *flags))[0] == 0
    text = {name: manifest_bytes(out) for name, out in outs.items()}
    assert text["cached1"] == text["cached2"] and text["fresh1"] == text["fresh2"]
    weights = {name: (out / "model.safetensors").read_bytes() for name, out in outs.items()}
    assert len(set(weights.values())) == 1
    assert len(list((cache_dir() / "scores").glob("*.json"))) == 1  # --no-cache neither read nor wrote it
    # the cache holds every span, a fresh run only those it needed: the same values, the same choice
    cached, fresh = json.loads(text["cached1"]), json.loads(text["fresh1"])
    assert cached["removed"] == fresh["removed"]
    assert len(cached["scores"]["spans"]) == 21 and fresh["scores"]["blocks"] == cached["scores"]["blocks"]
    assert all(span in cached["scores"]["spans"] for span in fresh["scores"]["spans"])


def cached_entry(path: Path) -> ScoreResult:
    """The result stored in a scores-cache entry (``{"sha256": ..., "result": <scores file content>}``)."""
    return ScoreResult.from_json(json.loads(path.read_text())["result"])


def _tiny_loaded(tokenizer) -> LoadedModel:
    return LoadedModel(tiny_model("llama")[0], tokenizer, "tiny-llama", None)


@pytest.mark.integration
def test_second_prune_reuses_cached_scores(caplog, tmp_path, tiny_tokenizer):
    caplog.set_level(logging.INFO, logger="miprun")
    first = prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=CAL, **ONE_PASS, progress=False)
    cached = list((cache_dir() / "scores").glob("*.json"))
    assert len(cached) == 1 and "reusing cached scores" not in caplog.text
    assert cached_entry(cached[0]).table.to_json() == first.plan.scores

    lm = _tiny_loaded(tiny_tokenizer)
    handle = decoder_layers(lm.model)[0].register_forward_pre_hook(no_forward)
    try:
        again = prune(lm, num_blocks=2, calibration=CAL, **ONE_PASS, out=tmp_path / "p2", progress=False)
    finally:
        handle.remove()
    assert "reusing cached scores" in caplog.text and "capture" not in again.plan.timings
    fresh = prune(
        _tiny_loaded(tiny_tokenizer), num_blocks=2, calibration=CAL, **ONE_PASS, cache=False, progress=False
    )
    assert again.plan.removed == fresh.plan.removed == select(cached_entry(cached[0]), 2)[0]
    assert again.plan.search.loss == fresh.plan.search.loss


@pytest.mark.integration
def test_other_settings_miss_the_cache(tmp_path, tiny_tokenizer):
    for seed in (0, 1):
        cal = CalibrationConfig(str(CALIBRATION_TXT), samples=4, seq_len=24, seed=seed, batch_size=2)
        prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=cal, **EST, progress=False)
    prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=CAL, estimator="gaussian", progress=False)
    assert len(list((cache_dir() / "scores").glob("*.json"))) == 3


def _truncate(text: str) -> str:
    return text[: len(text) // 2]  # a crash or a full disk


def _edit(text: str) -> str:
    entry = json.loads(text)  # a hand edit (or bit rot) that keeps valid JSON but not the hash
    entry["result"]["scores"]["blocks"][0]["nmi"] = 0.5
    return json.dumps(entry)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_truncate, "Unterminated string|Expecting"), (_edit, "its content does not match its hash")],
    ids=["truncated", "edited"],
)
def test_damaged_cache_entry_is_recomputed(caplog, tiny_tokenizer, damage, reason):
    first = prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=CAL, **EST, progress=False)
    (entry,) = (cache_dir() / "scores").glob("*.json")
    entry.write_text(damage(entry.read_text()))
    result = prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=CAL, **EST, progress=False)
    assert re.search(rf"ignoring a damaged cached scores file .*\(({reason})", caplog.text), caplog.text
    assert "capture" in result.plan.timings and result.plan.scores == first.plan.scores
    assert cached_entry(entry).table.to_json() == first.plan.scores  # rewritten whole


@pytest.mark.integration
def test_a_cache_entry_of_another_model_is_not_reused(caplog, tiny_tokenizer):
    """An entry moved under another model's key keeps a valid hash, but it is not that model's."""
    other = LoadedModel(tiny_model("llama", seed=1)[0], tiny_tokenizer, "tiny-llama-seed1", None)
    prune(_tiny_loaded(tiny_tokenizer), num_blocks=1, calibration=CAL, **EST, progress=False)
    (mine,) = (cache_dir() / "scores").glob("*.json")
    fresh = prune(other, num_blocks=1, calibration=CAL, **EST, progress=False)
    (theirs,) = set((cache_dir() / "scores").glob("*.json")) - {mine}
    theirs.write_bytes(mine.read_bytes())  # the first model's scores under the second model's key
    other = LoadedModel(tiny_model("llama", seed=1)[0], tiny_tokenizer, "tiny-llama-seed1", None)
    again = prune(other, num_blocks=1, calibration=CAL, **EST, progress=False)
    assert "it was stored under the key" in caplog.text or "it was made for other model" in caplog.text
    assert "capture" in again.plan.timings and again.plan.scores == fresh.plan.scores


@pytest.mark.integration
def test_interrupted_run_resumes_without_a_forward_pass(monkeypatch, tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", _failing_save(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            prune(
                _tiny_loaded(tiny_tokenizer),
                num_blocks=2,
                calibration=CAL,
                **ONE_PASS,
                out=out,
                progress=False,
            )
    assert not out.exists()
    lm = _tiny_loaded(tiny_tokenizer)
    handle = decoder_layers(lm.model)[0].register_forward_pre_hook(no_forward)
    try:
        prune(lm, num_blocks=2, calibration=CAL, **ONE_PASS, out=out, progress=False)
    finally:
        handle.remove()
    assert (out / "model.safetensors").is_file() and (out / MANIFEST_NAME).is_file()


# ------------------------------------------------------------------------------- as a real process


LAUNCHERS = {
    "console-script": [str(Path(sys.executable).with_name("miprun"))],  # what `pip install` puts on PATH
    "python-m": [sys.executable, "-m", "miprun.cli"],
}


def _subprocess(tmp_path: Path, launcher: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIPRUN_CACHE": str(tmp_path / "cache")}
    return subprocess.run([*LAUNCHERS[launcher], *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.integration  # each process imports torch and transformers: seconds apiece
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_real_process_prints_one_line_and_exits_non_zero(tmp_path, launcher):
    if launcher == "console-script" and not Path(LAUNCHERS[launcher][0]).is_file():
        pytest.skip("miprun is not installed as a console script in this environment")
    missing = tmp_path / "missing"
    proc = _subprocess(
        tmp_path, launcher, "prune", "--model", str(missing), "-n", "1", "-o", str(tmp_path / "o")
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"miprun: error: model not found: {missing}. "), lines
    if launcher == "python-m":
        return  # one process is enough to show that this way in works; --debug needs no second look
    debug = _subprocess(tmp_path, launcher, "prune", "--model", str(missing), "-n", "1", "-o", "o", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "miprun.errors.ModelNotFoundError: model not found" in debug.stderr
