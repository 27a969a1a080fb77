"""Who is using the console: sign-in, server-side sessions, CSRF, roles, the client's address.

Two roles: "admin" (every page; the admin token or the console password) and "playground" (the playground
alone; the playground token, or a client inside FNBOX_PLAYGROUND_ALLOW).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlsplit

from flask import Request, Response, g, request

from gateway.console.config import ConsoleConfig
from gateway.console.errors import ConsoleError
from gateway.console.store import ConsoleStore, Session

COOKIE = "fnbox_console"
SECURE_COOKIE = "__Host-fnbox_console"  # the browser only accepts it Secure, for this host, on path /
LOGIN_CSRF_COOKIE = "fnbox_console_login"
ADMIN, PLAYGROUND = "admin", "playground"


def client_ip(req: Request, trusted_proxies: frozenset[str]) -> str:
    """The client's address; behind a trusted proxy (nginx on this host), the last X-Forwarded-For entry."""
    addr = req.environ.get("REMOTE_ADDR") or "?"
    if addr in trusted_proxies:
        forwarded = req.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded:
            return forwarded
    return addr


def in_networks(ip: str, cfg: ConsoleConfig) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in cfg.playground_allow)


def cookie_name() -> str:
    return SECURE_COOKIE if request.is_secure else COOKIE


def current_session(store: ConsoleStore) -> Session | None:
    sid = request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE) or ""
    return store.session(sid)


def role_for(cfg: ConsoleConfig, secret: str) -> str | None:
    """Which role a typed secret signs in to; every comparison runs, in constant time."""
    given = secret.encode()
    admin = any([hmac.compare_digest(given, t.encode()) for t in (cfg.admin_token, cfg.password) if t])
    play = bool(cfg.playground_token) and hmac.compare_digest(given, (cfg.playground_token or "").encode())
    if admin:
        return ADMIN
    return PLAYGROUND if play else None


def set_session_cookie(resp: Response, sid: str, max_age: int) -> None:
    resp.set_cookie(cookie_name(), sid, max_age=max_age, path="/", httponly=True, samesite="Strict",
                    secure=request.is_secure)


def clear_session_cookie(resp: Response) -> None:
    for name in (COOKIE, SECURE_COOKIE):
        if name in request.cookies:
            resp.delete_cookie(name, path="/", httponly=True, samesite="Strict", secure=name == SECURE_COOKIE)


def login_csrf_token(resp_cookies: dict[str, str]) -> str:
    """The login form's CSRF token (no session yet): double-submit, a cookie and a form field that must match."""
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    if len(token) < 20:
        token = secrets.token_urlsafe(24)
        resp_cookies[LOGIN_CSRF_COOKIE] = token
    return token


def check_same_origin() -> None:
    """A state-changing request from another site's page is refused even before the token is looked at."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        o = urlsplit(origin)
        if (o.scheme, o.netloc) != (request.scheme, request.host):
            raise ConsoleError("csrf_failed", "cross-origin request refused")


def check_csrf(session: Session | None) -> None:
    check_same_origin()
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf", "")
    expected = session.csrf if session else ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ConsoleError("csrf_failed", "missing or wrong CSRF token: reload the page and try again")


def require(role: str) -> Session:
    s: Session | None = g.get("console_session")
    if s is None:
        raise ConsoleError("unauthorized", "sign in first")
    if role == ADMIN and s.role != ADMIN:
        raise ConsoleError("forbidden", "this session may use the playground only")
    return s
