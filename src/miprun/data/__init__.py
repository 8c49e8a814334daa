"""Text and the token windows cut from it: the first stage of the pipeline."""

from __future__ import annotations

from miprun.data.sources import BUILTIN_SOURCES, DEFAULT_SOURCE, TextSource, load_text, source_of
from miprun.data.windows import available_windows, eval_windows, token_windows

__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_SOURCE",
    "TextSource",
    "available_windows",
    "eval_windows",
    "load_text",
    "source_of",
    "token_windows",
]
