"""Text sources: built-in registers of real English text, local files, and hub data sets.

A source is a built-in register of real English text (a public-domain novel from SentencePiece's source
archive, the default; the SQuAD-shifts files of the BIG-bench archive where a package index still offers it;
each fetched once by :mod:`miprun.assets`), a local ``.txt``/``.jsonl`` file, or a short name of a data set
on the Hugging Face Hub. Built-in and hub sources are split so that the
calibration and evaluation text never share a paragraph; a local file is used whole for either split,
so pass different files for calibration and evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from miprun.assets import (
    BIGBENCH,
    SENTENCEPIECE,
    HubUnreachableError,
    TextArchive,
    archive_file,
    is_hub_unreachable,
)
from miprun.errors import DataError, DataNotFoundError, MissingDependencyError

log = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation"]
SPLITS = ("calibration", "evaluation")
DEFAULT_SOURCE = "novel"
EVAL_EVERY = 5  # unit index % 5 == 4 goes to evaluation: a 80/20 split at article level
GROUP_SIZE = 10  # paragraphs per unit when a file has too few articles to split by article


@dataclass(frozen=True)
class BuiltinText:
    """A built-in register: the archive file it is read from, how its units (articles, chapters) of
    paragraphs are parsed, and a line for ``--help`` and errors."""

    archive: TextArchive
    member: str
    parse: Callable[[str], list[list[str]]]  # file text -> units of paragraphs
    about: str


def squad_units(raw: str) -> list[list[str]]:
    """Articles of a SQuAD JSON file (data -> paragraphs -> context), each a list of paragraphs."""
    articles = json.loads(raw)["data"]
    return [[p["context"] for p in article["paragraphs"]] for article in articles]


_CHAPTER = re.compile(r"^CHAPTER [IVXLC]+\.?$")
WRAP = 60  # a line this short ends its paragraph (the file wraps at about 70 and has no blank lines)


def gutenberg_units(raw: str) -> list[list[str]]:
    """Chapters of a Project Gutenberg book whose lines are wrapped without blank lines between paragraphs:
    the licence before the first chapter and after the end marker dropped, wrapped lines joined, a short
    line taken as a paragraph's last."""
    lines = [line.strip().replace("[P]", "") for line in raw.replace("\r\n", "\n").split("\n")]
    chapters: list[list[str]] = []
    paragraph: list[str] = []
    for line in lines:
        if line.startswith(("End of Project Gutenberg", "*** END OF")):
            break
        if _CHAPTER.match(line):
            chapters.append([])
            paragraph = []
            continue
        if not chapters or not line:
            continue
        paragraph.append(line)
        if len(line) < WRAP:
            chapters[-1].append(" ".join(paragraph))
            paragraph = []
    if chapters and paragraph:
        chapters[-1].append(" ".join(paragraph))
    return [chapter for chapter in chapters if chapter]


_SQUAD = "SQuAD-shifts, BIG-bench archive"
BUILTIN_SOURCES: dict[str, BuiltinText] = {
    "novel": BuiltinText(
        SENTENCEPIECE,
        "botchan.txt",
        gutenberg_units,
        "Botchan (Natsume Soseki, tr. 1918): a public-domain novel, about 70 k tokens, by chapter",
    ),
    "wiki": BuiltinText(
        BIGBENCH,
        "squad_shifts/squaddev_v1.1.json",
        squad_units,
        f"SQuAD v1.1 dev: 48 Wikipedia articles ({_SQUAD})",
    ),
    "new_wiki": BuiltinText(
        BIGBENCH, "squad_shifts/new_wiki_v1.0.json", squad_units, f"48 newer Wikipedia articles ({_SQUAD})"
    ),
    "nyt": BuiltinText(
        BIGBENCH, "squad_shifts/nyt_v1.0.json", squad_units, f"797 New York Times articles ({_SQUAD})"
    ),
    "reddit": BuiltinText(
        BIGBENCH, "squad_shifts/reddit_v1.0.json", squad_units, f"2035 Reddit comments ({_SQUAD})"
    ),
    "amazon": BuiltinText(
        BIGBENCH, "squad_shifts/amazon_reviews_v1.0.json", squad_units, f"413 products' reviews ({_SQUAD})"
    ),
}
LOCAL_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class TextSource:
    """Paragraphs of text, with a name for reports and a fingerprint of the exact content."""

    name: str
    texts: tuple[str, ...]
    fingerprint: str

    @classmethod
    def from_texts(cls, name: str, texts: list[str] | tuple[str, ...]) -> TextSource:
        """Build a source, computing its fingerprint (16 hex digits of a sha256 over the texts)."""
        digest = hashlib.sha256()
        for text in texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return cls(name=name, texts=tuple(texts), fingerprint=digest.hexdigest()[:16])


