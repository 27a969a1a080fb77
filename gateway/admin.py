"""The admin API: deploy, versions, rollback, delete, listing and call history.

Registered only when FNBOX_ADMIN_TOKEN is set (otherwise every /admin/... path is a plain 404). Every call
needs `Authorization: Bearer <token>`, compared in constant time.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import sqlite3
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from gateway import board_calls, openapi
from gateway.deploy import MAX_NAME, DeployError, valid_name
from gateway.errors import GatewayError, error_response
from gateway.routes import function_exists
from runner import deps
from runner.profiles import Profile, function_names

bp = Blueprint("admin", __name__, url_prefix="/admin")
MAX_DEPLOY_BYTES = 20 * 1024 * 1024
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
MASK = "***"


@bp.before_request
def _authenticate() -> None:
    if request.endpoint == "admin.openapi_document":
        return  # the API's description holds no secret
    token = current_app.extensions["fnbox"].admin_token
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise GatewayError("unauthorized", "a valid `Authorization: Bearer <token>` header is required")


def _rt():
    return current_app.extensions["fnbox"]


def _check_name(name: str) -> None:
    g.function = name if len(name) <= MAX_NAME else None
    if not valid_name(name):
        shown = name if len(name) <= MAX_NAME else name[:MAX_NAME] + "..."
        raise GatewayError("invalid_name", f"{shown!r} is not a valid function name: a Python identifier of at "
                           f"most {MAX_NAME} characters, not starting with _ (e.g. my_func, not my-func)")


def _deploy_error(e: DeployError) -> GatewayError:
    return GatewayError(e.code, e.message, **e.extra)


@bp.get("/openapi.json")
def openapi_document() -> Response:
    return jsonify(openapi.document())


@bp.put("/functions/<name>")
def deploy(name: str) -> tuple[Response, int]:
    _check_name(name)
    if request.content_length is not None and request.content_length > MAX_DEPLOY_BYTES:
        raise GatewayError("request_too_large", "a deploy is at most 20 MiB")
    data = request.stream.read(MAX_DEPLOY_BYTES + 1)
    if len(data) > MAX_DEPLOY_BYTES:
        raise GatewayError("request_too_large", "a deploy is at most 20 MiB")
    try:
        version = _rt().store.deploy(name, data)
    except DeployError as e:
        raise _deploy_error(e) from None
    return jsonify({"function": name, **version.to_dict()}), 201


@bp.get("/functions/<name>/versions")
def versions(name: str) -> Response:
    _check_name(name)
    store = _rt().store
    store.sync(name)
    vs = store.versions(name)
    if not vs:
        raise GatewayError("not_found", f"{name!r} has no deployed versions (a function placed in the functions "
                           "folder by hand has none until `fnbox deploy`)")
    return jsonify({"function": name, "current": store.current(name), "versions": [v.to_dict() for v in vs]})


@bp.post("/functions/<name>/rollback")
def rollback(name: str) -> Response:
    _check_name(name)
    raw = request.args.get("version")
    if raw is not None and not raw.isdigit():
        raise GatewayError("bad_request", "version must be a positive integer")
    try:
        v = _rt().store.rollback(name, int(raw) if raw else None)
    except DeployError as e:
        raise _deploy_error(e) from None
    return jsonify({"function": name, "current": v.version, **v.to_dict()})


@bp.delete("/functions/<name>")
def delete(name: str) -> Response:
    _check_name(name)
    found, kept = _rt().store.delete(name)
    if not found:
        raise GatewayError("not_found", f"no function named {name!r}")
    body: dict[str, Any] = {"function": name, "deleted": True}
    if kept is not None:
        body["kept_version"] = kept  # it was not a version yet: `rollback --version` brings it back
    return jsonify(body)


def masked_limits(profile: Profile) -> dict[str, Any]:
    """A profile's limits for the API: `[env]` values are secrets (tokens, passwords), so only their names show."""
    d = profile.to_dict()
    d["env"] = {k: MASK for k in d["env"]}
    return d


@bp.get("/functions")
def listing() -> Response:
    rt = _rt()
    rt.history.flush(1.0)
    counts = rt.history.counts()
    pset = rt.profiles.current()
    out = []
    for name in function_names(rt.settings.functions_dir):
        rt.store.sync(name)
        vs = {v.version: v for v in rt.store.versions(name)}
        cur = rt.store.current(name)
        c = counts.get(name, {})
        out.append({"name": name, "version": cur,
                    "deployed_at": vs[cur].to_dict()["deployed"] if cur in vs else None,
                    "origin": vs[cur].origin if cur in vs else None,
                    "limits": masked_limits(pset.for_function(name)), "calls": sum(c.values()),
                    "errors": sum(n for k, n in c.items() if k != "ok"), "calls_by_outcome": c})
    return jsonify({"functions": out})


