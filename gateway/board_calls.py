"""The calls of every board in one place (GET /admin/calls, `fnbox logs`, the console): this board's history,
and every other registered board's through its own admin API, each row labelled with its board.

Board-to-board requests go only to the URLs boards registered in Redis (jobs/boards.py), never to an address
taken from a request; they carry the shared admin token as the cluster's other admin requests do, never follow
a redirect, ignore proxy settings and are bounded in time and size. A board that does not answer in time is
left out and named in `unreachable`: a listing never fails because one board is down.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from flask import current_app

from gateway.console.queries import CallFilter, HistoryReader
from gateway.errors import GatewayError
from jobs.config import JobSettings, valid_board

FANOUT_HEADER = "X-Fnbox-Fanout"  # marks a board-to-board request: it is answered from that board alone
MAX_ANSWER = 64 * 1024 * 1024  # 1000 rows of a board, each with up to max_log_kb of output
MAX_LIMIT = 1000


@dataclass(frozen=True)
class CallQuery:
    filter: CallFilter
    limit: int = 50
    board: str | None = None  # one board's calls only
    after: int | None = None  # with board: that board's calls after this row id, oldest first (a live tail)

    @classmethod
    def from_args(cls, args: Any, default_limit: int = 50) -> CallQuery:
        """The query string of GET /admin/calls, checked: a bad value is a 400 `bad_request`."""
        def num(key: str) -> float | None:
            raw = args.get(key)
            if raw in (None, ""):
                return None
            try:
                return float(raw)
            except ValueError:
                raise GatewayError("bad_request", f"{key} must be a unix time in seconds") from None

        function = args.get("function") or None
        if function is not None and not (function.isidentifier() and len(function) <= 64):
            raise GatewayError("bad_request", "function must name a function")
        raw = args.get("limit") or str(default_limit)
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise GatewayError("bad_request", f"limit must be an integer from 1 to {MAX_LIMIT}")
        errors = args.get("errors", "0")
        if errors not in ("0", "1", "true", "false", ""):
            raise GatewayError("bad_request", "errors must be 1 or 0")
        status = args.get("status") or None
        if status is not None and not (status.isdigit() and 100 <= int(status) <= 599):
            raise GatewayError("bad_request", "status must be an HTTP status code (100-599)")
        outcome = args.get("outcome") or None
        if outcome is not None and not (outcome.replace("_", "").isalnum() and len(outcome) <= 64):
            raise GatewayError("bad_request", "outcome must be an outcome name such as ok or function_error")
        board = args.get("board") or None
        if board is not None and not valid_board(board):
            raise GatewayError("bad_request", "board must be a board's name (FNBOX_BOARD)")
        after = args.get("after") or None
        if after is not None and not (after.isdigit() and board):
            raise GatewayError("bad_request", "after must be a row id of the board named by `board`")
        f = CallFilter(function=function, outcome=outcome, status=int(status) if status else None,
                       since=num("since"), until=num("until"), errors=errors in ("1", "true"))
        return cls(f, int(raw), board, int(after) if after else None)

    def params(self, board: str) -> str:
        """This query as another board's GET /admin/calls query string, narrowed to that board."""
        f = self.filter
        d = {"function": f.function, "outcome": f.outcome, "status": f.status,
             "since": repr(f.since) if f.since is not None else None,
             "until": repr(f.until) if f.until is not None else None, "errors": "1" if f.errors else None}
        if self.after is not None:
            d["after"] = str(self.after)
        return urllib.parse.urlencode({**{k: v for k, v in d.items() if v is not None}, "limit": self.limit,
                                       "board": board})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx itself becomes the answer (an error): a board never sends us elsewhere


# No ProxyHandler from the environment: boards talk to each other directly.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


class BoardUnreachable(Exception):
    pass


def fetch(url: str, token: str, timeout: float) -> Any:
    """GET a board's admin URL (one the registry gave): its JSON, or BoardUnreachable saying why."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", FANOUT_HEADER: "1",
                                               "Accept": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            chunks, size = [], 0
            while chunk := resp.read(256 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise BoardUnreachable(f"answer over {MAX_ANSWER >> 20} MiB")
                if time.monotonic() > deadline:
                    raise BoardUnreachable(f"no complete answer within {timeout:g} s")
            return json.loads(b"".join(chunks))
    except urllib.error.HTTPError as e:
        try:
            doc = json.loads(e.read(64 * 1024))
            why = f"{doc.get('error')}: {doc.get('message')}"
        except (ValueError, AttributeError, OSError):
            why = e.reason
        raise BoardUnreachable(f"HTTP {e.code} ({why})"[:300]) from None
    except (OSError, ValueError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise BoardUnreachable(f"no answer within {timeout:g} s") from None
        raise BoardUnreachable(str(reason)[:300] or type(e).__name__) from None


@dataclass(frozen=True)
class Boards:
    me: str
    others: dict[str, str]  # name -> URL
    error: str | None = None  # the registry could not be read: other boards are unknown


def _settings() -> JobSettings:
    return current_app.extensions["fnbox_jobs"].settings


def this_board() -> str:
    """This board's name, without asking the registry."""
    return _settings().board