def load_text(source: str | None, split: Split) -> TextSource:
    """Load a text source for ``split``.

    Args:
        source: None (``novel``) or a built-in name (``novel``; ``wiki``, ``new_wiki``, ``nyt``, ``reddit``,
            ``amazon`` where the BIG-bench archive can be had), a
            path to a ``.txt`` (paragraphs separated by blank lines) or ``.jsonl`` file (field ``text``),
            or a hub short name (``wikitext2``, ``c4``, ``alpaca``, ``pg19``).
        split: ``"calibration"`` or ``"evaluation"``; built-in and hub sources give disjoint text.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, not {split!r}")
    key = DEFAULT_SOURCE if source is None else source
    kind = _kind(key)
    if kind == "builtin":
        return _builtin(key, split)
    if kind == "hub":
        return _hub(key, split)
    return _local(Path(key).expanduser())


def source_of(name: str) -> str:
    """The ``source`` that :func:`load_text` takes for a text named ``name``: built-in and hub texts are named
    ``KEY:SPLIT`` (e.g. ``wiki:calibration``), local files by their path."""
    key, _, split = name.rpartition(":")
    return key if split in SPLITS and key in (*BUILTIN_SOURCES, *HUB_SOURCES) else name


def check_sources(*sources: str | None) -> None:
    """Refuse an unknown source name or an unusable local file now, before a model is loaded.

    A local file is read (it is small next to a model); built-in and hub texts are fetched when used.
    """
    for source in sources:
        key = DEFAULT_SOURCE if source is None else source
        if _kind(key) == "local":
            _local(Path(key).expanduser())


def _kind(key: str) -> Literal["builtin", "hub", "local"]:
    """Which kind of source ``key`` names; an error that lists them when it names none."""
    if key in BUILTIN_SOURCES:
        return "builtin"
    if key in HUB_SOURCES:
        return "hub"
    path = Path(key).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return "local"
    raise DataError(
        f"unknown text source {key!r}. Built-in: {', '.join(BUILTIN_SOURCES)}; "
        f"hub (needs network): {', '.join(HUB_SOURCES)}; or a path to a local .txt or .jsonl file."
    )


# ---------------------------------------------------------------------------------------- built-ins


def _builtin(key: str, split: Split) -> TextSource:
    builtin = BUILTIN_SOURCES[key]
    path = archive_file(builtin.archive, builtin.member)
    return _parse_builtin(path, path.stat().st_mtime_ns, key, split)


@functools.lru_cache(maxsize=16)  # keyed by file and modification time: a changed file is read again
def _parse_builtin(path: Path, _mtime_ns: int, key: str, split: Split) -> TextSource:
    builtin = BUILTIN_SOURCES[key]
    try:
        units = builtin.parse(path.read_text(encoding="utf-8-sig"))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not in the format of the {key!r} text ({builtin.about}): {exc}") from exc
    if not units:
        raise DataError(f"{path} holds no {key!r} text ({builtin.about})")
    return TextSource.from_texts(f"{key}:{split}", split_units(units, split))


def split_units(units: list[list[str]], split: Split) -> list[str]:
    """Deduplicated paragraphs of the units (articles) that belong to ``split``.

    Unit ``i`` goes to evaluation when ``i % 5 == 4``. A file with fewer than 5 units is first cut into
    consecutive groups of :data:`GROUP_SIZE` paragraphs. A paragraph repeated across units is kept only
    where it first occurs, so the two splits never share a paragraph.
    """
    if len(units) < EVAL_EVERY:
        flat = [p for unit in units for p in unit]
        units = [flat[i : i + GROUP_SIZE] for i in range(0, len(flat), GROUP_SIZE)]
    seen: set[str] = set()
    out: list[str] = []
    for index, unit in enumerate(units):
        wanted = (index % EVAL_EVERY == EVAL_EVERY - 1) == (split == "evaluation")
        for paragraph in unit:
            text = paragraph.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            if wanted:
                out.append(text)
    return out


# ------------------------------------------------------------------------------------------- local


def _local(path: Path) -> TextSource:
    if path.is_dir():
        raise DataError(
            f"{path} is a folder; pass a .txt or .jsonl file of text (or a built-in name such as novel)"
        )
    if path.exists() and not path.is_file():
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(path.stat().st_mode) else "not a regular file"
        raise DataError(
            f"{path} is {kind}, which miprun cannot read more than once; save the text to a regular .txt "
            "or .jsonl file and pass that"
        )
    if not path.is_file():
        raise DataNotFoundError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"{path}: unsupported text file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{suffix}"
        ) from exc
    if "\x00" in raw:
        raise DataError(
            f"{path} holds NUL bytes (at character {raw.index(chr(0))}): it looks like a binary file, not text; "
            "pass a plain-text .txt or .jsonl file"
        )
    texts = _jsonl_texts(path, raw) if suffix == ".jsonl" else _paragraphs(raw)
    if not texts:
        expected = 'one JSON object per line with a "text" field' if suffix == ".jsonl" else "paragraphs"
        raise DataError(f"{path} holds no text; expected {expected} of real text, e.g. a few articles")
    return TextSource.from_texts(str(path), texts)


def _paragraphs(raw: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str):
            found = ", ".join(sorted(record)) or "no fields"
            raise DataError(
                f'{path}:{lineno}: no "text" string field (found: {found}); each line must be an object with '
                "the text under \"text\", e.g. jq -c '{text: .content}' in.jsonl > out.jsonl"
            )
        if text.strip():
            texts.append(text.strip())
    return texts


# --------------------------------------------------------------------------------------------- hub


def _rows(dataset: Any, field: str) -> list[str]:
    return [row[field] for row in dataset]


def _wikitext2(load: Callable[..., Any], split: Split) -> list[str]:
    # Raw rows, blank ones included: joined with "\n\n" this is the usual wikitext-2 perplexity text.
    ds = load("wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
    return _rows(ds, "text")


def _c4(load: Callable[..., Any], split: Split) -> list[str]:
    shard = (
        {"train": "en/c4-train.00000-of-01024.json.gz"}
        if split == "calibration"
        else {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    )
    ds = load("allenai/c4", data_files=shard, split=next(iter(shard)))
    return _rows(ds, "text")


def _alpaca(load: Callable[..., Any], split: Split) -> list[str]:
    ds = load("tatsu-lab/alpaca", split="train")  # one split only: every 5th record is held out
    return split_units([[t] for t in _rows(ds, "text")], split)


def _pg19(load: Callable[..., Any], split: Split) -> list[str]:
    ds = load("deepmind/pg19", split="validation" if split == "calibration" else "test", streaming=True)
    return [row["text"] for _, row in zip(range(10), ds, strict=False)]  # ten books are plenty


HUB_SOURCES: dict[str, Callable[[Callable[..., Any], Split], list[str]]] = {
    "wikitext2": _wikitext2,
    "c4": _c4,
    "alpaca": _alpaca,
    "pg19": _pg19,
}


def _hub(key: str, split: Split) -> TextSource:
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise MissingDependencyError(
            f"the hub source {key!r} needs the `datasets` package: pip install datasets"
        ) from exc
    try:
        texts = HUB_SOURCES[key](load_dataset, split)
    except Exception as exc:
        if is_hub_unreachable(exc):
            raise HubUnreachableError(
                f"could not load the text source {key!r} from the Hugging Face Hub: the hub is unreachable "
                f"from this machine ({type(exc).__name__}). Use a local .txt or .jsonl file, or a built-in "
                f"source that needs no hub: {', '.join(BUILTIN_SOURCES)}."
            ) from exc
        raise
    texts = [t for t in texts if t.strip()] if key != "wikitext2" else texts
    if not any(t.strip() for t in texts):
        raise DataError(f"the hub source {key!r} ({split}) gave no text")
    return TextSource.from_texts(f"{key}:{split}", texts)
