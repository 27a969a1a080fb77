"""Runs queued calls exactly like sync calls: through this process's Supervisor (the same sandboxed runner),
in a few background threads, so a Gunicorn worker's request threads are never all taken by queued work.

Each thread loops: claim the oldest due call, run it, write its outcome (retry with backoff, done, or failed),
record it in the history with its trigger. One thread per process also does the upkeep: calls whose runner
died are retried or failed, callbacks are delivered, old records are pruned.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Protocol

from gateway.admission import Busy
from jobs import callbacks
from jobs.calls import (
    CB_DELIVERED,
    CB_FAILED,
    CB_PENDING,
    DONE,
    FAILED,
    QUEUED,
    RETRYABLE,
    RUNNING,
    Call,
    encode_body,
    owner_alive,
    owner_id,
)
from jobs.config import JobSettings
from jobs.store import QueueUnavailable
from runner import outcomes
from runner.config import Settings
from runner.profiles import ProfileStore
from runner.supervisor import CallResult, Invocation, Supervisor, Unavailable

IDLE_WAIT_S = 0.2  # between two looks at an empty queue
UPKEEP_EVERY_S = 1.0
BUSY_RETRY_S = 0.5  # a call refused by max_concurrency / the server cap waits this long, attempt not counted
# Beyond the function's timeout_s (the runner ends a call 2 s after it), before a running call is given up as
# lost even though its runner looks alive: a runner that cannot record the outcome for that long (its queue
# unreachable) leaves the call to another attempt.
LEASE_GRACE_S = 20.0
CALLBACK_BACKOFF_S = 1.0


class Queue(Protocol):
    def claim(self, owner: str, lease_for: Any) -> Call | None: ...
    def update(self, c: Call, owner: str | None = None) -> bool: ...
    def modify(self, call_id: str, fn: Any) -> Call | None: ...
    def running(self) -> list[Call]: ...
    def claim_callback(self, lease_s: float) -> Call | None: ...
    def prune(self, retention_s: float) -> int: ...


def function_exists(functions_dir: str, name: str) -> bool:
    if not name.isidentifier() or name.startswith("_"):
        return False
    return (os.path.isfile(os.path.join(functions_dir, name + ".py"))
            or os.path.isfile(os.path.join(functions_dir, name, "__init__.py")))


def error_result(outcome: str, message: str, function: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """The same JSON error body and status the sync route answers for this outcome."""
    from gateway.errors import STATUS  # the outcome -> HTTP mapping lives in one place

    doc = {"error": outcome, "message": message, "function": function, "request_id": request_id}
    doc.update({k: v for k, v in extra.items() if v is not None})
    return {"status": STATUS.get(outcome, 500), "headers": [["Content-Type", "application/json"]],
            "body": json.dumps(doc) + "\n"}


def ok_result(r: CallResult) -> dict[str, Any]:
    try:
        status = int(str(r.status).split()[0])
    except (ValueError, IndexError):
        status = 200
    return {"status": status, "headers": [[k, v] for k, v in r.headers], **encode_body(r.body)}


class Executor:
    def __init__(self, queue: Queue, settings: Settings, jsettings: JobSettings, profiles: ProfileStore,
                 supervisor: Supervisor, history: Any = None, limiter: Any = None, versions: Any = None,
                 threads: int | None = None, upkeep: bool = True) -> None:
        self.queue, self.settings, self.js = queue, settings, jsettings
        self.profiles, self.supervisor, self.history = profiles, supervisor, history
        self.limiter, self.versions = limiter, versions
        self.threads = jsettings.concurrency if threads is None else threads
        self.upkeep = upkeep
        self.owner = owner_id(jsettings.board)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._workers: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.owner = owner_id(self.js.board)  # after a fork, this process is another owner
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"fnbox-jobs-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.upkeep:
            t = threading.Thread(target=self._upkeep_loop, name="fnbox-jobs-upkeep", daemon=True)
            t.start()
            self._workers.append(t)
        if hasattr(self.queue, "heartbeat"):
            t = threading.Thread(target=self._heartbeat_loop, name="fnbox-jobs-heartbeat", daemon=True)
            t.start()
            self._workers.append(t)

    def _heartbeat_loop(self) -> None:
        """Other boards learn that this executor is alive (and leave its running calls alone)."""
        while True:
            try:
                self.queue.heartbeat(self.owner)
            except Exception as e:
                print(f"fnbox: queue: heartbeat failed: {e}", file=sys.stderr)
            if self._stop.wait(1.0):
                return

    def wake(self) -> None:
        """A call was just queued by this process: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops claiming; waits (bounded) for the calls running here. A call cut short by the stop goes back to
        the queue without costing an attempt."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- running calls -------------------------------------------------------------------------------------------
    def _lease_for(self, function: str) -> float:
        return self.profiles.for_function(function).timeout_s + LEASE_GRACE_S

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                c = self.queue.claim(self.owner, self._lease_for)
            except Exception as e:  # the queue is down (disk, Redis): keep trying, bounded by the poll
                print(f"fnbox: queue: cannot claim a call: {e}", file=sys.stderr)
                c = None
                self._stop.wait(1.0)
            if c is None:
                if not getattr(self.queue, "blocking", False):
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                continue
            try:
                self.run(c)
            except Exception as e:
                print(f"fnbox: queue: call {c.id} failed in the executor: {e!r}", file=sys.stderr)

    def run(self, c: Call) -> None:
        name = c.function
        started = time.time()
        t0 = time.monotonic()
        result: CallResult | None = None
        if not function_exists(self.settings.functions_dir, name):
            outcome, message = outcomes.NOT_FOUND, f"no function named {name!r}"
        else:
            profile = self.profiles.for_function(name)
            ticket = None
            if self.limiter is not None:
                try:
                    ticket = self.limiter.admit(name, profile.max_concurrency)
                except Busy:
                    self._give_back(c, BUSY_RETRY_S)
                    return
            inv = Invocation(name, self.settings.functions_dir, profile, c.environ, c.body, c.request_id)
            try:
                result = self.supervisor.call(inv)
                outcome, message = result.outcome, result.message
            except Unavailable as e:
                outcome, message = outcomes.UNAVAILABLE, str(e)
            except BaseException:
                if ticket is not None:
                    ticket.release()
                raise
            if ticket is not None:
                # As a sync call: the places are the call's until its last process is gone.
                if result is None:
                    ticket.release()
                else:
                    result.when_complete(ticket.release)
            if outcome == outcomes.NOT_FOUND:  # the gateway sees it, the sandbox does not: as the sync route
                outcome = outcomes.UNAVAILABLE
                message = f"the sandbox cannot read function {name!r}"
            if outcome == outcomes.UNAVAILABLE and self._stop.is_set():
                self._give_back(c, 0.0)
                return
            if outcome == outcomes.BUSY:  # every sandbox slot of the machine in use: wait, as for the caps
                self._give_back(c, BUSY_RETRY_S)
                return
        if outcome == outcomes.OK and result is not None:
            res = ok_result(result)
        else:
            extra: dict[str, Any] = {}
            if result is not None and outcome == outcomes.CRASHED:
                extra.update(exitcode=result.exitcode, signal=result.signal)
            if result is not None and outcome == outcomes.FUNCTION_ERROR:
                extra["type"] = result.error_type
            res = error_result(outcome, message or outcome, name, c.request_id, **extra)
        finished = time.time()
        c.attempt_log.append({"attempt": c.attempts, "board": self.js.board, "started_at": started,
                              "finished_at": finished, "outcome": outcome, "status": res["status"],
                              "message": message or None})
        c.outcome, c.message, c.ran_on = outcome, message or None, self.js.board
        if outcome in RETRYABLE and c.attempts < c.max_attempts:
            c.state, c.owner, c.lease_until, c.result = QUEUED, None, None, None
            c.run_at = finished + c.backoff_s * 2 ** (c.attempts - 1)
        else:
            c.state = DONE if outcome == outcomes.OK else FAILED
            c.owner, c.lease_until, c.finished, c.result = None, None, finished, res
            if c.callback_url:
                c.callback = {"state": CB_PENDING, "attempts": 0, "next_at": finished}
        if not self._persist(c):
            print(f"fnbox: queue: call {c.id} was taken over while it ran here; its result here is dropped",
                  file=sys.stderr)
            return
        self._record(c, res["status"], outcome, message, (time.monotonic() - t0) * 1000, result)

    def _give_back(self, c: Call, delay: float) -> None:
        """Back to the queue without costing an attempt: the call did not run (busy), or was cut by a stop."""
        c.state, c.owner, c.lease_until, c.started = QUEUED, None, None, None
        c.attempts -= 1
        c.run_at = time.time() + delay
        self._persist(c)

    def _persist(self, c: Call) -> bool:
        """Writes the call's new state, waiting out a queue outage (Redis restarting) for as long as the call's
        lease lasts: after that another runner may have taken it over anyway."""
        deadline = time.monotonic() + self._lease_for(c.function)
        while True:
            try:
                return self.queue.update(c, owner=self.owner)
            except QueueUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                print(f"fnbox: queue: cannot record call {c.id} yet: {e}", file=sys.stderr)
                time.sleep(1.0)

    def _record(self, c: Call, status: int, outcome: str, message: str, total_ms: float,
                result: CallResult | None) -> None:
        if self.history is None or outcome == outcomes.NOT_FOUND:
            return
        from gateway.calllog import call_record, complete, emit

        env = c.environ
        record = call_record(request_id=c.request_id, function=c.function, method=env.get("REQUEST_METHOD", "GET"),
                             path=env.get("PATH_INFO", ""), status=status, outcome=outcome, duration_ms=total_ms,
                             result=result, message=message)
        record.update(trigger=c.trigger, call_id=c.id, attempt=c.attempts, board=self.js.board)
        pending = result is not None and not result.complete
        version = self.versions.current(c.function) if self.versions is not None else None
        self.history.record(dict(record, time=time.time(), version=version, complete=0 if pending else 1))

        def finish(r: CallResult | None) -> None:
            if r is not None and pending:
                complete(record, r)
                self.history.finish(c.request_id, r.cpu_ms, r.max_rss_kb)
            emit(record)

        if result is not None:
            result.when_complete(finish)
        else:
            finish(None)

    # -- upkeep --------------------------------------------------------------------------------------------------
    def _upkeep_loop(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(UPKEEP_EVERY_S if self._idle_callbacks() else 0.0):
            try:
                if hasattr(self.queue, "maintain"):
                    self.queue.maintain()
                self.recover()
                if time.monotonic() - last_prune > min(60.0, self.js.retention_s):
                    self.queue.prune(self.js.retention_s)
                    last_prune = time.monotonic()
            except Exception as e:
                print(f"fnbox: queue: upkeep failed: {e}", file=sys.stderr)

    def recover(self) -> int:
        """Calls RUNNING under an owner that is gone (its process died: kill -9, a crash, a restart) or whose lease
        ran out (another board that stopped answering): retried if attempts remain, else failed."""
        now = time.time()
        changed: list[str] = []  # modify() returns the call whether or not fn changed it
        for c in self.queue.running():
            alive = owner_alive(c.owner or "", self.js.board)
            if alive is None and hasattr(self.queue, "owner_alive"):
                alive = self.queue.owner_alive(c.owner or "")
            if alive is not False and (c.lease_until or 0) > now:
                continue  # its runner lives (or may: another board's, within its lease)
            owner = c.owner

            def interrupted(x: Call, owner: str | None = owner) -> bool:
                if x.state != RUNNING or x.owner != owner:
                    return False
                msg = "the worker running this call stopped (its process or board died)"
                x.attempt_log.append({"attempt": x.attempts, "board": (owner or "?").split("/")[0],
                                      "started_at": x.started, "finished_at": now, "outcome": outcomes.UNAVAILABLE,
                                      "status": 503, "message": msg})
                x.outcome, x.message, x.owner, x.lease_until = outcomes.UNAVAILABLE, msg, None, None
                changed.append(x.id)
                if x.attempts < x.max_attempts:
                    x.state, x.run_at = QUEUED, now
                else:
                    x.state, x.finished = FAILED, now
                    x.result = error_result(outcomes.UNAVAILABLE, msg, x.function, x.request_id)
                    if x.callback_url:
                        x.callback = {"state": CB_PENDING, "attempts": 0, "next_at": now}
                return True

            self.queue.modify(c.id, interrupted)
        return len(changed)

    def _idle_callbacks(self) -> bool:
        """Delivers one due callback; True when there was none (the upkeep loop then sleeps)."""
        try:
            c = self.queue.claim_callback(callbacks.TIMEOUT_S * 3)
        except Exception as e:
            print(f"fnbox: queue: cannot claim a callback: {e}", file=sys.stderr)
            return True
        if c is None:
            return True
        self.deliver(c)
        return False

    def deliver(self, c: Call) -> None:
        assert c.callback_url is not None
        status: int | None = None
        error: str | None = None
        refused = False
        try:
            status = callbacks.post(c.callback_url, self.js.callback_allow, c.public(f"/calls/{c.id}"),
                                    {"X-Fnbox-Call-Id": c.id, "X-Fnbox-Call-Status": c.state})
        except callbacks.CallbackRefused as e:
            error, refused = str(e), True
        except OSError as e:
            error = str(e) or type(e).__name__
        now = time.time()

        def outcome(x: Call) -> bool:
            cb = dict(x.callback or {})
            cb["attempts"] = cb.get("attempts", 0) + 1
            cb["last_status"], cb["last_error"], cb["lease_until"] = status, error, None
            if status is not None and 200 <= status < 300:
                cb["state"], cb["delivered_at"], cb["next_at"] = CB_DELIVERED, now, None
            elif refused or (status is not None and 300 <= status < 400) or cb["attempts"] > self.js.callback_retries:
                cb["state"], cb["next_at"] = CB_FAILED, None
                if status is not None and 300 <= status < 400:
                    cb["last_error"] = "redirects are not followed"
            else:
                cb["next_at"] = now + CALLBACK_BACKOFF_S * 2 ** (cb["attempts"] - 1)
            x.callback = cb
            return True

        self.queue.modify(c.id, outcome)
