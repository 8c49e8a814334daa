"""docs/troubleshooting.md lists every message a user can meet: each deliberate error in src/ (a raise of a
MiprunError subclass) has its fixed text quoted there, so the list cannot fall behind the code."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

from paths import ROOT

import miprun
from miprun.errors import MiprunError

SRC = Path(miprun.__file__).parent
DOC = ROOT / "docs" / "troubleshooting.md"


def _error_names() -> set[str]:
    """Names of every MiprunError subclass defined anywhere in the package."""
    for info in pkgutil.walk_packages([str(SRC)], "miprun."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    names, todo = set(), [MiprunError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _fragments(node: ast.expr) -> list[str]:
    """The constant text of a message: a string, an f-string's literal parts, or a concatenation of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp):
        return _fragments(node.left) + _fragments(node.right)
    return []


def key_phrase(fragments: list[str]) -> str | None:
    """The message's longest run of fixed words (what a user can search the docs for)."""
    words = [
        " ".join(f.replace("`", "").split()).strip(" .;:,(") for f in fragments
    ]  # the doc's backticks go too
    words = [w for w in words if len(w) >= 12]
    return max(words, key=len) if words else None


def messages() -> list[tuple[str, str]]:
    """``(where, key phrase)`` of every deliberate error raised in src/."""
    errors, found = _error_names(), []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in errors and node.exc.args:
                phrase = key_phrase(_fragments(node.exc.args[0]))
                if phrase is not None:
                    found.append((f"{path.relative_to(SRC)}:{node.lineno}", phrase))
    return found


def test_every_message_is_in_the_troubleshooting_guide():
    doc = " ".join(DOC.read_text(encoding="utf-8").replace("`", "").split())
    found = messages()
    assert len(found) > 80  # the scan sees the package's errors, not an empty list
    missing = [f"{where}: {phrase!r}" for where, phrase in found if phrase not in doc]
    assert not missing, "not in docs/troubleshooting.md:\n" + "\n".join(missing)


def test_the_scan_finds_a_known_message():
    phrases = {phrase for _, phrase in messages()}
    assert any(re.search("transformers would fill the gaps with random values", p) for p in phrases)
