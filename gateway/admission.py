"""Per-function concurrency caps that hold across every Gunicorn worker.

A call in flight holds one of `max_concurrency` lock files of its function with flock(): taking one is a
non-blocking syscall, and the kernel releases the lock of a worker that dies, so a crash never leaks a place.
"""

from __future__ import annotations

import fcntl
import os
import threading

GLOBAL = "_all"  # not a valid function name, so it never collides with one


class ConcurrencyLimiter:
    """Two caps, both answered with 503 busy before anything is forked: the function's max_concurrency, and the
    server's global max_calls (FNBOX_MAX_CALLS) across all workers."""

    def __init__(self, directory: str, max_calls: int) -> None:
        self.directory = directory
        self.max_calls = max_calls
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._fds: dict[tuple[str, int], int] = {}
        # flock() is per open file: two threads of this process sharing an fd would both "get" it.
        self._held: set[tuple[str, int]] = set()

    def acquire(self, key: str, limit: int) -> tuple[str, int] | None:
        with self._lock:
            for i in range(limit):
                token = (key, i)
                if token in self._held:
                    continue
                fd = self._fds.get(token)
                if fd is None:
                    path = os.path.join(self.directory, f"{key}.{i}.lock")
                    fd = self._fds[token] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held.add(token)
                return token
        return None

    def admit(self, name: str, limit: int) -> tuple[tuple[str, int], tuple[str, int]] | str:
        """Both places for one call, or the name of the cap that is full ("function" or "server")."""
        own = self.acquire(name, limit)
        if own is None:
            return "function"
        overall = self.acquire(GLOBAL, self.max_calls)
        if overall is None:
            self.release(own)
            return "server"
        return own, overall

    def release(self, token: tuple[str, int]) -> None:
        with self._lock:
            fcntl.flock(self._fds[token], fcntl.LOCK_UN)
            self._held.discard(token)
