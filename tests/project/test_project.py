"""The project's own commands: what `make test` runs and reports."""

from __future__ import annotations

import re

from paths import ROOT


def recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}:", line))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        body.append(line.strip())
    return body


def test_make_test_runs_pytest_and_prints_the_20_slowest_tests() -> None:
    pytest_lines = [line for line in recipe("test") if "pytest" in line]
    assert len(pytest_lines) == 1, recipe("test")
    assert "--durations=20" in pytest_lines[0].split("#")[0].split()
