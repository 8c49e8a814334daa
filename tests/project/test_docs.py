"""The README and the docs are true: every module, object and file they name exists, and every Python
example runs (on a tiny model standing in for the real one) or says here why it cannot."""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import CALIBRATION_TXT
from doc_examples import (
    DOCS,
    ROOT,
    Block,
    cache_sharing_the_real_text,
    miprun_commands,
    python_blocks,
    tiny_folder,
)
from transformers import AutoModelForCausalLM

import miprun
from miprun import estimators, methods, repair
from miprun.cli import app
from miprun.evaluation.tasks import OFFLINE_TASKS

DOTTED = re.compile(r"\bmiprun(?:\.[A-Za-z_]\w*)+")
PY_FILE = re.compile(r"[A-Za-z_][\w./-]*\.py\b")
NOT_OURS = {"convert_hf_to_gguf.py", "vendor/llama.cpp/convert_hf_to_gguf.py"}  # llama.cpp's converter


# ----------------------------------------------------------------------------- names and files


def named_in(paths: list[Path]) -> dict[str, str]:
    """Every dotted ``miprun.x.y`` name in ``paths`` (but ``miprun.json``, the manifest's file name)."""
    found: dict[str, str] = {}
    for path in paths:
        for m in DOTTED.finditer(path.read_text(encoding="utf-8")):
            if m.group().split(".")[1] != "json":
                found.setdefault(m.group(), str(path.relative_to(ROOT)))
    return found


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute path inside the longest module prefix of it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_module_and_object_the_docs_name_exists() -> None:
    text_files = [*DOCS, ROOT / "pyproject.toml", *sorted((ROOT / "src").rglob("*.py"))]
    text_files += sorted((ROOT / "src").rglob("*.yaml")) + sorted((ROOT / "benchmarks").glob("*.py"))
    names = named_in(text_files)
    assert "miprun.heal" in names and "miprun.model.surgery.remove_blocks" in names  # the scan sees them
    stale = {name: where for name, where in names.items() if not resolves(name)}
    assert not stale, f"named but missing (moved or renamed?): {stale}"


def test_the_name_check_catches_a_moved_module() -> None:
    assert not resolves("miprun.surgery.remove_blocks")  # moved to miprun.model.surgery
    assert not resolves("miprun.model.surgery.no_such_function")
    assert resolves("miprun.model.surgery.remove_blocks") and resolves("miprun.heal")


def test_every_python_file_the_docs_name_exists() -> None:
    ours = {p.name for p in (ROOT / "src").rglob("*.py")}
    missing = {}
    for doc in [*DOCS, ROOT / "pyproject.toml"]:
        for m in PY_FILE.finditer(doc.read_text(encoding="utf-8")):
            path = m.group()
            if path in NOT_OURS or path in ours:  # a bare name, in a paragraph about its folder
                continue
            if not any((base / path).exists() for base in (ROOT, ROOT / "src", ROOT / "src" / "miprun")):
                missing[path] = doc.name
    assert not missing, f"files named in the docs that do not exist: {missing}"


# ----------------------------------------------------------------------------- shell examples

# Options whose values are registry names, and the registry each must be in.
NAMED = {
    "method": methods.REGISTRY,
    "methods": methods.REGISTRY,
    "repair": repair.REGISTRY,
    "repairs": repair.REGISTRY,
    "estimator": estimators.REGISTRY,
    "tasks": OFFLINE_TASKS,
}


def parse_command(args: list[str]) -> dict[str, Any]:
    """The parameters the real command line parses ``args`` into (nothing runs); a mistake raises."""
    group = typer.main.get_command(app)
    parent = group.make_context("miprun", list(args))
    command = group.get_command(parent, args[0])
    assert command is not None, f"no command {args[0]!r}"
    return dict(command.make_context(args[0], args[1:], parent=parent).params)


def unknown_names(params: dict[str, Any]) -> list[str]:
    bad = []
    for key, registry in NAMED.items():
        values = params.get(key) or []
        for value in [values] if isinstance(values, str) else values:
            bad += [name for name in str(value).split(",") if name and name not in registry]
    return bad


def test_every_miprun_command_in_the_shell_examples_parses_with_known_names() -> None:
    commands = miprun_commands()
    assert len(commands) >= 20 and {args[0] for _, args in commands} >= {"prune", "score", "heal", "compare"}
    wrong = {}
    for where, args in commands:
        try:
            bad = unknown_names(parse_command(args))
        except typer.TyperException as exc:  # the vendored click's usage errors
            wrong[where] = f"{shlex.join(args)}: {exc.format_message()}"
            continue
        if bad:
            wrong[where] = f"{shlex.join(args)}: unknown {bad}"
    assert not wrong, wrong


