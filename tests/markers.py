"""Every test that builds a model is marked ``integration`` or ``slow``, so the fast unit run
(``-m "not integration and not slow"``) builds none; an unmarked test that builds one fails, naming itself.

A model is "built" when a Hugging Face model's ``post_init`` runs (every model class calls it from its
constructor, and ``from_pretrained``/``from_config`` construct one). A model built by a module- or
session-scoped fixture is charged to the first test that sets the fixture up, so such a file marks all of
its tests (``pytestmark``). :mod:`conftest` imports the hooks below.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from transformers import PreTrainedModel

MODEL_MARKERS = ("integration", "slow")
_running: list[pytest.Item] = []  # the test whose setup, call or teardown is under way


def unmarked(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(name) for name in MODEL_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.fixture(autouse=True, scope="session")
def _models_only_in_marked_tests() -> Iterator[None]:
    real = PreTrainedModel.post_init

    def post_init(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        if _running and unmarked(_running[-1]):
            pytest.fail(
                f"{_running[-1].nodeid} builds a model ({type(self).__name__}) but is not marked "
                f"{' or '.join(MODEL_MARKERS)}: mark it (or its file, with pytestmark)",
                pytrace=False,
            )
        return real(self, *args, **kwargs)

    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.post_init = real  # type: ignore[method-assign]
