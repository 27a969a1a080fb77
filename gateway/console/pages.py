"""The console's pages: functions, a function, calls, a call, metrics, playground."""

from __future__ import annotations

import time
from typing import Any

from flask import Response, abort, render_template, request

from gateway import board_calls
from gateway.console import charts, source
from gateway.console.blueprint import bp, ctx, rt, state
from gateway.console.errors import ConsoleError
from gateway.console.queries import PAGE, CallFilter, buckets, percentile, window
from gateway.deploy import valid_name
from gateway.errors import GatewayError
from runner import outcomes
from runner.profiles import function_names

RANGES = {"15m": 15 * 60, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}
SECRET_MASK = "••••••••"
SPARK_CALLS = 30  # the functions list's sparkline: latency of each of the last calls in the hour


def masked_limits(name: str) -> dict[str, Any]:
    limits = rt().profiles.for_function(name).to_dict()
    limits["env"] = {k: SECRET_MASK for k in limits.get("env", {})}
    return limits


@bp.get("/highlight.css")
def highlight_css() -> Response:
    return Response(source.stylesheet(), mimetype="text/css")


@bp.get("/")
def functions() -> str:
    r, st = rt(), state()
    start = time.time() - 3600
    rows = st.reader.recent(start)
    last = st.reader.last_calls()
    per: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        per.setdefault(row["function"], []).append(row)
    out = []
    for name in function_names(r.settings.functions_dir):
        prof = r.profiles.for_function(name)
        mine = per.get(name, [])
        errors = sum(1 for x in mine if x["outcome"] != outcomes.OK)
        recent = [x["duration_ms"] for x in mine[-SPARK_CALLS:]]
        out.append({
            "name": name, "version": r.store.current(name), "profile": prof.profile, "timeout_s": prof.timeout_s,
            "memory_mb": prof.memory_mb, "max_concurrency": prof.max_concurrency, "network": prof.network,
            "last_call": last.get(name), "calls": len(mine), "errors": errors,
            "error_rate": (errors / len(mine)) if mine else None,
            "p50": percentile([x["duration_ms"] for x in mine if x["duration_ms"] is not None], 0.5),
            "spark": charts.sparkline(recent, f"latency of the last {len(recent)} calls of {name}"),
        })
    return render_template("functions.html", **ctx(functions=out, page="functions", q=request.args.get("q", "")))


@bp.get("/functions/<name>")
def function(name: str) -> str:
    r = rt()
    if not valid_name(name):
        abort(404)
    src, kind = source.live_source(r.settings.functions_dir, name)
    if src is None:
        raise ConsoleError("not_found", f"no function named {name!r}")
    versions = list(reversed(r.store.versions(name)))
    current = r.store.current(name)
    diff = None
    raw = request.args.get("diff", "")
    if raw.isdigit():
        old = source.version_source(r.store.versions_dir, name, int(raw))
        if old is None:
            raise ConsoleError("not_found", f"{name!r} has no version {raw}")
        diff = {"version": int(raw), "html": source.diff(old, src, f"version {raw}", "live")}
    listed = _every_board(CallFilter(function=name), 10)
    notice = {"deployed": "Deployed version {v}.", "rolledback": "Rolled back: version {v} is live."}.get(
        request.args.get("done", ""), "")
    v = request.args.get("v", "")
    return render_template("function.html", **ctx(
        page="functions", name=name, kind=kind, source=src, highlighted=source.highlight(src), versions=versions,
        current=current, diff=diff, limits=masked_limits(name), calls=listed["calls"], listed=listed,
        notice=notice.format(v=v) if v.isdigit() else ""))


def _every_board(f: CallFilter, limit: int, board: str | None = None) -> dict[str, Any]:
    """Calls of every board (gateway/board_calls.py), with what the templates need to label them."""
    try:
        doc = board_calls.listing(board_calls.CallQuery(f, limit, board))
    except GatewayError as e:
        raise ConsoleError(e.code, e.message) from None
    every = sorted({*doc["boards"], *(u["board"] for u in doc["unreachable"])})
    return {**doc, "every": every, "cluster": len(every) > 1 or board is not None}


def _filter() -> tuple[CallFilter, str]:
    status_raw = request.args.get("status", "").strip()
    if status_raw and not (status_raw.isdigit() and 100 <= int(status_raw) <= 599):
        raise ConsoleError("bad_request", "status must be an HTTP status code (100-599)")
    rng = request.args.get("range", "24h")
    if rng not in RANGES and rng != "all":
        raise ConsoleError("bad_request", f"range must be one of {', '.join([*RANGES, 'all'])}")
    outcome = request.args.get("outcome") or None
    if outcome and outcome not in outcomes.ALL:
        raise ConsoleError("bad_request", f"unknown outcome {outcome!r}")
    until_raw = request.args.get("until", "")
    try:
        until = float(until_raw) if until_raw else None
    except ValueError:
        raise ConsoleError("bad_request", "until must be a unix time") from None
    since = time.time() - RANGES[rng] if rng in RANGES else None
    return CallFilter(function=request.args.get("function") or None, outcome=outcome,
                      status=int(status_raw) if status_raw else None, since=since, until=until), rng