def boards() -> Boards:
    me = this_board()
    registry = current_app.extensions.get("fnbox_boards")
    if registry is None:
        return Boards(me, {})
    import redis  # here, with a registry only: a board without Redis never loads the client (~3 MB of modules)

    try:
        found = registry.boards()
    except redis.RedisError as e:
        return Boards(me, {}, f"the board registry (Redis) cannot be read: {e}"[:300])
    return Boards(me, {n: u for n, u in found.items() if n != me})


def local_calls(q: CallQuery) -> list[dict[str, Any]]:
    rt = current_app.extensions["fnbox"]
    rt.history.flush(1.0)  # this worker's own records are committed
    reader = HistoryReader(rt.history.path)
    if q.after is not None:
        rows = reader.calls_after(q.filter, q.after, q.limit)
    else:
        rows = reader.calls(q.filter, limit=q.limit, by_time=True)
    for r in rows:
        r.pop("complete", None)
    return rows


def fan_out(urls: dict[str, str], timeout: float) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """GET every URL at once (name -> URL), bounded by `timeout` in all: the answers, and who did not answer."""
    token = current_app.extensions["fnbox"].admin_token
    if not urls:
        return {}, []
    if not token:
        return {}, [{"board": n, "url": u.split("/admin/")[0], "error": "FNBOX_ADMIN_TOKEN is not set on this board"}
                    for n, u in urls.items()]
    pool = ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="fnbox-fanout")
    try:
        futures = {n: pool.submit(fetch, u, token, timeout) for n, u in urls.items()}
        wait(futures.values(), timeout=timeout + 0.5)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    answers, unreachable = {}, []
    for name, fut in futures.items():
        where = urls[name].split("/admin/")[0]
        if not fut.done():
            unreachable.append({"board": name, "url": where, "error": f"no answer within {timeout:g} s"})
        elif fut.exception() is not None:
            unreachable.append({"board": name, "url": where, "error": str(fut.exception())})
        else:
            answers[name] = fut.result()
    return answers, unreachable


def listing(q: CallQuery, fanout: bool = True, b: Boards | None = None, timeout: float | None = None
            ) -> dict[str, Any]:
    """The calls of every board (or of q.board), newest first (with q.after: oldest first), each with its `board`.
    fanout=False: this board's own (what a board answers to another). b, timeout: the boards to ask (default:
    the registry's) and for how long (default FNBOX_BOARD_TIMEOUT_S)."""
    if b is None:
        b = boards() if fanout else Boards(this_board(), {})
    known = [b.me, *sorted(b.others)]
    if q.board is not None and q.board not in known:
        raise GatewayError("not_found", f"no board named {q.board!r} (known: {', '.join(known)})")
    rows: list[dict[str, Any]] = []
    answered = []
    if q.board in (None, b.me):
        rows = [dict(r, board=b.me) for r in local_calls(q)]
        answered.append(b.me)
    targets = {n: f"{u}/admin/calls?{q.params(n)}" for n, u in b.others.items() if q.board in (None, n)}
    answers, unreachable = fan_out(targets, timeout or _settings().board_timeout_s)
    for name, doc in answers.items():
        calls = doc.get("calls") if isinstance(doc, dict) else None
        if not isinstance(calls, list):
            unreachable.append({"board": name, "url": b.others[name], "error": "not an fnbox answer"})
            continue
        rows += [dict(r, board=name) for r in calls if isinstance(r, dict)]
        answered.append(name)
    if q.after is None:
        rows.sort(key=lambda r: (r.get("time") or 0, r.get("id") or 0), reverse=True)
    doc: dict[str, Any] = {"board": b.me, "boards": sorted(answered), "unreachable": unreachable,
                           "calls": rows[: q.limit]}
    if b.error:
        doc["registry_error"] = b.error
    return doc


def find_call(request_id: str, board: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """(board, record) of a call by its request id: on `board` only, else here first, then on every other board.
    The record is what that board's GET /admin/calls/<request_id> answers."""
    b = boards()
    if board is not None and board != b.me and board not in b.others:
        return None
    if board in (None, b.me):
        rec = local_record(request_id)
        if rec is not None or board == b.me:
            return (b.me, rec) if rec is not None else None
    path = f"/admin/calls/{urllib.parse.quote(request_id, safe='')}"
    targets = {n: u + path for n, u in b.others.items() if board in (None, n)}
    answers, unreachable = fan_out(targets, _settings().board_timeout_s)
    for name in sorted(answers):
        if isinstance(answers[name], dict) and answers[name].get("request_id") == request_id:
            return name, answers[name]
    if board is not None and unreachable and not unreachable[0]["error"].startswith("HTTP 404"):
        raise BoardUnreachable(f"board {board} ({unreachable[0]['url']}): {unreachable[0]['error']}")
    return None


def local_record(request_id: str) -> dict[str, Any] | None:
    """This board's record of a call, with the request's headers (redacted) when the console captured them."""
    rt = current_app.extensions["fnbox"]
    rt.history.flush(1.0)
    rec = rt.history.call(request_id)
    if rec is None:
        return None
    console = current_app.extensions.get("fnbox_console")
    if console is not None:
        rec["request"] = console.store.request(request_id)
    return rec
