"""The package's public surface: what the README calls on ``miprun`` exists, and ``dir(miprun)`` lists it."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
from paths import ROOT

import miprun

SRC = ROOT / "src"


def called_on_miprun(text: str) -> set[str]:
    """Names used as ``miprun.NAME`` that are not submodules (``miprun.json`` is the manifest's file name)."""
    names = set(re.findall(r"\bmiprun\.([A-Za-z_]\w*)", text)) - {"json"}
    return {n for n in names if importlib.util.find_spec(f"miprun.{n}") is None}


def test_every_name_the_readme_calls_is_exported() -> None:
    used = called_on_miprun((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {"score", "select", "prune", "apply_plan", "heal", "PruneOptions"} <= used  # the scan sees them
    assert used <= set(miprun.__all__), f"the README uses {sorted(used - set(miprun.__all__))}, not exported"


@pytest.mark.parametrize("name", miprun.__all__)
def test_each_exported_name_is_the_object_its_module_defines(name: str) -> None:
    obj = getattr(miprun, name)
    home = importlib.import_module(obj.__module__)
    assert getattr(home, name) is obj


def test_dir_lists_the_api_in_a_fresh_interpreter_without_importing_torch() -> None:
    """As a notebook sees it: tab completion lists the API, and `import miprun` alone stays light."""
    code = "import json, sys, miprun; print(json.dumps([dir(miprun), 'torch' in sys.modules]))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    listed, imported_torch = json.loads(done.stdout)
    assert set(miprun.__all__) <= set(listed)
    assert {"heal", "prune", "score", "select", "apply_plan", "PruneOptions", "HealOptions"} <= set(listed)
    assert not imported_torch


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'hael'"):
        miprun.hael  # noqa: B018
    assert not hasattr(miprun, "__wrapped__")