@bp.get("/functions/<name>/calls")
def calls(name: str) -> Response:
    _check_name(name)
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise GatewayError("bad_request", "limit must be an integer from 1 to 1000")
    errors = request.args.get("errors", "0")
    if errors not in ("0", "1", "true", "false"):
        raise GatewayError("bad_request", "errors must be 1 or 0")
    since = None
    if "since" in request.args:
        try:
            since = float(request.args["since"])
        except ValueError:
            raise GatewayError("bad_request", "since must be a unix time in seconds") from None
    rt = _rt()
    rt.history.flush(1.0)
    rows = rt.history.calls(name, int(raw), request.args.get("outcome"), errors in ("1", "true"), since)
    if not rows:
        _known_function(name)
    return jsonify({"function": name, "calls": rows})


def _known_function(name: str) -> None:
    """A name with no calls listed: a 404 unless it is a function, or was one (versions, history)."""
    rt = _rt()
    if not (function_exists(rt.settings.functions_dir, name) or rt.store.versions(name) or rt.history.known(name)):
        raise GatewayError("not_found", f"no function named {name!r} (and no call of one in the history)")


@bp.get("/calls")
def every_board_calls() -> Response:
    return jsonify(every_board_doc())


def every_board_doc() -> dict[str, Any]:
    """The recent calls of every board (several boards: docs/cluster.md), newest first, each labelled with its
    `board`; boards that did not answer in time are named in `unreachable`. A board asked by another board
    (FANOUT_HEADER) answers with its own calls only."""
    q = board_calls.CallQuery.from_args(request.args)
    fanout = board_calls.FANOUT_HEADER not in request.headers
    if q.filter.function:
        g.function = q.filter.function
    doc = board_calls.listing(q, fanout)
    if fanout and q.filter.function and not doc["calls"] and not doc["unreachable"]:
        _known_function(q.filter.function)
    return doc


@bp.get("/calls/<request_id>")
def call(request_id: str) -> Response:
    """This board's record of one call (with its request's redacted headers when the console kept them)."""
    rec = board_calls.local_record(request_id)
    if rec is None:
        raise GatewayError("not_found", f"no call with request id {request_id!r}")
    return jsonify(rec)


# -- dependencies ----------------------------------------------------------------------------------------------
MAX_REQUIREMENTS_BYTES = 64 * 1024


def _deps_state() -> dict[str, Any]:
    rt = _rt()
    req = os.path.join(rt.settings.functions_dir, deps.REQUIREMENTS)
    try:
        with open(req, encoding="utf-8") as f:
            text: str | None = f.read()
    except FileNotFoundError:
        text = None
    return {"requirements": text, "installed": deps.installed(rt.settings.data_dir),
            "path": deps.site_packages(rt.settings.data_dir)}


@bp.get("/deps")
def deps_show() -> Response:
    return jsonify(_deps_state())


def _install(req: str) -> str:
    rt = _rt()
    os.makedirs(os.path.join(rt.settings.data_dir, "deps"), mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(rt.settings.data_dir, "deps", ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one pip at a time, across workers
        return deps.install(req, rt.settings.data_dir)
    finally:
        os.close(fd)


@bp.put("/deps")
def deps_deploy() -> Response:
    """Deploys the functions folder's requirements.txt and installs it; a failed install changes nothing."""
    if request.content_length is not None and request.content_length > MAX_REQUIREMENTS_BYTES:
        raise GatewayError("request_too_large", "a requirements.txt is at most 64 KiB")
    data = request.stream.read(MAX_REQUIREMENTS_BYTES + 1)
    if len(data) > MAX_REQUIREMENTS_BYTES:
        raise GatewayError("request_too_large", "a requirements.txt is at most 64 KiB")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError("bad_request", "a requirements.txt is UTF-8 text") from None
    functions_dir = _rt().settings.functions_dir
    req = os.path.join(functions_dir, deps.REQUIREMENTS)
    tmp = os.path.join(functions_dir, f".{deps.REQUIREMENTS}.deploy")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    try:
        output = _install(tmp)
    except deps.DepsError as e:
        os.unlink(tmp)
        raise GatewayError("deps_failed", f"{e}; the installed packages did not change",
                           output=e.output[-4000:]) from None
    os.replace(tmp, req)
    return jsonify({**_deps_state(), "output": output[-4000:]})


@bp.post("/deps/install")
def deps_reinstall() -> Response:
    req = os.path.join(_rt().settings.functions_dir, deps.REQUIREMENTS)
    if not os.path.isfile(req):
        raise GatewayError("not_found", f"there is no {deps.REQUIREMENTS} in the functions folder: deploy one "
                           "with `fnbox deps install requirements.txt`")
    try:
        output = _install(req)
    except deps.DepsError as e:
        raise GatewayError("deps_failed", f"{e}; the installed packages did not change",
                           output=e.output[-4000:]) from None
    return jsonify({**_deps_state(), "output": output[-4000:]})


@bp.errorhandler(sqlite3.Error)
def _history_error(e: sqlite3.Error) -> Response:
    # A locked or broken history database: a clear 503, not an internal error.
    return error_response("unavailable", f"the call history cannot be read right now: {e}",
                          function=g.get("function"), request_id=g.get("request_id") or "")


@bp.after_request
def _no_store(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    return resp
