"""Healing under ``accelerate launch``: two CPU processes (gloo) end with the one-process weights at the same
global batch, and an interrupted two-process run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CALIBRATION_TXT
from paths import SRC, TESTS
from processes import popen
from safetensors.torch import load_file
from tiny_models import tiny_model

import miprun
from miprun.model.loading import as_loaded
from miprun.options import HealConfig
from miprun.repair.heal import heal
from miprun.repair.heal.checkpoints import MARKER

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# accelerate's multi-process launcher (torchrun underneath); on a machine without GPUs the processes join
# over gloo on the CPU (accelerate's --cpu alone starts a single process).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# 5 steps of 4 windows of 32 tokens (2 per process in the two-process runs), a checkpoint every 2 steps.
SETTINGS: dict[str, Any] = {"tokens": 640, "seq_len": 32, "batch_size": 4, "lr": 1e-2, "rank": 4}
SETTINGS |= {"checkpoint_every": 2, "source": str(CALIBRATION_TXT)}
CLI = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "source"]
CLI += ["--calib", str(CALIBRATION_TXT), "-q"]


@pytest.fixture
def folders(tmp_path: Path, tiny_tokenizer: Any) -> tuple[Path, Path]:
    """A tiny dense folder and its `miprun prune` output (2 of 6 blocks removed)."""
    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("llama")[0].save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    calibration = {"source": str(CALIBRATION_TXT), "samples": 4, "seq_len": 24}
    miprun.prune(
        str(dense), num_blocks=2, method="last-n", **calibration, cache=False, out=pruned, progress=False
    )
    return dense, pruned


def _run(args: list[str], tmp_path: Path, ok: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    env |= {"HF_HUB_OFFLINE": "1", "MIPRUN_CACHE": str(tmp_path / "miprun-cache")}
    child = popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = child.communicate(timeout=600)
    assert (child.returncode == 0) == ok, output[-4000:]
    return output


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_heal_to_the_one_process_weights(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, pruned = folders
    heal_args = ["-m", "miprun", "heal", "--model", str(pruned), *CLI]
    _run([sys.executable, *heal_args, "--out", str(tmp_path / "one")], tmp_path)
    _run([*LAUNCH, *heal_args, "--out", str(tmp_path / "two")], tmp_path)

    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    before = load_file(pruned / "model.safetensors")
    assert _max_difference(one, before) > 1e-2  # healing moved the weights...
    difference = _max_difference(one, two)
    print(
        f"two processes vs one: max |dw| {difference:.3g} (healing moved weights by {_max_difference(one, before):.3g})"
    )
    assert difference < 1e-5  # ...to the same place in one process and in two
    runs = [json.loads((tmp_path / name / "miprun.json").read_text())["heal"] for name in ("one", "two")]
    assert [run["processes"] for run in runs] == [1, 2]
    assert runs[1]["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5)
    assert not list(tmp_path.glob(".*.heal-work"))  # each finished run removed its checkpoints


def test_an_interrupted_two_process_heal_resumes(folders: tuple[Path, Path], tmp_path: Path) -> None:
    dense, pruned = folders
    work, out = tmp_path / "work", tmp_path / "resumed.safetensors"
    worker = [*LAUNCH, str(TESTS / "heal_worker.py"), str(pruned), str(dense), str(work), str(out)]
    settings = [f"{k}={v}" for k, v in SETTINGS.items()]
    _run([*worker, "3", *settings], tmp_path, ok=False)  # both processes stop after step 3
    assert not out.exists()
    markers = [json.loads(p.read_text()) for p in work.glob(f"checkpoint-*/{MARKER}")]
    assert [m["step"] for m in markers] == [2]
    _run([*worker, "0", *settings], tmp_path)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["resumed"] and report["resumed_at_step"] == 2 and report["processes"] == 2

    student = as_loaded(str(pruned))  # the same heal, uninterrupted, in this one process
    single = heal(
        student, as_loaded(str(dense)), HealConfig(**SETTINGS), work_dir=tmp_path / "one", progress=False
    )
    one = {k: v.detach() for k, v in student.model.state_dict().items()}
    difference = _max_difference(one, load_file(out))
    print(f"interrupted two-process heal, resumed at step 2, vs one process: max |dw| {difference:.3g}")
    assert difference < 1e-5
    assert report["losses"] == pytest.approx(
        single.losses, rel=1e-5
    )  # steps 1-2 from the checkpoint, 3-5 new


def test_sigterm_mid_heal_leaves_a_complete_checkpoint_and_no_output_and_the_rerun_resumes(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """SIGTERM (as a scheduler sends) while `miprun heal` trains: --out is not created, the newest checkpoint
    on disk is complete, and the same command resumes from it and writes the output."""
    import signal
    import time

    _, pruned = folders
    out, work = tmp_path / "healed", tmp_path / "work"
    longer = [a for a in CLI if not a.startswith("--tokens")] + ["--tokens=7680"]  # 60 steps: seconds
    command = [sys.executable, "-m", "miprun", "heal", "--model", str(pruned), "--out", str(out)]
    command += [*longer, "--work-dir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["MIPRUN_CACHE"] = str(tmp_path / "miprun-cache")
    child = popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while (
        not list(work.glob(f"checkpoint-*/{MARKER}")) and child.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    time.sleep(0.3)  # into a later step, or into the next checkpoint's save
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0, output[-3000:]
    assert "stopped by SIGTERM" in output or "healing stopped" in output, output[-3000:]
    assert not out.exists()
    steps = [json.loads(p.read_text())["step"] for p in work.glob(f"checkpoint-*/{MARKER}")]
    assert steps and max(steps) < 60

    _run([*command], tmp_path)
    healed = json.loads((out / "miprun.json").read_text())["heal"]
    assert healed["resumed"] and healed["resumed_at_step"] == max(steps) and healed["steps"] == 60
    assert not work.exists()  # the finished run removed its checkpoints
