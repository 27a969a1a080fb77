"""What the console's buttons do: deploy, rollback, invoke, run in the playground, the live tail (SSE)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from typing import Any

from flask import Response, current_app, jsonify, redirect, request, stream_with_context, url_for

from gateway import board_calls
from gateway.console import playground as play
from gateway.console.blueprint import bp, client, rt, state
from gateway.console.errors import ConsoleError
from gateway.console.invoke import METHODS, invoke
from gateway.console.queries import CallFilter
from gateway.deploy import DeployError, valid_name
from runner import outcomes

STREAM_S = 25.0  # one SSE response lasts this long; the browser reconnects at once (Last-Event-ID)
STREAMS_PER_WORKER = 4  # each open stream holds a request thread
REMOTE_EVERY_S = 1.0  # several boards: how often the tail asks the other boards (an HTTP request each)
_streams = threading.BoundedSemaphore(STREAMS_PER_WORKER)
MAX_BODY = 1024 * 1024


def _json() -> dict[str, Any]:
    doc = request.get_json(silent=True)
    if not isinstance(doc, dict):
        raise ConsoleError("bad_request", "the request body must be a JSON object")
    return doc


def _name(name: str) -> str:
    if not valid_name(name):
        raise ConsoleError("invalid_name", f"{name!r} is not a valid function name (a Python identifier not "
                                           "starting with _)")
    return name


def _deploy(name: str, source: Any) -> Any:
    if not isinstance(source, str):
        raise ConsoleError("bad_request", "source must be a string")
    try:
        return rt().store.deploy(_name(name), source.encode())
    except DeployError as e:
        raise ConsoleError(e.code, e.message, **e.extra) from None


@bp.post("/api/functions/<name>/deploy")
def deploy(name: str) -> tuple[Response, int]:
    v = _deploy(name, _json().get("source"))
    return jsonify({"function": name, **v.to_dict(),
                    "url": url_for("console.function", name=name, done="deployed", v=v.version)}), 201


@bp.post("/functions/<name>/rollback")
def rollback(name: str) -> Response:
    raw = request.form.get("version", "")
    if raw and not raw.isdigit():
        raise ConsoleError("bad_request", "version must be a positive integer")
    try:
        v = rt().store.rollback(_name(name), int(raw) if raw else None)
    except DeployError as e:
        raise ConsoleError(e.code, e.message, **e.extra) from None
    return redirect(url_for("console.function", name=name, done="rolledback", v=v.version))  # type: ignore


def _spec(doc: dict[str, Any]) -> play.RequestSpec:
    method = str(doc.get("method") or "GET").upper()
    if method not in METHODS:
        raise ConsoleError("bad_request", f"method must be one of {', '.join(METHODS)}")
    headers: list[tuple[str, str]] = []
    for line in str(doc.get("headers") or "").splitlines():
        if not line.strip():
            continue
        if ":" not in line:
            raise ConsoleError("bad_request", f"a header line is 'Name: value', not {line.strip()!r}")
        k, v = line.split(":", 1)
        if not k.strip() or any(c in k for c in " \t\r\n") or "\r" in v:
            raise ConsoleError("bad_request", f"invalid header name {k.strip()!r}")
        headers.append((k.strip(), v.strip()))
    body = str(doc.get("body") or "")
    kind = doc.get("body_kind") or "raw"
    names = {k.lower() for k, _ in headers}
    if kind == "json" and body.strip():
        try:
            json.loads(body)
        except ValueError as e:
            raise ConsoleError("bad_request", f"the body is not valid JSON: {e}") from None
        if "content-type" not in names:
            headers.append(("Content-Type", "application/json"))
    elif kind == "form" and body.strip():
        pairs = []
        for line in body.splitlines():
            if line.strip():
                k, _, v = line.partition("=")
                pairs.append((k.strip(), v.strip()))
        body = urllib.parse.urlencode(pairs)
        if "content-type" not in names:
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    data = body.encode()
    if len(data) > MAX_BODY:
        raise ConsoleError("bad_request", "the body is over 1 MiB")
    query = str(doc.get("query") or "").lstrip("?")
    return play.RequestSpec(method, str(doc.get("path") or ""), query, headers, data)


@bp.post("/api/functions/<name>/invoke")
def invoke_function(name: str) -> Response:
    spec = _spec(_json())
    return jsonify(invoke(current_app._get_current_object(), rt(), _name(name), spec,  # type: ignore[attr-defined]
                          client()))


@bp.post("/api/playground/run")
def playground_run() -> Response:
    st = state()
    doc = _json()
    wait = st.store.over_limit(f"play:{client()}", st.cfg.playground_rate, 60.0)
    if wait:
        raise ConsoleError("rate_limited", f"at most {st.cfg.playground_rate} runs a minute: try again in "
                                           f"{int(wait) + 1} s", retry_after=int(wait) + 1)
    source = doc.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConsoleError("bad_request", "write a snippet with a main(request) first")
    rid = "play-" + uuid.uuid4().hex[:20]
    return jsonify(play.run(rt(), st.cfg, source, _spec(doc), rid))


@bp.post("/api/playground/save")
def playground_save() -> tuple[Response, int]:
    doc = _json()
    name = str(doc.get("name") or "")
    v = _deploy(name, doc.get("source"))
    return jsonify({"function": name, **v.to_dict(), "url": url_for("console.function", name=name)}), 201


def call_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("id", "time", "request_id", "function", "version", "method", "path", "status",
                                  "outcome", "duration_ms", "cpu_ms", "max_rss_kb", "trigger", "board")}


def _cursors(raw: str, me: str) -> dict[str, int]:
    """The tail's position: `12` (this board's row id, one board) or `b1:12,b2:40` (several boards)."""
    if raw.isdigit():
        return {me: int(raw)}
    out = {}
    for part in raw.split(","):
        name, _, n = part.rpartition(":")
        if name and n.isdigit():
            out[name] = int(n)
    return out


def _event_id(cursors: dict[str, int], me: str) -> str:
    return str(cursors[me]) if list(cursors) == [me] else ",".join(f"{n}:{i}" for n, i in sorted(cursors.items()))


def _remote_tail(b: board_calls.Boards, f: CallFilter, cursors: dict[str, int]) -> list[dict[str, Any]]:
    """New calls of the other boards since their cursors (which are moved on); a board that does not answer
    within a second is asked again next time. A board without a cursor yet gets one: its newest row now."""
    def url(name: str) -> str:
        if name in cursors:
            return f"{b.others[name]}/admin/calls?{board_calls.CallQuery(f, 100, name, cursors[name]).params(name)}"
        return f"{b.others[name]}/admin/calls?" + urllib.parse.urlencode({"board": name, "limit": 1})

    answers, _ = board_calls.fan_out({n: url(n) for n in b.others}, 1.0)
    rows = []
    for name, doc in answers.items():
        calls = [c for c in doc.get("calls", []) if isinstance(c, dict) and isinstance(c.get("id"), int)]
        if name not in cursors:
            cursors[name] = calls[0]["id"] if calls else 0
            continue
        for c in calls:
            cursors[name] = max(cursors[name], c["id"])
            rows.append(dict(c, board=name))
    return rows


@bp.get("/api/calls/stream")
def calls_stream() -> Response:
    """Server-Sent Events: every new call matching the filters, oldest first, as it is recorded."""
    st = state()
    status = request.args.get("status", "")
    outcome = request.args.get("outcome") or None
    if (status and not status.isdigit()) or (outcome and outcome not in outcomes.ALL):
        raise ConsoleError("bad_request", "bad status or outcome filter")
    f = CallFilter(function=request.args.get("function") or None, outcome=outcome,
                   status=int(status) if status else None)
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or ""
    b = board_calls.boards()
    board = request.args.get("board") or None  # the page's board filter
    local = board in (None, b.me)
    b = board_calls.Boards(b.me, {n: u for n, u in b.others.items() if board in (None, n)})
    cursors = {n: i for n, i in _cursors(raw, b.me).items() if n == b.me or n in b.others}
    cursors.setdefault(b.me, st.reader.last_id())
    if not _streams.acquire(blocking=False):
        raise ConsoleError("busy", "too many live tails are open on this worker; close one")
    if any(n not in cursors for n in b.others):
        try:
            _remote_tail(b, f, cursors)  # before the stream opens: the other boards' calls from now on are sent
        except BaseException:
            _streams.release()
            raise

    def events():
        try:
            yield "retry: 1000\n\n"
            end = time.monotonic() + STREAM_S
            quiet = time.monotonic()
            remote_at = 0.0
            while time.monotonic() < end:
                rows = [dict(r, board=b.me) for r in st.reader.calls_after(f, cursors[b.me])] if local else []
                if rows:
                    cursors[b.me] = rows[-1]["id"]
                if b.others and time.monotonic() >= remote_at:  # other boards: over HTTP, less often
                    rows += _remote_tail(b, f, cursors)
                    remote_at = time.monotonic() + REMOTE_EVERY_S
                for r in sorted(rows, key=lambda r: r.get("time") or 0):
                    yield f"id: {_event_id(cursors, b.me)}\nevent: call\ndata: {json.dumps(call_summary(r))}\n\n"
                if rows:
                    quiet = time.monotonic()
                elif time.monotonic() - quiet > 5:  # under any proxy_read_timeout nginx is given
                    yield ": keep-alive\n\n"
                    quiet = time.monotonic()
                time.sleep(0.3)  # polling the database; a call's row is committed before it is answered
        finally:
            _streams.release()

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
