"""Schedule ticks: `schedule = "0 7 * * *"` (+ `timezone`) or `every = "30s"` in a function's functions.toml table.

Every process that runs a Scheduler looks at the clock a few times a second; a due tick becomes one queued call
(a GET with X-Fnbox-Trigger: schedule) only for the process that claims (function, scheduled time) first: the
queue's claim is atomic across every worker and board, so each tick runs once however many are looking.

A tick seen within `late_s` of its time (the period, clamped to 5..60 s) is on time. Older ticks were missed
(every board was down): skipped, or, with `catch_up = true`, the latest of them runs once.
"""

from __future__ import annotations

import sys
import threading
import time
import zoneinfo
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote

from jobs.calls import SCHEDULE, Call, new_id
from runner.profiles import Profile, ProfileStore

POLL_S = 0.2
MAX_TICKS = 1000  # ticks looked at in one pass; older ones are skipped without being listed


class TickQueue(Protocol):
    def add_tick(self, c: Call, scheduled: float) -> bool: ...
    def last_tick(self, function: str) -> float | None: ...
    def mark_tick(self, function: str, scheduled: float) -> None: ...


def _zone(p: Profile) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(p.timezone)


def next_after(p: Profile, t: float) -> float:
    """The first scheduled time strictly after t (epoch seconds)."""
    if p.every:
        return (t // p.every + 1) * p.every  # aligned on the epoch: every board computes the same ticks
    from croniter import croniter

    start = datetime.fromtimestamp(t, _zone(p))
    return float(croniter(p.schedule, start).get_next(float))


def period(p: Profile, now: float) -> float:
    if p.every:
        return p.every
    a = next_after(p, now)
    return next_after(p, a) - a


def late_s(p: Profile, now: float, override: float | None = None) -> float:
    return override if override else min(60.0, max(5.0, period(p, now)))


def due(p: Profile, last: float, now: float) -> list[float]:
    """Scheduled times in (last, now], at most MAX_TICKS of the latest."""
    if p.every:
        first = (last // p.every + 1) * p.every
        n = int((now - first) // p.every) + 1 if now >= first else 0
        skip = max(0, n - MAX_TICKS)
        return [first + (skip + i) * p.every for i in range(n - skip)]
    # Backwards from now, so that after a long outage (a cron with seconds, a week of a per-minute one) the latest
    # ticks are listed, as for `every`, and no pass walks through the whole gap.
    from croniter import croniter

    at_now = next_after(p, now - 1e-6)  # a tick at exactly `now` is due (get_prev gives those strictly before)
    out = [at_now] if last < at_now <= now else []
    it = croniter(p.schedule, datetime.fromtimestamp(now, _zone(p)))
    while len(out) < MAX_TICKS:
        t = float(it.get_prev(float))
        if t <= last:
            break
        out.append(t)
    return out[::-1]


def iso(p: Profile, t: float) -> str:
    return datetime.fromtimestamp(t, _zone(p)).isoformat()


def tick_call(name: str, p: Profile, scheduled: float, board: str) -> Call:
    """The call a tick makes: a plain GET of the function, saying it comes from the schedule and for when."""
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": f"/function/{name}",
               "RAW_URI": f"/function/{quote(name)}", "QUERY_STRING": "", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.url_scheme": "http", "HTTP_HOST": "localhost", "HTTP_X_FNBOX_TRIGGER": "schedule",
               "HTTP_X_FNBOX_SCHEDULED_TIME": iso(p, scheduled)}
    cid = new_id()
    environ["HTTP_X_FNBOX_CALL_ID"] = cid
    return Call(id=cid, function=name, trigger=SCHEDULE, environ=environ, body_b64="", request_id=cid,
                max_attempts=p.retries + 1, backoff_s=p.retry_backoff_s, board=board, scheduled_for=scheduled)


class Scheduler:
    def __init__(self, queue: TickQueue, profiles: ProfileStore, board: str, on_tick: Any = None,
                 late_override: float | None = None) -> None:
        self.queue, self.profiles, self.board = queue, profiles, board
        self.late_override = late_override  # FNBOX_SCHEDULE_LATE_S
        self.on_tick = on_tick  # called after this process queued a tick's call (wakes the local executor)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fnbox-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.tick(time.time())
            except Exception as e:
                print(f"fnbox: scheduler: {e}", file=sys.stderr)
                self._stop.wait(1.0)

    def tick(self, now: float) -> int:
        """Queues the calls of every tick due now that nobody else has claimed; how many this process queued."""
        queued = 0
        for name, p in self.profiles.current().scheduled().items():
            last = self.queue.last_tick(name)
            if last is None:
                # First sight of this schedule: start from now (no backfill of the past).
                self.queue.mark_tick(name, now)
                continue
            ticks = due(p, last, now)
            if not ticks:
                continue
            limit = late_s(p, now, self.late_override)
            on_time = [t for t in ticks if now - t <= limit]
            missed = [t for t in ticks if now - t > limit]
            run = ([missed[-1]] if missed and p.catch_up else []) + on_time
            for t in run:
                c = tick_call(name, p, t, self.board)
                c.caught_up = t not in on_time
                if self.queue.add_tick(c, t):
                    queued += 1
            if missed:
                print(f"fnbox: scheduler: {name}: {len(missed)} tick(s) missed while no board ran "
                      f"({'the latest runs now' if p.catch_up else 'skipped; catch_up = true runs the latest'})",
                      file=sys.stderr)
            self.queue.mark_tick(name, ticks[-1])
        if queued and self.on_tick:
            self.on_tick()
        return queued


def next_runs(profiles: ProfileStore, now: float) -> list[dict[str, Any]]:
    """Each scheduled function's next tick (for `fnbox schedules`)."""
    out = []
    for name, p in sorted(profiles.current().scheduled().items()):
        t = next_after(p, now)
        out.append({"function": name, "schedule": p.schedule, "every": p.every, "timezone": p.timezone,
                    "catch_up": p.catch_up, "next_run": t, "next_run_local": iso(p, t)})
    return out
