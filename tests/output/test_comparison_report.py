"""The published comparisons (``benchmarks/results/compare-*``) read back, write back and render as
published: the report's reference (SLEB) is found by its class's ``reference`` flag, not by its name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import RESULTS

from miprun import methods
from miprun.output.comparison import Comparison
from miprun.output.comparison_report import markdown

PUBLISHED = sorted(RESULTS.glob("compare-*/comparison.json"))


def test_there_are_published_comparisons() -> None:
    assert len(PUBLISHED) >= 2, f"no compare-* results under {RESULTS}"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.parent.name)
def test_published_comparison_round_trips(path: Path) -> None:
    """Written back, a published comparison keeps every value it holds (rows written before repairs and
    parameters were recorded gain those keys at their defaults), and reads back equal."""
    raw = json.loads(path.read_text())
    result = Comparison.read(path)
    written = result.to_json()
    assert {k: written[k] for k in raw if k not in ("kind", "rows")} == {
        k: v for k, v in raw.items() if k not in ("kind", "rows")
    }
    assert len(written["rows"]) == len(raw["rows"])
    for old, new in zip(raw["rows"], written["rows"], strict=True):
        assert {k: new[k] for k in old} == old
        assert set(new) - set(old) <= {"repair", "search", "estimator"}
    assert Comparison.from_json(written) == result


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.parent.name)
def test_published_markdown_renders_again(path: Path) -> None:
    """Every line of the published ``comparison.md`` is rendered again from its JSON (a benchmark that added
    rows to the JSON since may add lines, never change one), the note against SLEB included."""
    rendered = markdown(Comparison.read(path)).splitlines()
    published = (path.parent / "comparison.md").read_text().splitlines()
    missing = [line for line in published if line not in rendered]
    assert not missing, f"lines no longer rendered: {missing}"
    assert any(" against SLEB (same N, same repair;" in line for line in rendered)


def test_reference_is_a_capability() -> None:
    """Exactly one method is the report's reference, and it is the one that says so."""
    references = {name: cls.reference for name, cls in methods.REGISTRY.items() if cls.reference}
    assert references == {"sleb": "SLEB"}
