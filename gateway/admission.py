"""Per-function concurrency caps that hold across every Gunicorn worker, and the caps that keep a worker's
request threads from all being taken by calls.

A call in flight holds one of `max_concurrency` places of its function and one of the server's FNBOX_MAX_CALLS
places, as byte-range locks in one lock file each (runner.locks): taking one is a non-blocking syscall, and
the kernel releases the places of a worker that dies, so a crash never leaks one.

A call holds its places until its last process is gone, not until it answers: a function that answers and goes
on running still counts (until its timeout_s ends it). A call that answered marks its places "finishing"; a
newcomer that finds the cap full only because of finishing calls waits for them a short, bounded time
(FINISHING_WAIT) instead of getting 503: their processes are exiting. That keeps a client that calls a
max_concurrency = 1 function in a loop from seeing a 503 between two calls. The worker's own cap (below) waits
for its ending calls the same way.

The global cap (FNBOX_MAX_CALLS) counts calls of every worker, but Gunicorn does not spread connections evenly:
one worker may accept most of them. So each worker also admits at most `worker_max` calls of its own (its
threads minus a reserve): the reserved threads are always free to answer /healthz and 503 busy at once, and a
request accepted by a worker never waits in that worker's queue behind calls that may run for their timeout_s.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from runner.locks import LockTable

GLOBAL = "_all"  # not a valid function name, so it never collides with one
FINISHING_WAIT = 2.0  # seconds a newcomer waits for calls that answered and are ending
_POLL = 0.005  # how soon a place freed by another worker is seen (one freed by this worker wakes the waiter)
T = TypeVar("T")


class _Releases:
    """Wakes the newcomers of this worker that wait for an ending call's place of one cap (a function's, or the
    server's and the worker's, which are freed together) as soon as the worker frees one. A
    5 ms sleep between attempts cost a client that calls a function in a loop up to 5 ms per call whenever its
    previous call's processes were still exiting (hello at 8 connections against max_concurrency = 8: most calls)."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self.count = 0  # places freed so far
        self.waiting = 0

    def freed(self) -> None:
        with self._cv:
            self.count += 1
            if self.waiting:
                self._cv.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Until a place is freed after `seen` was read (at once if one was), or timeout."""
        with self._cv:
            if self.count != seen:
                return
            self.waiting += 1
            try:
                self._cv.wait(timeout)
            finally:
                self.waiting -= 1


def _while_ending(attempt: Callable[[], T | None], ending: Callable[[], bool], releases: _Releases) -> T | None:
    """attempt() until it gives something. While it cannot only because calls that answered are ending (their
    processes are exiting), retried for up to FINISHING_WAIT; then None. Once nothing is ending, one last
    attempt: a call that was ending during the previous one may have let go of its place between it and the
    check (release frees first, then stops counting as ending), and its client's next request, sent after that
    call's answer, must not get a 503 for it."""
    deadline = None
    while True:
        seen = releases.count
        got = attempt()
        if got is not None:
            return got
        if not ending():
            return attempt()
        now = time.monotonic()
        if deadline is None:
            deadline = now + FINISHING_WAIT
        elif now > deadline:
            return None
        releases.wait(seen, _POLL)


