"""A non-blocking exclusive lock on a file that is deleted when released, so no ``.NAME.lock`` stays behind.

The holder unlinks the file while it still holds the lock; whoever opened the old file meanwhile finds,
once it gets the lock, that the path no longer names what it locked, and tries again on the new file.
Where ``fcntl`` is missing (Windows), filelock's lock is used and its file stays.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockBusy(Exception):
    """Another process (or another open file in this one) holds the lock."""


class SelfDeletingLock:
    """``acquire()`` fails at once with :class:`LockBusy` when held elsewhere; ``release()`` deletes the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._fallback = None
        if fcntl is None:  # pragma: no cover - Windows
            from filelock import FileLock

            self._fallback = FileLock(path, timeout=0)

    def acquire(self) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            from filelock import Timeout

            try:
                self._fallback.acquire()
            except Timeout:
                raise LockBusy(str(self.path)) from None
            return
        for _ in range(100):  # another holder deleting the file between our open and our lock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockBusy(str(self.path)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)  # we locked a file its holder had already deleted
        raise LockBusy(str(self.path))

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # still locked: a newcomer either waits on this file or makes a new one
        except OSError:
            pass
        finally:
            os.close(fd)  # closing releases the lock
