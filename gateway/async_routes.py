"""HTTP side of queued calls: /async-function/<name>[/<subpath>], GET /calls/<id>, and the admin endpoints for
dead letters and schedules. The queue, the executor threads and the scheduler of this worker are made here."""

from __future__ import annotations

import atexit
import base64
import re
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from gateway.admin import _authenticate
from gateway.errors import GatewayError, error_response
from gateway.messages import environ_message, read_body
from gateway.routes import METHODS, function_exists
from jobs import callbacks, scheduler
from jobs.backend import open_queue
from jobs.calls import ASYNC, FAILED, QUEUED, STATES, Call, new_id
from jobs.config import JobSettings
from jobs.store import QueueFull, QueueUnavailable
from jobs.worker import Executor
from runner import outcomes

bp = Blueprint("async", __name__)
admin_bp = Blueprint("async_admin", __name__, url_prefix="/admin")
admin_bp.before_request(_authenticate)
_CALL_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Jobs:
    settings: JobSettings
    queue: Any
    executor: Executor | None
    scheduler: scheduler.Scheduler | None


def _jobs() -> Jobs:
    return current_app.extensions["fnbox_jobs"]


def _base_url() -> str:
    """This server's URL as the client sees it: behind our nginx (a trusted peer), its X-Forwarded-Host."""
    rt = current_app.extensions["fnbox"]
    fwd = request.headers.get("X-Forwarded-Host", "").split(",")[-1].strip()
    if fwd and request.remote_addr in rt.settings.forwarded_allow_ips and re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", fwd):
        return f"{request.scheme}://{fwd}"
    return request.host_url.rstrip("/")


def _sync_path(path: str) -> str:
    """/async-function/x/y -> /function/x/y: the function sees the request as its sync route would."""
    return "/function" + path[len("/async-function"):] if path.startswith("/async-function") else path


@bp.route("/async-function/<name>", defaults={"subpath": ""}, methods=METHODS, strict_slashes=False)
@bp.route("/async-function/<name>/<path:subpath>", methods=METHODS)
def enqueue(name: str, subpath: str) -> tuple[Response, int]:
    rt, jobs = current_app.extensions["fnbox"], _jobs()
    g.function = name
    if not function_exists(rt.settings.functions_dir, name):
        raise GatewayError(outcomes.NOT_FOUND, f"no function named {name!r}")
    profile = rt.profiles.for_function(name)
    body = read_body(request, profile.max_request_kb)
    callback_url = request.headers.get("X-Callback-Url") or None
    if callback_url:
        try:
            callbacks.check_url(callback_url, jobs.settings.callback_allow)
        except callbacks.CallbackRefused as e:
            raise GatewayError("callback_not_allowed", str(e)) from None
    environ = environ_message(request, body, rt.settings.forwarded_allow_ips)
    for key in ("PATH_INFO", "RAW_URI", "REQUEST_URI"):
        if key in environ:
            environ[key] = _sync_path(environ[key])
    environ.pop("HTTP_X_CALLBACK_URL", None)  # for the platform, not the function
    cid = new_id()
    environ.update(HTTP_X_FNBOX_TRIGGER=ASYNC, HTTP_X_FNBOX_CALL_ID=cid)
    call = Call(id=cid, function=name, trigger=ASYNC, environ=environ, body_b64=base64.b64encode(body).decode(),
                request_id=g.request_id, max_attempts=profile.retries + 1, backoff_s=profile.retry_backoff_s,
                board=jobs.settings.board, callback_url=callback_url)
    try:
        jobs.queue.add(call)
    except QueueFull as e:
        raise GatewayError(outcomes.BUSY, str(e)) from None
    except QueueUnavailable as e:
        raise GatewayError(outcomes.UNAVAILABLE, str(e)) from None
    if jobs.executor is not None:
        jobs.executor.wake()
    status_url = f"{_base_url()}/calls/{cid}"
    resp = jsonify({"call_id": cid, "status_url": status_url, "status": QUEUED, "function": name})
    resp.headers["Location"] = status_url
    return resp, 202


@bp.get("/calls/<call_id>")
def call_status(call_id: str) -> Response:
    """The id is 128 random bits handed only to whoever queued the call: knowing it is what lets one read it."""
    c = _jobs().queue.get(call_id) if _CALL_ID.match(call_id) else None
    if c is None:
        raise GatewayError(outcomes.NOT_FOUND, f"no call {call_id!r} (unknown, or older than the retention)")
    g.function = c.function
    resp = jsonify(c.public(f"{_base_url()}/calls/{c.id}"))
    resp.headers["Cache-Control"] = "no-store"
    return resp