@bp.get("/calls")
def calls() -> str:
    """Every board's calls, newest first (one board: its own). Pages go back in time (`until` = the time of the
    last row shown), which is what rows of several boards have in common."""
    r, st = rt(), state()
    f, rng = _filter()
    board = request.args.get("board") or None
    listed = _every_board(f, PAGE + 1, board)
    rows = listed["calls"]
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    names = sorted(set(function_names(r.settings.functions_dir)) | set(st.reader.functions()))
    return render_template("calls.html", **ctx(
        page="calls", calls=rows, more=more, next_until=repr(rows[-1]["time"]) if rows else None,
        first_page=f.until is None, last_id=st.reader.last_id(), f=f, rng=rng, ranges=[*RANGES, "all"],
        names=names, outcome_names=sorted(outcomes.ALL - {outcomes.NOT_FOUND}), args=request.args, listed=listed,
        board=board))


REDACTED = "[redacted]"


@bp.get("/calls/<request_id>")
def call(request_id: str) -> str:
    """A call of this board, or of another one (?board=NAME, else every board is asked): its record is fetched
    from that board's admin API, request headers included (redacted there when they were kept)."""
    board = request.args.get("board") or None
    try:
        found = board_calls.find_call(request_id, board)
    except board_calls.BoardUnreachable as e:
        raise ConsoleError("unavailable", f"the call is on another board that does not answer now: {e}") from None
    if found is None:
        raise ConsoleError("not_found", f"no call with request id {request_id!r}"
                                        + (f" on board {board!r}" if board else ""))
    where, row = found
    req = row.pop("request", None)
    # Error details are columns of newer history databases; older rows (and databases) simply have none.
    errors = {"error_type": row.get("error_type"), "error_message": row.get("error_message") or row.get("message"),
              "traceback": row.get("traceback")}
    errors = {k: v for k, v in errors.items() if v}
    me = board_calls.this_board()  # the name only: no second read of the board registry
    return render_template("call.html", **ctx(page="calls", c=row, req=req, errors=errors, board=where,
                                              elsewhere=where != me, this_board=me))


@bp.get("/metrics")
def metrics() -> str:
    r, st = rt(), state()
    rng = request.args.get("range", "1h")
    minutes = {"15m": 15, "1h": 60, "6h": 360, "24h": 1440}.get(rng)
    if minutes is None:
        raise ConsoleError("bad_request", "range must be one of 15m, 1h, 6h, 24h")
    points = 60 if minutes <= 60 else 72 if minutes <= 360 else 96
    start, width = window(minutes, points)
    rows = st.reader.recent(start)
    total = buckets(rows, start, width, points)
    starts = [b.start for b in total]
    per: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        per.setdefault(row["function"], []).append(row)
    names = sorted(per, key=lambda n: -len(per[n]))
    error_series = {n: [float(b.errors) for b in buckets(per[n], start, width, points)] for n in names[:8]
                    if any(x["outcome"] != outcomes.OK for x in per[n])}
    table = []
    for n in names:
        d = [x["duration_ms"] for x in per[n] if x["duration_ms"] is not None]
        errs = sum(1 for x in per[n] if x["outcome"] != outcomes.OK)
        table.append({"name": n, "calls": len(per[n]), "errors": errs, "p50": percentile(d, 0.5),
                      "p99": percentile(d, 0.99), "rate": len(per[n]) / (minutes * 60)})
    charts_ = {
        "rate": charts.line_chart({"calls/s": [b.calls / width for b in total],
                                   "errors/s": [b.errors / width for b in total]}, starts, "/s",
                                  "calls and errors per second", bars=True),
        "latency": charts.line_chart({"p50": [b.p50 for b in total], "p99": [b.p99 for b in total]}, starts, "ms",
                                     "p50 and p99 latency in milliseconds"),
        "errors": charts.line_chart(error_series, starts, "errors", "errors per function") if error_series else None,
    }
    pong = r.supervisor.ping(timeout=2.0)
    layers = []
    for lname, value in (r.supervisor.layers or {}).items():
        if isinstance(value, dict):  # a structured layer result
            status, detail = str(value.get("status", "")), str(value.get("detail", ""))
        else:  # "active: what it does" / "DEGRADED: why"
            status, _, detail = str(value).partition(": ")
        layers.append({"name": lname, "active": status.lower() == "active", "detail": detail or status})
    health = {"fork_server": "running" if pong else "unavailable", "pid": r.supervisor.pid,
              "restarts": r.supervisor.restarts, "in_flight": pong.get("calls") if pong else None,
              "max_calls": r.limiter.max_calls, "profiles_error": r.profiles.error,
              "error": None if pong else (r.supervisor.last_error or "the fork server does not answer")}
    return render_template("metrics.html", **ctx(
        page="metrics", rng=rng, charts=charts_, series_names=list(error_series), table=table, layers=layers,
        health=health, total_calls=len(rows), width=width))


@bp.get("/playground")
def playground() -> str:
    st = state()
    prof = rt().profiles.current().profiles.get(st.cfg.playground_profile)
    return render_template("playground.html", **ctx(page="playground", profile=prof,
                                                      profile_name=st.cfg.playground_profile))
