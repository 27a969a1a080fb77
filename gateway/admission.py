"""Per-function concurrency caps that hold across every Gunicorn worker, and the caps that keep a worker's
request threads from all being taken by calls.

A call in flight holds one of `max_concurrency` lock files of its function with flock(): taking one is a
non-blocking syscall, and the kernel releases the lock of a worker that dies, so a crash never leaks a place.

The global cap (FNBOX_MAX_CALLS) counts calls of every worker, but Gunicorn does not spread connections evenly:
one worker may accept most of them. So each worker also admits at most `worker_max` calls of its own (its
threads minus a reserve): the reserved threads are always free to answer /healthz and 503 busy at once, and a
request accepted by a worker never waits in that worker's queue behind calls that may run for their timeout_s.
"""

from __future__ import annotations

import fcntl
import os
import threading

GLOBAL = "_all"  # not a valid function name, so it never collides with one


def worker_cap(threads: int) -> int:
    """Calls one worker admits at once: its threads minus a reserve of one in eight (at least one), the same
    reserve runner.config.max_calls_for() keeps across all workers."""
    return max(1, threads - max(1, threads // 8))


class ConcurrencyLimiter:
    """Two caps, both answered with 503 busy before anything is forked: the function's max_concurrency, and the
    server's global max_calls (FNBOX_MAX_CALLS) across all workers."""

    def __init__(self, directory: str, max_calls: int, worker_max: int | None = None) -> None:
        self.directory = directory
        self.max_calls = max_calls
        self.worker_max = worker_max  # calls in flight in this worker process; None: no such cap
        self._in_worker = 0
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
        """Both places for one call (give each back with release()), or the name of the cap that is full:
        "function", "worker" or "server"."""
        own = self.acquire(name, limit)
        if own is None:
            return "function"
        with self._lock:
            worker_full = self.worker_max is not None and self._in_worker >= self.worker_max
            if not worker_full:
                self._in_worker += 1
        if worker_full:
            self.release(own)
            return "worker"
        overall = self.acquire(GLOBAL, self.max_calls)
        if overall is None:
            with self._lock:
                self._in_worker -= 1
            self.release(own)
            return "server"
        return own, overall

    def release(self, token: tuple[str, int]) -> None:
        with self._lock:
            fcntl.flock(self._fds[token], fcntl.LOCK_UN)
            self._held.discard(token)
            if token[0] == GLOBAL:  # each admitted call holds exactly one global token: it leaves the worker
                self._in_worker -= 1
