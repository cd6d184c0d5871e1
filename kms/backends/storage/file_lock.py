"""An exclusive ``flock`` shared by the threads and forked workers of a process: SQLite's
writer queue and its one-checkpoint-at-a-time rule (see SqlStorage)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class FileLock:
    """An exclusive ``flock`` of one file (opened again after a fork), held by one thread
    of the process at a time. No file (``None``): always granted, nothing locked."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._fd: int | None = None
        self._pid = 0
        self._thread_lock = threading.Lock()

    @contextmanager
    def held(self, wait: bool = True) -> Iterator[bool]:
        """Yield True while holding the lock; without ``wait``, yield False at once if
        another thread or process holds it."""
        if self._path is None:
            yield True
            return
        if not self._thread_lock.acquire(blocking=wait):
            yield False
            return
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._pid = os.getpid()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                got = False
            else:
                got = True
            try:
                yield got
            finally:
                if got:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()
