"""`fnbox calls`, `fnbox schedules` and `fnbox worker`: the queue side of the command line (docs/cluster.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any


def _when(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else None


def cmd_calls(args: argparse.Namespace) -> int:
    from cli.main import _api, _table

    if args.requeue:
        doc = _api(args, "POST", f"/admin/queue/{args.requeue}/requeue")
        print(f"re-queued {doc['call_id']} ({doc['function']})")
        return 0
    state = "failed" if args.failed else (args.state or "")
    doc = _api(args, "GET", f"/admin/queue?limit={args.n}" + (f"&state={state}" if state else ""))
    if args.json:
        print(json.dumps(doc["calls"], indent=2))
        return 0
    rows: list[list[Any]] = [["CALL_ID", "FUNCTION", "TRIGGER", "STATUS", "ATTEMPTS", "OUTCOME", "QUEUED", "BOARD"]]
    for c in doc["calls"]:
        rows.append([c["call_id"], c["function"], c["trigger"], c["status"], f"{c['attempts']}/{c['max_attempts']}",
                     c["outcome"], _when(c["queued_at"]), c["ran_on"] or c["board"]])
    print(_table(rows))
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from cli.main import _api, _table

    doc = _api(args, "GET", "/admin/schedules")
    if args.json:
        print(json.dumps(doc["schedules"], indent=2))
        return 0
    rows: list[list[Any]] = [["FUNCTION", "SCHEDULE", "TIMEZONE", "CATCH_UP", "NEXT_RUN"]]
    for s in doc["schedules"]:
        rows.append([s["function"], s["schedule"] or f"every {s['every']:g}s", s["timezone"],
                     "yes" if s["catch_up"] else "no", s["next_run_local"]])
    print(_table(rows))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Runs queued calls (and fires schedule ticks) without serving HTTP, through its own sandboxed runner."""
    from gateway.admission import ConcurrencyLimiter
    from gateway.deploy import FunctionStore
    from gateway.history import History
    from jobs.backend import open_queue
    from jobs.config import JobSettings
    from jobs.scheduler import Scheduler
    from jobs.worker import Executor
    from runner.config import Settings, max_calls_for
    from runner.profiles import ProfileStore
    from runner.supervisor import Supervisor

    settings = Settings.from_env()
    js = JobSettings.from_env()
    profiles = ProfileStore(settings.profiles_dir)
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    os.makedirs(settings.data_dir, mode=0o711, exist_ok=True)
    supervisor = Supervisor(settings)
    history = History(os.path.join(settings.data_dir, "history.sqlite3"), settings.history_max_rows,
                      settings.history_max_age_days)
    # The same per-function and server caps as the board's Gunicorn workers (see gateway/app.py).
    instance = hashlib.sha256(os.path.realpath(settings.functions_dir).encode()).hexdigest()[:16]
    limiter = ConcurrencyLimiter(os.path.join(settings.state_dir, "concurrency", instance),
                                 max_calls_for(settings, profiles.current().profiles["default"].memory_mb))
    queue = open_queue(settings, js)
    executor = Executor(queue, settings, js, profiles, supervisor, history, limiter,
                        FunctionStore(settings.functions_dir, settings.data_dir), threads=args.concurrency)
    sched = None
    if args.schedules:
        sched = Scheduler(queue, profiles, js.board, on_tick=executor.wake, late_override=js.schedule_late_s)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    supervisor.start()
    executor.start()
    if sched:
        sched.start()
    print(f"fnbox worker: board {js.board}, {args.concurrency} calls at once, queue "
          f"{'redis' if js.redis_url else 'sqlite'}, schedules {'on' if sched else 'off'}", file=sys.stderr, flush=True)
    done.wait()
    if sched:
        sched.stop()
    executor.stop(args.grace)
    supervisor.close()
    history.close()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("calls", help="queued calls (async and scheduled): --failed lists the dead letters")
    p.add_argument("--failed", action="store_true", help="only failed calls (dead letters)")
    p.add_argument("--state", choices=["queued", "running", "done", "failed"], help="only calls in this state")
    p.add_argument("--requeue", metavar="CALL_ID", help="put a failed call back in the queue")
    p.add_argument("-n", type=int, default=50, metavar="N", help="how many of the newest calls (default 50)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(fn=cmd_calls)
    p = sub.add_parser("schedules", help="the next run of each scheduled function")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(fn=cmd_schedules)
    p = sub.add_parser("worker", help="run queued calls and schedules here, without serving HTTP")
    p.add_argument("--concurrency", type=int, default=int(os.environ.get("FNBOX_ASYNC_CONCURRENCY") or 2),
                   help="queued calls run at once (default: $FNBOX_ASYNC_CONCURRENCY, else 2)")
    p.add_argument("--no-schedules", dest="schedules", action="store_false",
                   help="run queued calls only; leave the schedules to another worker or server")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running calls get to finish on SIGTERM")
    p.set_defaults(fn=cmd_worker)
