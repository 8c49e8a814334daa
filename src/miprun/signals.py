"""Signals: SIGTERM and SIGHUP raised like Ctrl-C (:class:`Interrupted`), and signals held over the few
renames that must not be cut in half."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_SIGNALS = (signal.SIGINT, *_TERMINATING)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs; ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (``timeout``, Slurm, ``docker stop``) into :class:`Interrupted`, as Ctrl-C.

    Only in the main thread (elsewhere it does nothing); a signal that is ignored (``nohup``) stays ignored.
    """

    def raise_interrupted(signum: int, _frame: object) -> None:
        global last_signal
        last_signal = signum
        raise Interrupted(signum)

    with _replaced_handlers(_TERMINATING, raise_interrupted):
        yield


last_signal: int | None = None  # the last SIGTERM/SIGHUP turned into Interrupted (libraries may catch it)


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
