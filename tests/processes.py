"""Child processes for tests that signal them: started with default signal dispositions.

A process inherits ignored signals across ``exec``: under ``nohup`` (SIGHUP ignored) or in a background
job of a non-interactive shell (SIGINT, SIGQUIT ignored) a plain ``subprocess.Popen`` child ignores them
too, and miprun rightly keeps an ignored signal ignored, so a test that sends one would see nothing
happen. Every test that signals a child starts it through :func:`popen`, which resets the dispositions
first, so the test behaves the same however ``pytest`` itself was started.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

# What a test may send; SIGKILL and SIGSTOP cannot be ignored, so they need no reset.
RESET = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)


def default_signals() -> None:
    """In the child, between ``fork`` and ``exec``: every signal a test sends acts as it would at a terminal."""
    for signum in RESET:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # and none is blocked (a blocked mask is inherited too)


def popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)`` whose child starts with default signal dispositions."""
    return subprocess.Popen(args, preexec_fn=default_signals, **kwargs)
