"""Offline zero-shot tasks for lm-evaluation-harness, built from text the package index carries.

Each task is a JSONL file of ``{"context", "choices", "label"}`` records and a task YAML rendered from
the template beside this file. The YAML needs the absolute path of its JSONL (``dataset_path: json``),
so both are written under ``cache_dir()/tasks``; nothing here needs the Hugging Face Hub.

* ``social_iqa``: the BIG-bench copy of Social IQa (1954 questions, 3 choices, chance 1/3).
* ``next_sentence``: a paragraph's first sentences, then the true next sentence among 4 choices; the
  3 distractors are the next sentences of other held-out paragraphs (chance 1/4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from miprun.assets import bigbench_file, cache_dir
from miprun.errors import DataError
from miprun.registry import Registry

log = logging.getLogger(__name__)

HARNESS_PREFIX = "miprun_"  # our tasks are registered in lm-eval as miprun_<name>: no clash with its own
NEXT_SENTENCE_SOURCE = "novel"  # its evaluation split: disjoint from the default calibration text
Record = dict[str, Any]


@dataclass(frozen=True)
class OfflineTask:
    """A zero-shot multiple-choice task whose data is built locally."""

    name: str
    description: str
    chance: float
    build: Callable[[str | None, int], list[Record]]  # (text source, seed) -> records

    @property
    def harness_name(self) -> str:
        return HARNESS_PREFIX + self.name


# --------------------------------------------------------------------------------------- social_iqa


def social_iqa_records(task: dict[str, Any]) -> list[Record]:
    """Records from a BIG-bench ``task.json``: ``target_scores`` with one choice scored 1, in file order."""
    records = []
    for i, example in enumerate(task["examples"]):
        choices = list(example["target_scores"])
        correct = [c for c, score in example["target_scores"].items() if score == 1]
        if len(correct) != 1:
            raise DataError(f"social_iqa example {i}: expected exactly one correct choice, got {correct}")
        records.append(
            {"context": example["input"].strip(), "choices": choices, "label": choices.index(correct[0])}
        )
    return records


def _social_iqa(_source: str | None, _seed: int) -> list[Record]:
    path = bigbench_file("social_iqa/task.json")
    return social_iqa_records(json.loads(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------ next_sentence

# A sentence ends at . ! or ? after a lowercase letter, digit or closing mark, before an uppercase start.
_BOUNDARY = re.compile(r"(?<=[a-z0-9%)\]\"'][.!?])\s+(?=[\"'(]?[A-Z0-9])")
_ABBREVIATIONS = {
    "e.g.",
    "i.e.",
    "etc.",
    "vs.",
    "mr.",
    "mrs.",
    "ms.",
    "dr.",
    "st.",
    "no.",
    "c.",
    "ca.",
    "jr.",
}


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences; a boundary after a common abbreviation (e.g., Dr.) is not one."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        piece = text[start : match.start()]
        if piece.rsplit(maxsplit=1)[-1].lstrip("(\"'[").lower() in _ABBREVIATIONS:
            continue
        sentences.append(piece.strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def next_sentence_records(
    paragraphs: Sequence[str],
    *,
    seed: int = 0,
    num_choices: int = 4,
    context_sentences: int = 2,
    min_words: int = 4,
    max_words: int = 80,
) -> list[Record]:
    """One record per paragraph with at least two sentences; deterministic for a given ``seed``.

    The context is the paragraph's first ``context_sentences`` sentences (fewer when it is short) and the
    answer the sentence after them. Distractors are the answers of other paragraphs, never one from the
    same paragraph and never a copy of the answer; the answer's position is drawn with the same seed.
    Each record keeps ``paragraph`` and ``choice_paragraphs`` (indices into ``paragraphs``) for auditing.
    """
    items: list[tuple[int, str, str]] = []  # (paragraph index, context, answer)
    for index, paragraph in enumerate(paragraphs):
        sentences = split_sentences(paragraph)
        if len(sentences) < 2:
            continue
        cut = min(context_sentences, len(sentences) - 1)
        answer = sentences[cut]
        if min_words <= len(answer.split()) <= max_words:
            items.append((index, " ".join(sentences[:cut]), answer))
    if len(items) < num_choices:
        raise DataError(
            f"the next-sentence task needs at least {num_choices} paragraphs of two or more sentences; "
            f"the text has {len(items)}. Use a longer held-out text."
        )
    rng = random.Random(seed)
    records = []
    for own, context, answer in items:
        picked: list[tuple[int, str]] = []
        for j in rng.sample(range(len(items)), len(items)):
            other, _, candidate = items[j]
            if other == own or candidate == answer or any(candidate == c for _, c in picked):
                continue
            picked.append((other, candidate))
            if len(picked) == num_choices - 1:
                break
        if len(picked) < num_choices - 1:
            continue  # too few distinct answers elsewhere (tiny texts only)
        label = rng.randrange(num_choices)
        picked.insert(label, (own, answer))
        records.append(
            {
                "context": context,
                "choices": [c for _, c in picked],
                "label": label,
                "paragraph": own,
                "choice_paragraphs": [p for p, _ in picked],
            }
        )
    return records


def _next_sentence(source: str | None, seed: int) -> list[Record]:
    from miprun.data import load_text

    text = load_text(source or NEXT_SENTENCE_SOURCE, "evaluation")
    return next_sentence_records(text.texts, seed=seed)


OFFLINE_TASKS: Registry[OfflineTask] = Registry("offline task")
OFFLINE_TASKS.add(
    "social_iqa", OfflineTask("social_iqa", "Social IQa, BIG-bench copy (3 choices)", 1 / 3, _social_iqa)
)
OFFLINE_TASKS.add(
    "next_sentence",
    OfflineTask("next_sentence", "next sentence of a held-out paragraph (4 choices)", 1 / 4, _next_sentence),
)


# ---------------------------------------------------------------------------------------- rendering


def render_yaml(name: str, data_file: Path) -> str:
    """The task YAML of offline task ``name`` reading ``data_file``, from the packaged template."""
    template = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    # json.dumps gives a double-quoted string, which YAML reads back unchanged.
    return Template(template).substitute(task=HARNESS_PREFIX + name, data_file=json.dumps(str(data_file)))


def write_tasks(
    names: Sequence[str], *, source: str | None = None, seed: int = 0, folder: Path | None = None
) -> Path:
    """Build the offline tasks ``names`` into ``folder`` (a fresh one per source and seed under the cache).

    Returns the folder, to pass to lm-eval as ``TaskManager(include_path=...)``. Files whose content is
    unchanged are left alone, so lm-eval's dataset cache stays valid between runs.
    """
    for name in names:
        OFFLINE_TASKS.get(name)  # an unknown name suggests the closest and lists them all
    if folder is None:
        text = source or NEXT_SENTENCE_SOURCE
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name)[:40]
        folder = cache_dir() / "tasks" / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        records = OFFLINE_TASKS[name].build(source, seed)
        data = folder / f"{name}.jsonl"
        _write_if_changed(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        _write_if_changed(folder / f"{name}.yaml", render_yaml(name, data.resolve()))
        log.info("offline task %s: %d examples in %s", name, len(records), data)
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically, unless ``path`` already holds exactly it."""
    from miprun.atomic import atomic_write_text

    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)
