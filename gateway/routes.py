"""HTTP routes: /function/<name>[/<subpath>] and /healthz."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, g, jsonify, request

from gateway import metrics
from gateway.calllog import log_call
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
    record = log_call(request_id=g.request_id, function=name, method=request.method, path=request.path,
                      status=resp.status_code, outcome=outcome, duration_ms=total_ms, result=result,
                      message=message)
    if outcome != outcomes.NOT_FOUND:  # only real functions become metric labels and history rows
        metrics.observe(name, outcome, resp.status_code, total_ms / 1000, result.max_rss_kb if result else None)
        record["time"] = time.time()
        record["version"] = rt.store.current(name)
        rt.history.record(record)
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
        "error": None if pong else (rt.supervisor.last_error or "the fork server does not answer"),
        "worker_pid": os.getpid(),
    }
    return jsonify(body), 200 if pong else 503