def test_the_command_check_catches_a_wrong_flag_and_a_wrong_name() -> None:
    with pytest.raises(typer.TyperException, match="No such option: --num-block"):
        parse_command(["prune", "--num-block", "3"])
    assert unknown_names(parse_command(["prune", "-n", "3", "--method", "mi-optimal", "-o", "o"])) == []
    assert unknown_names(
        parse_command(["compare", "-n", "3", "--methods", "shortgpt,slab", "--out", "o"])
    ) == ["slab"]


# ----------------------------------------------------------------------------- Python examples


def demo_output(work: Path, tokenizer: Any) -> dict[str, Any]:
    """``out/demo`` as ``make demo`` leaves it, pruned from a tiny model on the fixture text."""
    model = tiny_folder(work / "tiny", tokenizer)
    calibration = miprun.CalibrationConfig(source=str(CALIBRATION_TXT), samples=4, seq_len=24)
    miprun.prune(str(model), num_blocks=2, calibration=calibration, out="out/demo", progress=False)
    return {}


def real_defaults(work: Path, tokenizer: Any) -> dict[str, Any]:
    """A tiny model deep and long enough for the API's defaults (6 of 12 blocks, 256-token windows)."""
    model = tiny_folder(work / "tiny", tokenizer, layers=12, positions=512)
    return {
        "smollm2-135m": model,  # the embedded model's name, in the example's text
        "dense_model": AutoModelForCausalLM.from_pretrained(model),
        "path": str(model),
        "my_map": {"": "cpu"},
    }


@dataclass(frozen=True)
class Example:
    """How one documented example runs here: what it reads is prepared first, then its text runs as is."""

    prepare: Callable[[Path, Any], dict[str, Any]] | None = None
    slow: str = ""  # why it needs the real calibration text (the slow marker); empty: a tiny-model test
    reason: str = ""  # why it is not run here at all


ARCHITECTURE = "class definitions without their imports: tests/project/test_extending.py runs them"
WIKI = "the API's default calibration text is the Wikipedia split of the real cache (fetched once, as by make demo)"
EXAMPLES: dict[str, Example] = {
    "README.md: from transformers import AutoModelForCausalLM, AutoTokenizer": Example(demo_output),
    "README.md: import miprun": Example(real_defaults, slow=WIKI),
    "large-models.md: from transformers import AutoModelForCausalLM, AutoTokenizer": Example(
        real_defaults, slow=WIKI
    ),
    "architecture.md: @REGISTRY.register": Example(reason=ARCHITECTURE),
}


def test_every_python_example_is_run_or_says_why_not() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3
    unknown = [f"{b.doc.name}:{b.line}" for b in blocks if b.key not in EXAMPLES]
    assert not unknown, f"new Python examples: say in EXAMPLES how each runs here (or why not): {unknown}"
    assert set(EXAMPLES) <= {b.key for b in blocks}, "EXAMPLES names an example that no longer exists"


def run_example(block: Block, example: Example, work: Path, tokenizer: Any, monkeypatch) -> None:
    monkeypatch.chdir(work)
    names = example.prepare(work, tokenizer) if example.prepare else {}
    code = block.code
    for text, folder in [(k, v) for k, v in names.items() if "-" in k]:  # a model name in the text
        code = code.replace(repr(text).replace("'", '"'), repr(str(folder)))
    namespace = {k: v for k, v in names.items() if k.isidentifier()}
    exec(compile(code, f"{block.doc}:{block.line}", "exec"), namespace)


def examples(slow: bool) -> list[Any]:
    picked = []
    for block in python_blocks():
        example = EXAMPLES.get(block.key)
        if example is None or example.reason or bool(example.slow) != slow:
            continue
        picked.append(pytest.param(block, example, id=f"{block.doc.name}:{block.line}"))
    return picked


@pytest.mark.integration
@pytest.mark.parametrize(("block", "example"), examples(slow=False))
def test_python_example_runs(block, example, tmp_path, tiny_tokenizer, monkeypatch) -> None:
    run_example(block, example, tmp_path, tiny_tokenizer, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(("block", "example"), examples(slow=True))
def test_python_example_runs_on_the_real_text(block, example, tmp_path, tiny_tokenizer, monkeypatch) -> None:
    """The real calibration text, read from the shared cache; scores and models go to a cache of its own."""
    monkeypatch.setenv("MIPRUN_CACHE", str(cache_sharing_the_real_text(tmp_path)))
    torch.set_num_threads(1)  # a tiny model: more threads only spin (conftest restores the count)
    run_example(block, example, tmp_path, tiny_tokenizer, monkeypatch)
