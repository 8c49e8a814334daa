"""The rule that keeps the unit run fast: a test that builds a model must be marked integration or slow."""

from __future__ import annotations

import markers
import pytest
from tiny_models import tiny_model


class UnmarkedTest:
    """Stands for a running test that carries no marker."""

    nodeid = "tests/test_x.py::test_builds_a_model"

    def get_closest_marker(self, name: str) -> None:
        return None


@pytest.mark.integration
def test_an_unmarked_test_that_builds_a_model_fails_naming_itself() -> None:
    markers._running.append(UnmarkedTest())  # type: ignore[arg-type]
    try:
        with pytest.raises(pytest.fail.Exception, match=r"test_builds_a_model builds a model \(Llama"):
            tiny_model("llama")
    finally:
        markers._running.pop()
    assert tiny_model("llama")[0].config.num_hidden_layers > 0  # this test is marked: it may
