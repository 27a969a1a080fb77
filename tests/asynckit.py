"""Shared by the async, schedule and cluster tests: waiting for queued calls, restarting a server in place."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import psutil
import requests

from tests.conftest import Server

FINAL = ("done", "failed")
# Functions the queue tests share: one echoes the body and the trigger header; one sleeps ?s= seconds.
ECHO_FUNCTION = """
    def main(request):
        return {"body": request.get_data().decode(), "trigger": request.headers.get("X-Fnbox-Trigger")}
"""


def slow_function(default_s: float) -> str:
    return f"""
    import time

    def main(request):
        time.sleep(float(request.args.get("s", "{default_s:g}")))
        return "slow done"
"""


def board_uid_base(i: int) -> int:
    """Sandbox uids of board i of this test process: apart from every other board, from the harness's own range
    (tests/conftest.py: 400000 + ...) and from other test runs."""
    from tests.conftest import SLOTS

    return 3_000_000 + (os.getpid() % 4096) * SLOTS * 3 + i * SLOTS


def wait_call(url: str, call_id: str, states: tuple[str, ...] = FINAL, timeout: float = 30.0,
              **kw: Any) -> dict[str, Any]:
    """Polls GET /calls/<id> (bounded) until the call is in one of `states`."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/calls/{call_id}", timeout=10, **kw)
            if r.status_code == 200:
                doc = r.json()
                if doc["status"] in states:
                    return doc
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"call {call_id} not {states} after {timeout}s: {doc}")


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"{what} not met after {timeout}s")


def enqueue(url: str, path: str, method: str = "POST", **kw: Any) -> str:
    r = requests.request(method, f"{url}/async-function/{path}", timeout=30, **kw)
    assert r.status_code == 202, r.text
    return r.json()["call_id"]


def stop_keeping_state(s: Server, hard: bool = False) -> None:
    """Stops the server (SIGTERM, or SIGKILL of every process of it with hard=True) and keeps its folders, so
    it can be started again on the same data (the queue, the history)."""
    assert s.proc is not None
    if hard:
        for pid in s.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        s.proc.wait(10)
    else:
        known = s.pids()
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait(5)
        for pid in known:
            wait_for(lambda pid=pid: not _running(pid), 10, f"pid {pid} gone")
    s.log.close()


def start_worker(server: Server, *args: str) -> subprocess.Popen:
    """`fnbox worker` with the server's environment (same queue, functions, profiles), waited for until it says
    it runs; its output goes to a file beside the server's log."""
    from tests.conftest import REPO

    log = open(server.log_path + f".worker-{time.monotonic_ns()}", "w+b")
    # This checkout's code, as the server's Gunicorn (which puts its cwd first): the venv's `fnbox` script alone
    # imports whatever tree the venv was installed from (an editable install of another checkout or worktree).
    path = os.pathsep.join(p for p in (REPO, server.env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "fnbox"), "worker", *args], cwd=REPO,
                            env=dict(server.env, PYTHONPATH=path), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def ready() -> bool:
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
        if proc.poll() is not None:
            raise AssertionError(f"fnbox worker exited with {proc.returncode}: {text}")
        return "fnbox worker: board" in text

    wait_for(ready, 30, "fnbox worker started")
    return proc


def stop_worker(proc: subprocess.Popen, hard: bool = False) -> None:
    """SIGTERM (or SIGKILL of it and every process below it: its fork server, its calls), then wait."""
    if hard:
        try:
            victims = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            victims = []
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
