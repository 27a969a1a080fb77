"""Sign in and sign out."""

from __future__ import annotations

import hmac

from flask import Response, g, make_response, redirect, render_template, request, url_for

from gateway.console import auth
from gateway.console.blueprint import bp, client, ctx, state
from gateway.console.errors import ConsoleError

WINDOW_S = 60.0


def _safe_next(raw: str | None, role: str) -> str:
    if role != auth.ADMIN:
        return url_for("console.playground")
    if raw and raw.startswith("/console/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return url_for("console.functions")


def _login_page(status: int = 200, error: str | None = None) -> Response:
    cookies: dict[str, str] = {}
    token = auth.login_csrf_token(cookies)
    st = state()
    body = render_template("login.html", **ctx(login_csrf=token, error=error, next=request.values.get("next", ""),
                                                 open_playground=auth.in_networks(client(), st.cfg),
                                                 admin_possible=st.cfg.admin_enabled))
    resp = make_response(body, status)
    for k, v in cookies.items():
        resp.set_cookie(k, v, path="/console/", httponly=True, samesite="Strict", secure=request.is_secure)
    return resp


@bp.get("/login")
def login() -> Response:
    s = g.get("console_session")
    if s is not None and s.role == auth.ADMIN:
        return redirect(_safe_next(request.args.get("next"), s.role))  # type: ignore[return-value]
    return _login_page()  # also for a playground session: its owner may hold the admin token


@bp.post("/login")
def login_post() -> Response:
    auth.check_same_origin()
    given = request.form.get("csrf", "")
    expected = request.cookies.get(auth.LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ConsoleError("csrf_failed", "the sign-in form expired: reload the page and try again")
    st = state()
    key = f"login:{client()}"
    wait = st.store.over_limit(key, st.cfg.login_rate, WINDOW_S, count=False)
    if wait:
        resp = _login_page(429, f"Too many failed sign-ins from your address: try again in {int(wait) + 1} s.")
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    role = auth.role_for(st.cfg, request.form.get("secret", ""))
    if role is None:
        st.store.record_attempt(key)
        return _login_page(401, "That token or password is not right.")
    old = request.cookies.get(auth.SECURE_COOKIE) or request.cookies.get(auth.COOKIE)
    if old:
        st.store.end_session(old)  # a new session id at every sign-in: no fixation, no stale playground session
    sid, _ = st.store.create_session(role, client())
    resp = redirect(_safe_next(request.form.get("next"), role))
    auth.set_session_cookie(resp, sid, st.cfg.session_hours * 3600)
    resp.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/console/")
    return resp  # type: ignore[return-value]


@bp.post("/logout")
def logout() -> Response:
    s = g.get("console_session")
    if s is not None:
        auth.check_csrf(s)
        sid = request.cookies.get(auth.SECURE_COOKIE) or request.cookies.get(auth.COOKIE) or ""
        state().store.end_session(sid)
    resp = redirect(url_for("console.login"))
    auth.clear_session_cookie(resp)
    return resp  # type: ignore[return-value]
