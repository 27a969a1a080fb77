"""HTTP routes: /function/<name>[/<subpath>] and /healthz."""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from gateway import metrics
from gateway.admission import Busy, Ticket
from gateway.errors import GatewayError, error_response, exception_extra
from gateway.messages import environ_message, read_body, to_response
from gateway.recorder import CallRecorder
from runner import outcomes
from runner.profiles import Profile
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
    ticket: Ticket | None = None
    try:
        if not function_exists(rt.settings.functions_dir, name):
            raise GatewayError(outcomes.NOT_FOUND, f"no function named {name!r}")
        profile = rt.profiles.for_function(name)
        body = read_body(request, profile.max_request_kb)
        try:
            ticket = rt.limiter.admit(name, profile.max_concurrency)
        except Busy as e:
            raise GatewayError(outcomes.BUSY, e.message) from None
        with ticket:  # an exception gives the places back; otherwise the call keeps them until it ends
            environ = environ_message(request, body, rt.settings.forwarded_allow_ips)
            result = _run(rt, Invocation(name, rt.settings.functions_dir, profile, environ, body, g.request_id))
            _hold_until_end(ticket, result)
        resp = _call_response(rt, name, profile, result)
        outcome, message = result.outcome, result.message
    except GatewayError as e:
        resp = error_response(e.code, e.message, function=name, request_id=g.request_id, **e.extra)
        outcome, message = e.code, e.message
    if result is not None:
        total_ms = (time.monotonic() - t0) * 1000
        fn_ms = max(0.0, result.wall_ms - result.sandbox_ms)
        resp.headers["Server-Timing"] = (f"total;dur={total_ms:.2f}, sandbox;dur={result.sandbox_ms:.2f}, "
                                         f"function;dur={fn_ms:.2f}")
    recorder = CallRecorder(rt, name, request.method, request.path, g.request_id, t0)
    recorder.answered(resp.status_code, outcome, message, result)
    if result is None:
        recorder.ended(None)
    else:
        result.when_complete(recorder.ended)
    return resp


def _hold_until_end(ticket: Ticket, result: CallResult) -> None:
    """The call keeps its admission places until its last process is gone (the fork server's report), which may
    come after the answer; whatever happens to the answer, the places are given back then."""
    if not result.complete:
        ticket.answered()  # its processes are exiting: a newcomer may wait for its places rather than get a 503

    def ended(_: CallResult) -> None:
        ticket.release()
        metrics.IN_FLIGHT.dec()

    result.when_complete(ended)


def _run(rt: Any, inv: Invocation) -> CallResult:
    metrics.IN_FLIGHT.inc()
    try:
        return rt.supervisor.call(inv)
    except Unavailable as e:
        metrics.IN_FLIGHT.dec()
        raise GatewayError(outcomes.UNAVAILABLE, str(e)) from None
    except BaseException:
        metrics.IN_FLIGHT.dec()
        raise


def _call_response(rt: Any, name: str, profile: Profile, result: CallResult) -> Response:
    if result.outcome == outcomes.NOT_FOUND and function_exists(rt.settings.functions_dir, name):
        # The gateway sees the function and the call's process does not: the sandbox uids cannot read the
        # functions folder (e.g. chmod 000). Not a missing function: every function of the folder fails so.
        result.outcome = outcomes.UNAVAILABLE
        result.message = (f"the sandbox cannot read function {name!r}: the functions folder and its files must "
                          "be readable by every user (o+rx); `python -m runner.doctor` checks this")
    if result.outcome == outcomes.OK:
        return to_response(result)
    extra = exception_extra(result, profile.traceback)
    message = result.message or result.outcome
    return error_response(result.outcome, message, function=name, request_id=g.request_id, **extra)


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
        "history": rt.history.health(),  # this worker's: records lost, database errors
        "preload": rt.supervisor.preload.report(),  # module -> ok, pending or failed: why (runner/preload.py)
        "error": None if pong else (rt.supervisor.last_error or "the fork server does not answer"),
        "fork_server_retrying": rt.supervisor.retrying,
        "worker_pid": os.getpid(),
    }
    return jsonify(body), 200 if pong else 503
