"""One queued call: the request it carries (data, never code), its attempts, its result and its callback.

The same record is stored by both queues (SQLite on one board, Redis for several) as one JSON document, so
`GET /calls/<id>` and the worker see the same thing whichever queue holds it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)
ASYNC, SCHEDULE = "async", "schedule"
# Outcomes worth another attempt: the platform or the limits ended the call, not the function's own answer.
RETRYABLE = frozenset({"timeout", "crashed", "memory_limit", "unavailable"})
# A callback's delivery: pending (to do or retrying), delivered (2xx), failed (refused or out of attempts).
CB_PENDING, CB_DELIVERED, CB_FAILED = "pending", "delivered", "failed"


def new_id() -> str:
    """128 random bits: the id is also what lets a client read the call's result (see docs/cluster.md)."""
    return uuid.uuid4().hex


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/<pid>/stat field 22): fixed for the process's
    life whatever the wall clock does. None where /proc cannot tell (not Linux), or the process is gone or a
    zombie (dead, not yet reaped: it runs nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Field 2 (comm) is in parentheses and may hold spaces and ')': count the fields after its last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_id(board: str) -> str:
    """Who runs a claimed call: board, pid and the process's start time (a reused pid is another owner).

    board/pid/create_time/start_ticks. The start in clock ticks is what identifies the process: psutil's
    create_time is boot time (derived from the wall clock now) plus the ticks, so it moves when the clock is
    stepped (NTP, a VM resumed) and a live owner could look dead. create_time stays as the third part, readable by
    people and by fnbox versions that knew only board/pid/create_time: those see four parts as another board's
    owner and leave its call alone until its lease ends, never taking a live call for a dead one."""
    me = psutil.Process()
    ticks = start_ticks(me.pid)
    return f"{board}/{me.pid}/{me.create_time():.3f}" + (f"/{ticks}" if ticks is not None else "")


def owner_alive(owner: str, board: str) -> bool | None:
    """True/False for an owner on this board (checked by pid and start time); None for another board's.
    An owner written as board/pid/create_time (older versions, or no /proc) is checked by create_time."""
    try:
        parts = owner.split("/")
        if len(parts) not in (3, 4):
            return False
        if parts[0] != board:
            return None
        if len(parts) == 4:
            return start_ticks(int(parts[1])) == int(parts[3])
        return abs(psutil.Process(int(parts[1])).create_time() - float(parts[2])) < 0.01
    except (ValueError, psutil.Error):
        return False


@dataclass
class Call:
    id: str
    function: str
    trigger: str  # async | schedule
    environ: dict[str, str]
    body_b64: str
    request_id: str
    max_attempts: int
    backoff_s: float
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    run_at: float = 0.0  # not before (a retry's backoff)
    attempts: int = 0
    owner: str | None = None
    lease_until: float | None = None
    started: float | None = None
    finished: float | None = None
    outcome: str | None = None
    message: str | None = None
    result: dict[str, Any] | None = None  # status, headers, body or body_base64
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    board: str = ""  # the board that accepted it
    ran_on: str | None = None  # the board that ran its last attempt
    scheduled_for: float | None = None
    caught_up: bool = False  # a tick missed while no board ran, run late because of catch_up = true
    callback_url: str | None = None
    callback: dict[str, Any] | None = None  # state, attempts, last_status, last_error, next_at, delivered_at

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Call:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def public(self, status_url: str) -> dict[str, Any]:
        """What `GET /calls/<id>` shows: never the request itself."""
        doc: dict[str, Any] = {
            "call_id": self.id, "status": self.state, "function": self.function, "trigger": self.trigger,
            "status_url": status_url, "request_id": self.request_id, "board": self.board, "ran_on": self.ran_on,
            "attempts": self.attempts, "max_attempts": self.max_attempts, "queued_at": self.created,
            "started_at": self.started, "finished_at": self.finished,
            "duration_ms": round((self.finished - self.started) * 1000, 2)
            if self.finished and self.started else None,
            "outcome": self.outcome, "message": self.message, "attempt_log": self.attempt_log,
            "result": self.result,
        }
        if self.state == QUEUED and self.attempts:
            doc["next_attempt_at"] = self.run_at
        if self.scheduled_for is not None:
            doc["scheduled_for"] = self.scheduled_for
            doc["caught_up"] = self.caught_up
        if self.callback_url:
            doc["callback"] = dict(self.callback or {}, url=self.callback_url)
        return doc


def encode_body(body: bytes) -> dict[str, str]:
    """A result body as JSON: text when it is UTF-8, else base64."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}
