"""The Flask application factory. Gunicorn loads `gateway.app:create_app()` in each worker."""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import uuid
from dataclasses import dataclass

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from gateway import admin, async_routes, console, metrics
from gateway.admission import ConcurrencyLimiter, worker_cap
from gateway.deploy import FunctionStore
from gateway.errors import HTTP_CODES, GatewayError, error_response
from gateway.history import History
from gateway.routes import bp
from runner.config import Settings, max_calls_for
from runner.preload import union as preload_union
from runner.profiles import ProfileStore
from runner.supervisor import Supervisor

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DRAIN_MAX = 64 * 1024 * 1024


def _drain(resp: Response) -> None:
    """Reads what is left of a refused request's body (413, 401, ...) before answering. Answering with the body
    unread makes Gunicorn close the connection under the client, which nginx then reports as a 502 instead of
    our JSON error. A body too large to be worth reading gets `Connection: close` instead."""
    length = request.content_length
    if not length:
        return
    if length > DRAIN_MAX:
        resp.headers["Connection"] = "close"
        return
    try:
        request.stream.exhaust()
    except Exception:
        resp.headers["Connection"] = "close"


@dataclass
class Runtime:
    settings: Settings
    profiles: ProfileStore
    supervisor: Supervisor
    limiter: ConcurrencyLimiter
    store: FunctionStore
    history: History
    admin_token: str | None


def create_app(settings: Settings | None = None, start: bool = True) -> Flask:
    settings = settings or Settings.from_env()
    profiles = ProfileStore(settings.profiles_dir)  # raises ProfileError: the server refuses to start
    supervisor = Supervisor(settings, on_restart=metrics.RESTARTS.inc,
                            preload_modules=lambda: preload_union(profiles.current()))
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    os.makedirs(settings.data_dir, mode=0o711, exist_ok=True)
    history = History(os.path.join(settings.data_dir, "history.sqlite3"), settings.history_max_rows,
                      settings.history_max_age_days)
    # The state dir is machine-wide (the sandbox slots are), but max_concurrency is per server: another fnbox
    # instance's function of the same name must not take this one's places. Workers of one server share them.
    instance = hashlib.sha256(os.path.realpath(settings.functions_dir).encode()).hexdigest()[:16]
    limiter = ConcurrencyLimiter(os.path.join(settings.state_dir, "concurrency", instance),
                                 max_calls_for(settings, profiles.current().profiles["default"].memory_mb),
                                 worker_cap(settings.threads))
    rt = Runtime(settings, profiles, supervisor, limiter,
                 FunctionStore(settings.functions_dir, settings.data_dir), history,
                 os.environ.get("FNBOX_ADMIN_TOKEN") or None)
    app = Flask("fnbox")
    app.extensions["fnbox"] = rt
    app.register_blueprint(bp)
    if rt.admin_token:
        app.register_blueprint(admin.bp)
    console.register(app, rt)  # the web console, when a token or password turns it on
    async_routes.install(app, start)  # /async-function, /calls, the queue's executor threads and scheduler

    @app.get("/metrics")
    def _metrics() -> Response:
        data, ctype = metrics.render()
        return Response(data, content_type=ctype)

    @app.errorhandler(GatewayError)
    def _gateway_error(e: GatewayError) -> Response:
        rid = g.get("request_id") or uuid.uuid4().hex
        return error_response(e.code, e.message, function=g.get("function"), request_id=rid, **e.extra)

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.function = None

    @app.after_request
    def _tag(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        _drain(resp)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        code = HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")
        rid = g.get("request_id") or uuid.uuid4().hex
        resp = error_response(code, e.description or e.name, function=g.get("function"), request_id=rid)
        resp.status_code = status
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        # A bug of the gateway: the full traceback goes to the server log, the client gets a stable JSON 500.
        rid = g.get("request_id") or uuid.uuid4().hex
        app.logger.error("fnbox: unexpected error in %s %s (request %s)", request.method, request.path, rid,
                         exc_info=e)
        return error_response("internal_error", f"unexpected error in the gateway ({type(e).__name__}); the "
                              "server log has the details", function=g.get("function"), request_id=rid)

    if not rt.admin_token:
        @app.route("/admin", defaults={"rest": ""}, methods=admin.METHODS, strict_slashes=False)
        @app.route("/admin/<path:rest>", methods=admin.METHODS)
        def _admin_off(rest: str) -> Response:
            raise GatewayError("admin_disabled", "the admin API is off on this server: start it with "
                               "FNBOX_ADMIN_TOKEN=<a long random secret> in its environment (docs/operators.md)")

    if start:
        supervisor.start_or_retry()
        atexit.register(supervisor.close)
        atexit.register(history.close)
    return app
