"""Text sources and token windows, on small fixtures (no network, no downloads); perplexity and model
loading: tests/model/test_loading.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from paths import FIXTURES
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from miprun.assets import AssetError, bigbench_file, cache_dir
from miprun.data import BUILTIN_SOURCES, TextSource, eval_windows, load_text, token_windows
from miprun.data.sources import gutenberg_units
from miprun.errors import DataError, DataNotFoundError

# --------------------------------------------------------------------------------------------- fixtures


def _squad(articles: list[list[str]]) -> dict:
    """A file in the SQuAD-shifts format: data -> articles -> paragraphs -> context."""
    return {
        "data": [
            {"title": f"T{i}", "paragraphs": [{"context": c, "qas": []} for c in paras]}
            for i, paras in enumerate(articles)
        ],
        "version": "test",
    }


def _write_builtin(key: str, articles: list[list[str]]) -> Path:
    builtin = BUILTIN_SOURCES[key]
    path = cache_dir() / "data" / builtin.archive.name / builtin.member
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_squad(articles)), encoding="utf-8")
    return path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any attempt to fetch BIG-bench fails at once instead of downloading 358 MB."""
    monkeypatch.setenv("MIPRUN_BIGBENCH_ARCHIVE", str(tmp_path / "no-such-archive.tar.gz"))


@pytest.fixture
def long_text(tiny_tokenizer: PreTrainedTokenizerFast) -> TextSource:
    base = (FIXTURES / "calibration.txt").read_text(encoding="utf-8")
    return TextSource.from_texts(
        "long", [f"{i}: {p}" for i in range(20) for p in base.split("\n\n") if p.strip()]
    )


