"""Runs a snippet once, exactly as `fnbox run --profile strict` does: the snippet is written to a private,
world-readable folder of its own, and this worker's fork server runs its main() in a fresh sandboxed child with
the strict profile. No function is created, nothing is recorded in the call history.

Playground runs have their own small concurrency cap (FNBOX_PLAYGROUND_CONCURRENCY), taken before the server's
global cap, so however many friends press Run, the functions keep all the other places.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from werkzeug.test import EnvironBuilder

from gateway.admission import Busy
from gateway.console.config import ConsoleConfig
from gateway.console.errors import ConsoleError
from gateway.errors import STATUS
from runner import outcomes
from runner.supervisor import Invocation, Unavailable

MAX_SOURCE_BYTES = 256 * 1024
NAME = "snippet"
LIMITER_KEY = "_playground"  # not a valid function name: it never shares places with a function


@dataclass(frozen=True)
class RequestSpec:
    method: str
    path: str  # the sub-path after /function/<name>
    query: str
    headers: list[tuple[str, str]]
    body: bytes


def check_source(source: str) -> bytes:
    data = source.encode()
    if len(data) > MAX_SOURCE_BYTES:
        raise ConsoleError("bad_request", f"the snippet is over {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        compile(data, f"{NAME}.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        raise ConsoleError("syntax_error", f"{NAME}.py: {e.msg}", line=e.lineno) from None
    except ValueError as e:
        raise ConsoleError("syntax_error", f"{NAME}.py: {e}", line=None) from None
    return data


def environ_for(spec: RequestSpec, name: str) -> dict[str, str]:
    """The request message fnbox run builds (cli/main.py cmd_run)."""
    path = f"/function/{name}" + ("/" + spec.path.lstrip("/") if spec.path.strip("/") else "")
    environ = EnvironBuilder(path=path, method=spec.method, query_string=spec.query, data=spec.body or None,
                             headers=spec.headers, base_url="http://localhost/").get_environ()
    environ["REMOTE_ADDR"] = "127.0.0.1"
    return {k: v for k, v in environ.items() if isinstance(v, str)}


def run(rt: Any, cfg: ConsoleConfig, source: str, spec: RequestSpec, request_id: str) -> dict[str, Any]:
    data = check_source(source)
    pset = rt.profiles.current()
    profile = pset.profiles.get(cfg.playground_profile)
    if profile is None:
        raise ConsoleError("unavailable", f"the profiles folder has no {cfg.playground_profile!r} profile")
    if len(spec.body) > profile.max_request_kb * 1024:
        raise ConsoleError("bad_request", f"the request body is over the {cfg.playground_profile} profile's "
                                          f"max_request_kb ({profile.max_request_kb} KiB)")
    try:
        ticket = rt.limiter.admit(LIMITER_KEY, cfg.playground_concurrency)
    except Busy as e:
        which = (f"the playground already runs {cfg.playground_concurrency} snippets (FNBOX_PLAYGROUND_CONCURRENCY)"
                 if e.cap == "function" else e.message)
        raise ConsoleError("busy", which + ": try again in a moment") from None
    fdir = tempfile.mkdtemp(prefix="fnbox-play-", dir="/tmp")
    try:
        os.chmod(fdir, 0o755)  # the sandbox uids must read the snippet, and nothing else of ours
        with open(os.path.join(fdir, NAME + ".py"), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(fdir, NAME + ".py"), 0o644)
        open(os.path.join(fdir, "__init__.py"), "w").close()
        try:
            result = rt.supervisor.call(Invocation(NAME, fdir, profile, environ_for(spec, NAME), spec.body,
                                                   request_id))
        except Unavailable as e:
            raise ConsoleError("unavailable", str(e)) from None
        # The run keeps its places until its last process is gone; its CPU and peak memory come with that.
        result.wait_complete(profile.timeout_s + 5)
    finally:
        ticket.release()
        shutil.rmtree(fdir, ignore_errors=True)
    headers = [list(h) for h in result.headers]
    if result.outcome == outcomes.OK:
        status = int(str(result.status or "200").split()[0])
        body = result.body.decode("utf-8", "replace")
    else:  # what a server would answer for this outcome (gateway/errors.py)
        status = STATUS.get(result.outcome, 500)
        err = {"error": result.outcome, "message": result.message or result.outcome, "type": result.error_type}
        if result.outcome == outcomes.CRASHED:
            err.update(exitcode=result.exitcode, signal=result.signal)
        body = json.dumps({k: v for k, v in err.items() if v is not None}, indent=2)
        headers = [["Content-Type", "application/json"]]
    return {
        "outcome": result.outcome, "message": result.message, "status": status, "headers": headers, "body": body,
        "output": result.output.decode("utf-8", "replace"),
        "output_dropped": result.output_dropped, "error_type": result.error_type, "traceback": result.traceback,
        "exitcode": result.exitcode, "signal": result.signal, "wall_ms": round(result.wall_ms, 2),
        "cpu_ms": result.cpu_ms, "max_rss_kb": result.max_rss_kb, "request_id": request_id,
        "limits": {k: getattr(profile, k) for k in ("timeout_s", "cpu_s", "memory_mb", "max_processes")},
        "profile": cfg.playground_profile,
    }
