"""The fenced examples of README.md and docs/*.md, and what stands in for the models they name."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paths import ROOT
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from miprun.assets import cache_dir

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """One fenced ```python block of a document."""

    doc: Path
    line: int  # of its opening fence
    code: str

    @property
    def key(self) -> str:
        return f"{self.doc.name}: {self.code.splitlines()[0]}"


def blocks(*languages: str) -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            if m.group(1) in languages:
                found.append(Block(doc, text.count("\n", 0, m.start()) + 1, m.group(2)))
    return found


def python_blocks() -> list[Block]:
    return blocks("python", "py")


def shell_blocks() -> list[Block]:
    return blocks("bash", "sh", "shell")


def commands_of(block: Block) -> list[tuple[int, str, list[str]]]:
    """``(line, text, arguments)`` of each ``miprun ...`` command of a shell block (``torchrun ... $(which
    miprun) ...`` included), continuation lines joined and comments dropped."""
    found = []
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        words = shlex.split(text, comments=True)
        at = next((k for k, w in enumerate(words) if w in ("miprun", "miprun)")), None)
        if at is not None:
            found.append((block.line + 1 + start, text, words[at + 1 :]))
    return found


def miprun_commands() -> list[tuple[str, list[str]]]:
    """``(where, arguments)`` of every ``miprun ...`` command of the docs' shell examples."""
    return [(f"{b.doc.name}:{line}", args) for b in shell_blocks() for line, _, args in commands_of(b)]


def tiny_folder(folder: Path, tokenizer: Any, layers: int = 6, positions: int = 128) -> Path:
    """A saved tiny Llama with the test tokenizer: what stands in for ``smollm2-135m`` or a user's path."""
    config = tiny_config("llama")
    config.num_hidden_layers, config.max_position_embeddings = layers, positions
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cache_sharing_the_real_text(work: Path) -> Path:
    """A miprun cache of its own (scores, models, task files) that reads the real cache's text data, so an
    example on the default calibration text neither downloads it again nor leaves files behind."""
    cache = work / "cache"
    cache.mkdir()
    (cache_dir() / "data").mkdir(parents=True, exist_ok=True)
    (cache / "data").symlink_to(cache_dir() / "data", target_is_directory=True)
    return cache
