"""HTTP routes: /function/<name>[/<subpath>] and /healthz."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, g, jsonify, request

from gateway import metrics
from gateway.calllog import call_record, complete, emit
from gateway.errors import GatewayError, error_response
from gateway.messages import environ_message, read_body, to_response
from runner import outcomes
from runner.supervisor import CallResult, Invocation, Unavailable

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

bp = Blueprint("fnbox", __name__)


def function_exists(functions_dir: str, name: str) -> bool:
    """Only `<name>.py` or `<name>/__init__.py` directly in the functions folder; never a dotted path, a private
    helper or anything outside it."""
    if not name.isidentifier() or name.startswith("_"):
        return False
    return (os.path.isfile(os.path.join(functions_dir, name + ".py"))
            or os.path.isfile(os.path.join(functions_dir, name, "__init__.py")))


@bp.route("/function/<name>", defaults={"subpath": ""}, methods=METHODS, strict_slashes=False)
@bp.route("/function/<name>/<path:subpath>", methods=METHODS)
def invoke(name: str, subpath: str) -> Response:
    rt = current_app.extensions["fnbox"]
    t0 = time.monotonic()
    g.function = name
    result: CallResult | None = None
    try:
        if not function_exists(rt.settings.functions_dir, name):
            raise GatewayError(outcomes.NOT_FOUND, f"no function named {name!r}")
        profile = rt.profiles.for_function(name)
        body = read_body(request, profile.max_request_kb)
        tokens = rt.limiter.admit(name, profile.max_concurrency)
        if tokens == "function":
            raise GatewayError(outcomes.BUSY, f"{name!r} already has {profile.max_concurrency} calls in flight "
                                              "(max_concurrency)")
        if tokens == "server":
            raise GatewayError(outcomes.BUSY, f"the server already has {rt.limiter.max_calls} calls in flight "
                                              "(FNBOX_MAX_CALLS)")
        if tokens == "worker":
            raise GatewayError(outcomes.BUSY, f"this worker already has {rt.limiter.worker_max} calls in flight "
                                              "(FNBOX_THREADS minus the threads kept for /healthz and 503s)")
        environ = environ_message(request, body, rt.settings.forwarded_allow_ips)
        inv = Invocation(name, rt.settings.functions_dir, profile, environ, body, g.request_id)
        metrics.IN_FLIGHT.inc()
        try:
            result = rt.supervisor.call(inv)
        except Unavailable as e:
            raise GatewayError(outcomes.UNAVAILABLE, str(e)) from None
        finally:
            metrics.IN_FLIGHT.dec()
            for token in tokens:
                rt.limiter.release(token)
        if result.outcome == outcomes.NOT_FOUND and function_exists(rt.settings.functions_dir, name):
            # The gateway sees the function and the call's process does not: the sandbox uids cannot read the
            # functions folder (e.g. chmod 000). Not a missing function: every function of the folder fails so.
            result.outcome = outcomes.UNAVAILABLE
            result.message = (f"the sandbox cannot read function {name!r}: the functions folder and its files must "
                              "be readable by every user (o+rx); `python -m runner.doctor` checks this")
        if result.outcome == outcomes.OK:
            resp = to_response(result)
        else:
            extra = {}
            if result.outcome == outcomes.FUNCTION_ERROR:
                extra["type"] = result.error_type
                if profile.traceback:
                    extra["traceback"] = result.traceback
            elif result.outcome == outcomes.CRASHED:
                extra.update(exitcode=result.exitcode, signal=result.signal)
            message = result.message or result.outcome
            resp = error_response(result.outcome, message, function=name, request_id=g.request_id, **extra)
        outcome, message = result.outcome, result.message
    except GatewayError as e:
        resp = error_response(e.code, e.message, function=name, request_id=g.request_id, **e.extra)
        outcome, message = e.code, e.message
    total_ms = (time.monotonic() - t0) * 1000
    if result is not None:
        fn_ms = max(0.0, result.wall_ms - result.sandbox_ms)
        resp.headers["Server-Timing"] = (f"total;dur={total_ms:.2f}, sandbox;dur={result.sandbox_ms:.2f}, "
                                         f"function;dur={fn_ms:.2f}")
    status, rid = resp.status_code, g.request_id
    record = call_record(request_id=rid, function=name, method=request.method, path=request.path, status=status,
                         outcome=outcome, duration_ms=total_ms, result=result, message=message)
    counted = outcome != outcomes.NOT_FOUND  # only real functions become metric labels and history rows
    pending = result is not None and not result.complete
    if counted:
        metrics.observe(name, outcome, status, total_ms / 1000)
        row = dict(record, time=time.time(), version=rt.store.current(name), complete=0 if pending else 1)
        rt.history.record(row)  # committed before we answer: the next request finds it, on any worker

    def finish(r: CallResult | None) -> None:
        # When the call's last process is gone (now, or soon after the answer): its CPU and peak memory.
        if r is not None and pending:
            complete(record, r)
            if counted:
                rt.history.finish(rid, r.cpu_ms, r.max_rss_kb)
        if r is not None and counted:
            metrics.observe_memory(name, r.max_rss_kb)
        emit(record)

    if result is not None:
        result.when_complete(finish)
    else:
        finish(None)
    return resp


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    rt = current_app.extensions["fnbox"]
    pong = rt.supervisor.ping(timeout=2.0)
    rt.profiles.current()  # notices a bad edit even when no call comes
    body = {
        "status": "ok" if pong else "unavailable",
        "fork_server_pid": rt.supervisor.pid,
        "fork_server_restarts": rt.supervisor.restarts,
        "calls_in_flight": pong.get("calls") if pong else None,
        "max_calls": rt.limiter.max_calls,
        "sandbox": rt.supervisor.layers,
        "profiles_error": rt.profiles.error,
        "preload": rt.supervisor.preload.report(),  # module -> ok, pending or failed: why (runner/preload.py)
        "error": None if pong else (rt.supervisor.last_error or "the fork server does not answer"),
        "worker_pid": os.getpid(),
    }
    return jsonify(body), 200 if pong else 503
