"""The test helper that starts signalled children: they act on signals even when pytest runs under nohup."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from processes import RESET, popen

CHILD = "import signal; print(*(signal.getsignal(s) is signal.SIG_IGN for s in map(int, __import__('sys').argv[1:])))"


def ignored_in_child(start) -> list[bool]:
    """For each signal in :data:`RESET`: does a Python child started by ``start`` ignore it?"""
    child = start(
        [sys.executable, "-c", CHILD, *map(str, map(int, RESET))], stdout=subprocess.PIPE, text=True
    )
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    return [word == "True" for word in out.split()]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_children_start_with_default_dispositions_even_under_nohup() -> None:
    before = {s: signal.signal(s, signal.SIG_IGN) for s in RESET}  # as under `nohup` in a background job
    try:
        assert ignored_in_child(subprocess.Popen) == [True] * len(RESET)  # what a plain child inherits
        assert ignored_in_child(popen) == [False] * len(RESET)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