def _bos_tokenizer(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of ``tok`` whose post-processor prepends BOS, like Llama-2 or Gemma tokenizers."""
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    bos = tok.bos_token_id
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------------ local files


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("First para\nstill first.\n\n  \n\nSecond para.\n\n\n", encoding="utf-8")
    src = load_text(str(path), "calibration")
    assert src.texts == ("First para\nstill first.", "Second para.")
    assert src.name == str(path)
    assert load_text(str(path), "evaluation") == src  # a local file is used whole for either split
    assert len(src.fingerprint) == 16


def test_jsonl_reads_the_text_field_and_names_what_it_found_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    rows = [{"id": 1, "text": "one"}, {"id": 2, "text": "two", "other": "x"}, {"text": "  "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(path), "calibration").texts == ("one", "two")
    # another string field is never taken for the text: an "id" or a "url" would calibrate on garbage
    path.write_text(json.dumps({"id": "x1", "body": "two"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r'a\.jsonl:1: no "text" string field \(found: body, id\)'):
        load_text(str(path), "calibration")


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not a JSON object"):
        load_text(str(path), "calibration")


@pytest.mark.parametrize("content", [b"", b"\n\n   \n", b'{"n": 1}\n'], ids=["empty", "blank", "no-string"])
def test_empty_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ("e.jsonl" if content.startswith(b"{") else "e.txt")
    path.write_bytes(content)
    with pytest.raises(DataError, match=path.name):
        load_text(str(path), "calibration")


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt.*UTF-8"):
        load_text(str(path), "calibration")


def test_missing_file_and_unknown_source() -> None:
    with pytest.raises(DataNotFoundError, match=r"text file not found: nope\.txt"):
        load_text("nope.txt", "calibration")
    with pytest.raises(DataError, match=r"unknown text source 'no-such-source'.*wiki.*nyt.*reddit"):
        load_text("no-such-source", "calibration")
    with pytest.raises(DataError, match="split"):
        load_text("wiki", "train")  # type: ignore[arg-type]
    assert issubclass(DataNotFoundError, FileNotFoundError) and issubclass(DataError, ValueError)


def test_fingerprint_tracks_content() -> None:
    a = TextSource.from_texts("a", ["x", "y"])
    assert a.fingerprint == TextSource.from_texts("b", ("x", "y")).fingerprint
    assert a.fingerprint != TextSource.from_texts("a", ["xy"]).fingerprint
    assert a.fingerprint != TextSource.from_texts("a", ["y", "x"]).fingerprint


# ------------------------------------------------------------------------------------------- built-ins


def test_builtin_splits_are_disjoint_by_article(no_download: None) -> None:
    articles = [[f"article {a} paragraph {p}." for p in range(3)] for a in range(12)]
    articles[9].append("article 0 paragraph 0.")  # a repeat in an evaluation article stays in calibration
    _write_builtin("wiki", articles)
    cal, ev = load_text("wiki", "calibration"), load_text("wiki", "evaluation")
    assert not set(cal.texts) & set(ev.texts)
    assert set(cal.texts) | set(ev.texts) == {p for art in articles for p in art}
    assert {t.split()[1] for t in ev.texts} == {"4", "9"}  # article index % 5 == 4
    assert cal.name == "wiki:calibration" and cal.fingerprint != ev.fingerprint
    assert load_text("wiki", "evaluation") == ev  # deterministic


def test_builtin_single_article_is_split_by_paragraph_groups(no_download: None) -> None:
    _write_builtin("reddit", [[f"comment {i}" for i in range(100)]])
    cal, ev = load_text("reddit", "calibration"), load_text("reddit", "evaluation")
    assert len(cal.texts) == 80 and len(ev.texts) == 20
    assert not set(cal.texts) & set(ev.texts)


def test_missing_builtin_without_download_is_a_clear_error(no_download: None) -> None:
    # a data error like any other: `except MiprunError` (and the CLI's one-line message) catch it
    with pytest.raises(DataNotFoundError, match=r"MIPRUN_BIGBENCH_ARCHIVE points at .*no-such-archive"):
        load_text("nyt", "calibration")


BOOK = """Project Gutenberg's A Book, by Someone
This eBook is for the use of anyone anywhere at no cost.
CHAPTER I
The first paragraph of the first chapter is wrapped over two lines, as
the file does it.
"A short line of speech," said one.
CHAPTER II.
{body}
End of Project Gutenberg's A Book, by Someone
The licence, which is not the book.
"""


def test_a_gutenberg_book_is_read_by_chapter_and_paragraph() -> None:
    body = "\n".join(f"Chapter two, paragraph {i}." for i in range(3))
    chapters = gutenberg_units(BOOK.format(body=body).replace("\n", "\r\n"))
    assert chapters == [
        [
            "The first paragraph of the first chapter is wrapped over two lines, as the file does it.",
            '"A short line of speech," said one.',
        ],
        [f"Chapter two, paragraph {i}." for i in range(3)],
    ]


def test_the_default_text_is_the_novel_from_sentencepieces_source_archive(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A source archive shaped like SentencePiece's (read from MIPRUN_SENTENCEPIECE_ARCHIVE, no download):
    the novel's chapters split 80/20 like articles, and only its text is kept."""
    body = "\n".join(f"Chapter {c}, paragraph {p}." for c in range(10) for p in range(2))
    chapters = "\n".join(
        f"CHAPTER {roman}\nThe story of chapter {roman} goes on."
        for roman in ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X"]
    )
    text = BOOK.format(body=body).replace(
        "CHAPTER II.\n", "CHAPTER II.\nA line of chapter two.\n" + chapters + "\n"
    )
    archive = tmp_path / "sentencepiece-0.2.3.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, content in {"test/botchan.txt": text, "test/other.txt": "not kept", "src/x.cc": ""}.items():
            data = content.encode()
            info = tarfile.TarInfo(f"sentencepiece-0.2.3/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("MIPRUN_SENTENCEPIECE_ARCHIVE", str(archive))
    cal, ev = load_text(None, "calibration"), load_text("novel", "evaluation")
    assert cal.name == "novel:calibration" and ev.name == "novel:evaluation"
    assert not set(cal.texts) & set(ev.texts)
    # chapters I, II, then I..X again: the 5th and 10th (index % 5 == 4) are the evaluation split
    assert ev.texts == ("The story of chapter III goes on.", "The story of chapter VIII goes on.")
    root = cache_dir() / "data" / "sentencepiece"
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["botchan.txt"]


def test_an_archive_the_index_no_longer_offers_says_how_to_read_it_from_disk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BIG-bench 1.0.0 left the package index: the error names the variable that reads it from disk."""
    from miprun.assets import data as asset_data

    def refuse(args, what, *, tmpdir=None, check=True):
        return "ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0"

    monkeypatch.delenv("MIPRUN_BIGBENCH_ARCHIVE", raising=False)
    monkeypatch.setattr(asset_data, "run_pip", refuse)
    with pytest.raises(AssetError, match=r"(?s)bigbench==1\.0\.0.*MIPRUN_BIGBENCH_ARCHIVE=PATH"):
        load_text("nyt", "calibration")


def test_bigbench_archive_extracts_only_kept_members(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    members = {
        "squad_shifts/nyt_v1.0.json": json.dumps(_squad([["n1"], ["n2"]])),
        "squad_shifts/task.py": "print('not kept')",
        "social_iqa/task.json": "{}",
        "other_task/task.json": "{}",
    }
    with tarfile.open(archive, "w:gz") as tar:
        for rel, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("MIPRUN_BIGBENCH_ARCHIVE", str(archive))
    path = bigbench_file("squad_shifts/nyt_v1.0.json")
    root = cache_dir() / "data" / "bigbench"
    assert path == root / "squad_shifts/nyt_v1.0.json"
    kept = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert kept == ["social_iqa/task.json", "squad_shifts/nyt_v1.0.json"]
    assert archive.exists()  # a user's archive is kept
    with pytest.raises(ValueError, match="keeps"):
        bigbench_file("other_task/task.json")


# --------------------------------------------------------------------------------------------- windows


def test_token_windows_are_seeded_and_disjoint(
    tiny_tokenizer: PreTrainedTokenizerFast, long_text: TextSource
) -> None:
    a = token_windows(tiny_tokenizer, long_text, 6, 16, seed=0)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, token_windows(tiny_tokenizer, long_text, 6, 16, seed=0))
    assert not torch.equal(a, token_windows(tiny_tokenizer, long_text, 6, 16, seed=1))
    every = eval_windows(tiny_tokenizer, long_text, 16)
    rows = {tuple(r) for r in every.tolist()}
    assert all(tuple(r) in rows for r in a.tolist())  # drawn from the non-overlapping cut
    assert len({tuple(r) for r in a.tolist()}) == 6  # without replacement


def test_token_windows_too_short_says_what_to_change(
    tiny_tokenizer: PreTrainedTokenizerFast, long_text: TextSource
) -> None:
    available = eval_windows(tiny_tokenizer, long_text, 64).shape[0]
    token_windows(tiny_tokenizer, long_text, available, 64, seed=0)
    with pytest.raises(DataError, match=rf"{available} windows of 64.*{available + 1} were asked.*Lower"):
        token_windows(tiny_tokenizer, long_text, available + 1, 64, seed=0)


def test_eval_windows_are_consecutive(tiny_tokenizer: PreTrainedTokenizerFast, long_text: TextSource) -> None:
    ids = tiny_tokenizer("\n\n".join(long_text.texts), add_special_tokens=False)["input_ids"]
    w = eval_windows(tiny_tokenizer, long_text, 10, max_windows=3)
    assert w.tolist() == [ids[0:10], ids[10:20], ids[20:30]]
    with pytest.raises(DataError, match="shorter than one window"):
        eval_windows(tiny_tokenizer, TextSource.from_texts("s", ["a"]), 10)


def test_bos_starts_every_window_when_the_tokenizer_adds_it(
    tiny_tokenizer: PreTrainedTokenizerFast, long_text: TextSource
) -> None:
    tok = _bos_tokenizer(tiny_tokenizer)
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    ids = tok("\n\n".join(long_text.texts), add_special_tokens=False)["input_ids"]
    w = eval_windows(tok, long_text, 10, max_windows=2)
    assert w.tolist() == [[tok.bos_token_id, *ids[0:9]], [tok.bos_token_id, *ids[9:18]]]
    assert (token_windows(tok, long_text, 4, 10, seed=0)[:, 0] == tok.bos_token_id).all()
    assert (eval_windows(tiny_tokenizer, long_text, 10)[:, 0] != tiny_tokenizer.bos_token_id).any()


def test_a_texts_name_gives_back_the_source_it_was_loaded_from():
    from conftest import CALIBRATION_TXT

    from miprun.data import source_of

    assert source_of("wiki:calibration") == "wiki" and source_of("nyt:evaluation") == "nyt"
    assert source_of("wikitext2:calibration") == "wikitext2"
    assert source_of("notes/my:calibration") == "notes/my:calibration"  # a local path is its own name
    assert source_of(str(CALIBRATION_TXT)) == str(CALIBRATION_TXT)


def test_miprun_list_texts_names_every_built_in_text_and_its_archive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from miprun.cli import main

    assert main(["list", "texts"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for name, builtin in BUILTIN_SOURCES.items():
        assert name in shown and builtin.archive.requirement in shown