@admin_bp.get("/queue")
def queue_listing() -> Response:
    state = request.args.get("state") or None
    raw = request.args.get("limit", "100")
    if state is not None and state not in STATES:
        raise GatewayError("bad_request", f"state must be one of {', '.join(STATES)}")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise GatewayError("bad_request", "limit must be an integer from 1 to 1000")
    jobs = _jobs()
    calls = [c.public(f"/calls/{c.id}") for c in jobs.queue.list(state, int(raw))]
    return jsonify({"calls": calls, "counts": jobs.queue.counts(), "board": jobs.settings.board})


@admin_bp.post("/queue/<call_id>/requeue")
def requeue(call_id: str) -> Response:
    """A failed call (a dead letter) goes back to the queue with its attempts reset; its past attempts stay in
    its attempt_log."""
    found: dict[str, str] = {}

    def again(c: Call) -> bool:
        found["state"] = c.state
        if c.state != FAILED:
            return False
        c.state, c.attempts, c.run_at, c.owner, c.lease_until = QUEUED, 0, time.time(), None, None
        c.started = c.finished = c.result = c.callback = None
        c.outcome = c.message = None
        return True

    c = _jobs().queue.modify(call_id, again) if _CALL_ID.match(call_id) else None
    if c is None:
        raise GatewayError(outcomes.NOT_FOUND, f"no call {call_id!r}")
    g.function = c.function
    if found["state"] != FAILED:
        raise GatewayError("not_failed", f"call {call_id} is {found['state']}: only failed calls are re-queued")
    if _jobs().executor is not None:
        _jobs().executor.wake()
    return jsonify({"call_id": c.id, "status": c.state, "function": c.function})


@admin_bp.get("/cluster/calls")
def cluster_calls() -> Response:
    """Kept for `fnbox logs --all-boards` of 0.2 and scripts: GET /admin/calls with `function` required."""
    from gateway import admin

    if not request.args.get("function", "").isidentifier():
        raise GatewayError("bad_request", "function must name a function")
    return jsonify({"function": request.args["function"], **admin.every_board_doc()})


@admin_bp.get("/schedules")
def schedules() -> Response:
    return jsonify({"schedules": scheduler.next_runs(current_app.extensions["fnbox"].profiles, time.time())})


def install(app: Flask, start: bool) -> Jobs:
    """The queue for this app; with start, this worker's executor threads and scheduler too."""
    rt = app.extensions["fnbox"]
    js = JobSettings.from_env()
    queue = open_queue(rt.settings, js)
    executor = sched = None
    if start:
        executor = Executor(queue, rt.settings, js, rt.profiles, rt.supervisor, rt.history, rt.limiter, rt.store)
        executor.start()
        if js.schedules:
            sched = scheduler.Scheduler(queue, rt.profiles, js.board, on_tick=executor.wake,
                                        late_override=js.schedule_late_s)
            sched.start()
            atexit.register(sched.stop)
        atexit.register(executor.stop)
    jobs = Jobs(js, queue, executor, sched)
    app.extensions["fnbox_jobs"] = jobs
    if js.redis_url:
        _deploy_channel(app, rt, js, start)

    @app.errorhandler(QueueUnavailable)
    def _queue_down(e: QueueUnavailable) -> Response:
        return error_response(outcomes.UNAVAILABLE, str(e), function=g.get("function"),
                              request_id=g.get("request_id") or new_id())

    app.register_blueprint(bp)
    if rt.admin_token:
        app.register_blueprint(admin_bp)
    return jobs


_CHANGES = {"admin.deploy": "deploy", "admin.rollback": "rollback", "admin.delete": "delete"}


def _deploy_channel(app: Flask, rt: Any, js: JobSettings, start: bool) -> None:
    """Several boards: a deploy, rollback or delete answered here is published; those of others are applied."""
    from jobs.boards import BoardRegistry
    from jobs.deploys import DeployChannel

    channel = DeployChannel(js.redis_url or "", rt.store, rt.settings.data_dir, js.board)
    registry = app.extensions["fnbox_boards"] = BoardRegistry(js.redis_url or "", js.board, js.board_url)
    if start:
        channel.start()
        registry.start()

    @app.after_request
    def _publish(resp: Response) -> Response:
        op = _CHANGES.get(request.endpoint or "")
        if op and resp.status_code < 300:
            try:
                channel.publish(op, request.view_args["name"])  # type: ignore[index]
            except Exception as e:  # the change is made here; other boards catch up when Redis is back
                resp.headers["X-Fnbox-Cluster-Warning"] = f"not published to other boards: {e}"[:200]
        return resp


def shutdown(app: Any) -> None:
    """Gunicorn's worker_exit: stop claiming and let running queued calls end before the runner goes."""
    jobs = getattr(app, "extensions", {}).get("fnbox_jobs")
    if jobs is None:
        return
    if jobs.scheduler is not None:
        jobs.scheduler.stop()
    if jobs.executor is not None:
        jobs.executor.stop()
