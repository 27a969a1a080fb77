"""The Flask application factory. Gunicorn loads `gateway.app:create_app()` in each worker."""

from __future__ import annotations

import atexit
import os
import re
import uuid
from dataclasses import dataclass

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from gateway.admission import ConcurrencyLimiter
from gateway.errors import error_response
from gateway.routes import bp
from runner.config import Settings
from runner.profiles import ProfileStore
from runner.supervisor import Supervisor

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Runtime:
    settings: Settings
    profiles: ProfileStore
    supervisor: Supervisor
    limiter: ConcurrencyLimiter


def create_app(settings: Settings | None = None, start: bool = True) -> Flask:
    settings = settings or Settings.from_env()
    profiles = ProfileStore(settings.profiles_dir)  # raises ProfileError: the server refuses to start
    supervisor = Supervisor(settings)
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    rt = Runtime(settings, profiles, supervisor, ConcurrencyLimiter(os.path.join(settings.state_dir, "concurrency")))
    app = Flask("fnbox")
    app.extensions["fnbox"] = rt
    app.register_blueprint(bp)

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.function = None

    @app.after_request
    def _tag(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.code or 500, "bad_request")
        rid = g.get("request_id") or uuid.uuid4().hex
        resp = error_response(code, e.description or e.name, function=g.get("function"), request_id=rid)
        resp.status_code = e.code or 500
        return resp

    if start:
        supervisor.start()
        atexit.register(supervisor.close)
    return app
