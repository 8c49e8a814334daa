"""Signals: SIGTERM and SIGHUP raised like Ctrl-C (:class:`Interrupted`), and signals held over the few
renames that must not be cut in half."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_SIGNALS = (signal.SIGINT, *_TERMINATING)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs; ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class Caught:
    """The handler that raises :class:`Interrupted`, and the last signal it turned (None: none, or Ctrl-C),
    kept for the caller, since a library on the way up may catch the exception itself."""

    signum: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.signum = signum
        raise Interrupted(signum)


@contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[Caught]:
    """Turn SIGTERM and SIGHUP (``timeout``, Slurm, ``docker stop``) into :class:`Interrupted`, as Ctrl-C;
    yields the :class:`Caught` record of which signal it was (the enclosing block's, when nested).

    Only in the main thread (elsewhere it does nothing); a signal that is ignored (``nohup``) stays ignored.
    """
    outer = [h for h in map(signal.getsignal, _TERMINATING) if h not in (None, signal.SIG_IGN)]
    if outer and all(isinstance(handler, Caught) for handler in outer):
        yield outer[0]  # type: ignore[misc]  # nested: the enclosing block already turns them, and records
        return
    caught = Caught()
    with _replaced_handlers(_TERMINATING, caught):
        yield caught


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP over a block and re-deliver them after it: renames are never cut in half.

    Handlers rather than ``pthread_sigmask``: a signal sent to the process may land on any thread (torch,
    tqdm), and the main thread would still run its Python handler in the middle of the block.
    """
    caught: list[int] = []
    try:
        with _replaced_handlers(_SIGNALS, lambda signum, _frame: caught.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # now the previous handler (or the default action) applies


@contextmanager
def _replaced_handlers(signums: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for ``signums`` (main thread, not over ignored ones); restore the previous ones."""
    previous: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                if signal.getsignal(signum) not in (None, signal.SIG_IGN):  # None: set outside Python
                    previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