def worker_cap(threads: int) -> int:
    """Calls one worker admits at once: its threads minus a reserve of one in eight (at least one), the same
    reserve runner.config.max_calls_for() keeps across all workers."""
    return max(1, threads - max(1, threads // 8))


class Busy(Exception):
    """A cap is full: answered 503 busy (with Retry-After) before anything is forked."""

    def __init__(self, cap: str, message: str) -> None:
        super().__init__(message)
        self.cap = cap  # "function", "worker" or "server"
        self.message = message


class Ticket:
    """One admitted call's places. As a context manager: leaving the block with an exception gives them back;
    leaving it normally keeps them, because the call owns them until its processes are gone: the owner hands
    `release` to the call's completion (it is idempotent and thread-safe)."""

    def __init__(self, limiter: ConcurrencyLimiter, places: list[tuple[str, int]]) -> None:
        self._limiter = limiter
        self._places = places
        self._lock = threading.Lock()
        self._answered = False

    def answered(self) -> None:
        """The call answered; its processes are ending: others may wait for its places instead of a 503."""
        with self._lock:
            if self._answered or not self._places:
                return
            self._answered = True
            for key, place in self._places:
                self._limiter._finishing(key, place, +1)

    def release(self, *_: object) -> None:
        with self._lock:
            places, self._places = self._places, []
            answered = self._answered
        for key, place in places:
            # Free first, then stop counting it as finishing: a newcomer that saw every place taken keeps waiting
            # as long as the count says one is about to be free.
            self._limiter._release(key, place)
            if answered:
                self._limiter._finishing(key, place, -1)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.release()


class ConcurrencyLimiter:
    """Two caps, both answered with 503 busy before anything is forked: the function's max_concurrency, and the
    server's global max_calls (FNBOX_MAX_CALLS) across all workers; plus this worker's own cap."""

    def __init__(self, directory: str, max_calls: int, worker_max: int | None = None) -> None:
        self.directory = directory
        self.max_calls = max_calls
        self.worker_max = worker_max  # calls in flight in this worker process; None: no such cap
        self._in_worker = 0
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._caps: dict[str, tuple[LockTable, _Releases]] = {}  # key -> its places, and its waiting newcomers
        self._local_finishing: dict[str, int] = {}  # key -> places of this worker held by answered calls
        self._freed: dict[str, int] = {}  # key -> the place this worker released last

    def _cap(self, key: str) -> tuple[LockTable, _Releases]:
        with self._lock:
            cap = self._caps.get(key)
            if cap is None:
                cap = self._caps[key] = (LockTable(os.path.join(self.directory, f"{key}.lock")), _Releases())
            return cap

    def _table(self, key: str) -> LockTable:
        return self._cap(key)[0]

    def _claim(self, key: str, limit: int) -> tuple[str, int] | None:
        """A free place of `key`; when every place is taken but some by calls that are ending, waits for one
        (bounded)."""
        table, releases = self._cap(key)

        def attempt() -> tuple[str, int] | None:
            # The place this worker freed last first: most likely still free, so a claim is one syscall instead
            # of one per place the other calls hold (each try is an fcntl on the lock file).
            hint = self._freed.get(key)
            if hint is not None and hint < limit and table.try_claim(hint):
                return key, hint
            for i in range(limit):
                if i != hint and table.try_claim(i):
                    return key, i
            return None

        return _while_ending(attempt, lambda: (self._local_finishing.get(key, 0) > 0
                                               or table.any_finishing(range(limit))), releases)

    def admit(self, name: str, limit: int) -> Ticket:
        """The places of one call (a Ticket), or Busy naming the cap that is full."""
        own = self._claim(name, limit)
        if own is None:
            raise Busy("function", f"{name!r} already has {limit} calls in flight (max_concurrency)")
        if not self._enter_worker():
            self._release(*own)
            raise Busy("worker", f"this worker already has {self.worker_max} calls in flight (FNBOX_THREADS minus "
                                 "the threads kept for /healthz and 503s)")
        overall = self._claim(GLOBAL, self.max_calls)
        if overall is None:
            with self._lock:
                self._in_worker -= 1
            self._release(*own)
            raise Busy("server", f"the server already has {self.max_calls} calls in flight (FNBOX_MAX_CALLS)")
        return Ticket(self, [own, overall])

    def _enter_worker(self) -> bool:
        """Counts one more call of this worker, unless the worker is full; full only because of calls of this
        worker that answered and are ending, it waits for them as a function's cap does."""
        def attempt() -> bool | None:
            with self._lock:
                if self.worker_max is None or self._in_worker < self.worker_max:
                    self._in_worker += 1
                    return True
            return None

        return _while_ending(attempt, lambda: self._local_finishing.get(GLOBAL, 0) > 0,
                             self._cap(GLOBAL)[1]) is not None

    def _finishing(self, key: str, place: int, delta: int) -> None:
        with self._lock:
            self._local_finishing[key] = self._local_finishing.get(key, 0) + delta
        if delta > 0:
            self._table(key).finishing(place)

    def _release(self, key: str, place: int) -> None:
        table, releases = self._cap(key)
        table.release(place)
        self._freed[key] = place
        if key == GLOBAL:  # each admitted call holds exactly one global place: it leaves the worker
            with self._lock:
                self._in_worker -= 1
        releases.freed()

    def in_flight(self) -> int:
        """Calls of this worker that hold their places (running, or answered and still ending)."""
        return self._in_worker
