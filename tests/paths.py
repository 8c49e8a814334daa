"""Where things are, for test files at any depth below tests/ (tests/ mirrors src/miprun/): one place
instead of a ``Path(__file__).parents[n]`` per file, which moving a file one folder deeper would break."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent  # on sys.path (pyproject: pythonpath), with the shared helpers
ROOT = TESTS.parent
SRC = ROOT / "src"
FIXTURES = TESTS / "fixtures"  # the real English text files the tiny tokenizer and calibration read
RESULTS = ROOT / "benchmarks" / "results"
