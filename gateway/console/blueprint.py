"""The console's blueprint and what runs around every one of its requests: the session, CSRF on every
state-changing request, role checks, security headers, and the console's errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, redirect, render_template, request, url_for

from gateway.console import auth
from gateway.console.config import ConsoleConfig
from gateway.console.errors import ConsoleError
from gateway.console.queries import HistoryReader
from gateway.console.store import ConsoleStore

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static",
               static_url_path="/static")

# No inline script or style anywhere: every script and stylesheet is a file of this package.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PUBLIC = {"console.login", "console.login_post", "console.static", "console.highlight_css", "console.logout"}
PLAYGROUND_ENDPOINTS = {"console.playground", "console.playground_run"}


@dataclass
class ConsoleState:
    cfg: ConsoleConfig
    store: ConsoleStore
    reader: HistoryReader


def state() -> ConsoleState:
    return current_app.extensions["fnbox_console"]


def rt() -> Any:
    return current_app.extensions["fnbox"]


def client() -> str:
    return auth.client_ip(request, rt().settings.forwarded_allow_ips)


def wants_json() -> bool:
    return request.path.startswith("/console/api/")


MAX_BODY = 2 * 1024 * 1024  # a deploy from the editor, a snippet and its request: JSON well under this


@bp.before_request
def _session() -> Response | None:
    if (request.content_length or 0) > MAX_BODY:
        raise ConsoleError("request_too_large", "a console request is at most 2 MiB")
    st = state()
    s = auth.current_session(st.store)
    endpoint = request.endpoint or ""
    if s is None and endpoint in PLAYGROUND_ENDPOINTS and auth.in_networks(client(), st.cfg):
        # An allow-listed client opens the playground without a token: it gets a playground session.
        sid, s = st.store.create_session(auth.PLAYGROUND, client())
        g.new_session_id = sid
        if request.method == "POST":
            raise ConsoleError("csrf_failed", "reload the page and try again")
    g.console_session = s
    if endpoint in PUBLIC:
        return None
    if s is None:
        if wants_json():
            raise ConsoleError("unauthorized", "sign in first (your session ended)")
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    if s.role != auth.ADMIN and endpoint not in PLAYGROUND_ENDPOINTS:
        if wants_json() or request.method != "GET":
            raise ConsoleError("forbidden", "this session may use the playground only")
        return redirect(url_for("console.playground"))
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        auth.check_csrf(s)
    return None


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint in ("console.static", "console.highlight_css"):
        resp.headers["Cache-Control"] = "public, max-age=300"
    else:
        resp.headers["Cache-Control"] = "no-store"
    sid = g.get("new_session_id")
    if sid:
        auth.set_session_cookie(resp, sid, state().cfg.session_hours * 3600)
    return resp


@bp.errorhandler(ConsoleError)
def _console_error(e: ConsoleError) -> tuple[Response, int] | tuple[str, int]:
    headers = {}
    if e.code == "rate_limited" and e.extra.get("retry_after"):
        headers["Retry-After"] = str(int(e.extra["retry_after"]))
    if wants_json():
        body = {"error": e.code, "message": e.message, **e.extra}
        return jsonify(body), e.status, headers  # type: ignore[return-value]
    return render_template("error.html", error=e), e.status, headers  # type: ignore[return-value]


def ctx(**kw: Any) -> dict[str, Any]:
    """What every page's template needs."""
    s = g.get("console_session")
    return {"session": s, "csrf": s.csrf if s else "", "admin": bool(s and s.role == auth.ADMIN), **kw}
