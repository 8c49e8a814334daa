"""The ``miprun`` commands of the README's and the docs' shell examples, run for real through the CLI, block by
block in one working folder (a later line reads what an earlier one wrote), with a tiny model standing in
for every model they name; a command that cannot run here says why."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from doc_examples import Block, cache_sharing_the_real_text, commands_of, shell_blocks, tiny_folder

from miprun.cli import main

# The model paths of the examples; each becomes the tiny model (12 blocks, 512 positions).
MODELS = {"./Llama-3.2-1B", "./big-model", "./my-34b", "./llama-2-70b", "./my-llama", "./Llama-3.1-70B"}
# Option values replaced here: zero-shot examples per task only cost time (lm-eval: thousands of requests
# at 200 or 500), and this machine has no GPU (the CPU runs the same code path).
REPLACED = {"--limit": "3", "--device": "cpu"}
# Options added where a command gives none: `compare` runs every method (SLEB: a pass per kept block and step)
# and measures every result, so it reads 8 calibration and 4 held-out windows instead of the default 32 and 16.
ADDED = {"compare": {("--samples", "-s"): "8", ("--eval-samples",): "4"}}
# A command holding one of these cannot run on this machine, for the reason given.
CANNOT = {
    "torchrun": "several processes (GPUs): tests/capture/test_distributed.py runs the data-parallel path on "
    "CPU",
    "accelerate launch": "several processes (GPUs): tests/repair/heal/test_heal_distributed.py runs "
    "`miprun heal` under accelerate launch with two CPU processes",
    ".gguf": "needs a GGUF file: tests/output/test_gguf.py prunes tiny GGUF models of every family",
    "--out out/llama-q8": "llama.cpp's converter needs a tokenizer it knows (the tiny one here is not): "
    "tests/output/test_gguf_convert.py runs this README line on a tiny model with a known tokenizer",
    "--blocks 40,41": "names blocks of an 80-block model: tests/cli/test_conventions.py runs --blocks with a "
    "sequential repair on a tiny one",
}

# A command holding one of these runs in another test, named here, which checks more of what it writes; running
# it again here would only repeat minutes of work on the real model.
ELSEWHERE = {
    "--model ~/.cache/miprun/models/smollm2-135m --blocks 12,14,17": "tests/output/test_gguf_convert.py runs "
    "these README lines as written on a tiny 30-block model with a tokenizer llama.cpp knows "
    "(test_the_readmes_gguf_example_runs_on_a_tiny_model), and the same conversion of the real SmolLM2 "
    "folder (test_smollm2_from_its_transformers_folder_to_gguf)",
}


def why_not(text: str) -> str | None:
    reasons = {**CANNOT, **ELSEWHERE}
    return next((why for needle, why in reasons.items() if needle in text), None)


def runnable(args: list[str], tiny: Path) -> list[str]:
    """``args`` with the tiny model for every model path and for the embedded default where none is given,
    the :data:`REPLACED` values and the :data:`ADDED` options."""
    args = [str(tiny) if a in MODELS else a for a in args]
    args = [REPLACED.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    if args[0] in ("prune", "score", "compare") and not {"--model", "-m"} & set(args):
        args = [args[0], "--model", str(tiny), *args[1:]]  # the default is the embedded SmolLM2
    for names, value in ADDED.get(args[0], {}).items():
        if not set(names) & set(args):
            args += [names[0], value]
    return args


def runs_something(block: Block) -> bool:
    return any(why_not(text) is None for _, text, _ in commands_of(block))


def test_what_cannot_run_is_named_and_every_reason_is_still_needed() -> None:
    texts = [text for block in shell_blocks() for _, text, _ in commands_of(block)]
    unused = [needle for needle in {**CANNOT, **ELSEWHERE} if not any(needle in text for text in texts)]
    assert not unused, f"no example needs these reasons any more: {unused}"
    assert sum(why_not(text) is None for text in texts) >= 15  # most commands run
    assert sum(runs_something(b) for b in shell_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in shell_blocks() if runs_something(b)], ids=lambda b: f"{b.doc.name}:{b.line}"
)
def test_shell_example_runs(block: Block, tmp_path, tiny_tokenizer, monkeypatch, capsys) -> None:
    """On the default calibration text (the real Wikipedia split, read from the shared cache)."""
    monkeypatch.setenv("MIPRUN_CACHE", str(cache_sharing_the_real_text(tmp_path)))
    torch.set_num_threads(1)  # a tiny model: more threads only spin (conftest restores the count)
    tiny = tiny_folder(tmp_path / "tiny", tiny_tokenizer, layers=12, positions=512)
    monkeypatch.chdir(tmp_path)
    for line, text, args in commands_of(block):
        if why_not(text):
            continue
        command = runnable(args, tiny)
        code = main([*command, "--quiet"])
        err = capsys.readouterr().err
        assert code == 0, f"{block.doc.name}:{line}: miprun {shlex.join(command)}\n{err[-3000:]}"
