"""Limits: each runaway call is answered with the right error within its limit plus one second, nothing of it
survives, and the server goes on serving."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.conftest import SLOTS, UID_BASE, Server, assert_nothing_left, server_fixture
from tests.helpers import assert_error, log_line, new_request_id

TIMEOUT_S = 2
MEMORY_MB = 128

FUNCTIONS = {
    "hello": """
        def main(request):
            return 'hello'
    """,
    "loop": """
        def main(request):
            print('ENTERING-THE-LOOP')
            while True:
                pass
    """,
    "sleeper": """
        import time
        def main(request):
            time.sleep(3600)
    """,
    "bigalloc": """
        def main(request):
            block = bytearray(2 * 1024 ** 3)
            return str(len(block))
    """,
    "leak": """
        import time
        def main(request):
            chunks = []
            while True:
                chunks.append(bytearray(1024 * 1024))
                chunks[-1][::4096] = b'x' * 256  # touch every page: RSS grows
                time.sleep(0.003)
    """,
    "exit3": """
        import os
        def main(request):
            os._exit(3)
    """,
    "segv": """
        import ctypes
        def main(request):
            ctypes.string_at(0)
    """,
    # A child that outlives main: started with subprocess, stdout/stderr inherited.
    "spawn": """
        import subprocess
        def main(request):
            p = subprocess.Popen(['sleep', '3600'])
            return {'pid': p.pid}
    """,
    # A classic daemon: double fork + setsid; the grandchild keeps every inherited fd (the result pipe too).
    "dfork": """
        import os, time
        def main(request):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    os.close(w)
                    while True:
                        time.sleep(1)
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            grandchild = int(os.read(r, 32))
            return {'pid': grandchild}
    """,
    "same_name": """
        def main(request):
            return 'this server'
    """,
    # Fits its memory once, not twice: the result frame (header + body) is the second copy, made after main
    # returned, where the runner's prepared out-of-memory frame answers.
    "bigbody": """
        def main(request):
            return b"x" * (80 * 1024 * 1024)
    """,
}

PROFILES = "".join(f"[{name}]\ntimeout_s = {TIMEOUT_S}\nmemory_mb = {MEMORY_MB}\n\n" for name in FUNCTIONS
                   if name not in ("hello", "same_name", "bigbody")) + "[same_name]\nmax_concurrency = 1\n" + \
    f"[bigbody]\ntimeout_s = 10\nmemory_mb = {MEMORY_MB}\nmax_response_kb = 204800\n"


server = server_fixture(functions=FUNCTIONS, profiles={"functions.toml": PROFILES})


def run_limited(server: Server, name: str, rid: str | None = None):
    """Calls `name`, asserts it was answered within its limit plus one second, returns the response."""
    headers = {"X-Request-Id": rid} if rid else {}
    t0 = time.monotonic()
    r = server.get(f"/function/{name}", headers=headers, timeout=TIMEOUT_S + 10)
    elapsed = time.monotonic() - t0
    assert elapsed <= TIMEOUT_S + 1, f"{name} answered after {elapsed:.2f} s"
    return r


def assert_recovered(server: Server) -> None:
    assert_nothing_left(time.time())
    r = server.get("/function/hello")
    assert (r.status_code, r.text) == (200, "hello")


def assert_gone(pid: int, timeout: float = 3.0) -> None:
    """The process `pid` of a sandbox uid no longer exists (or is a zombie about to be reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            p = psutil.Process(pid)
            alive = p.status() != psutil.STATUS_ZOMBIE and UID_BASE <= p.uids().real < UID_BASE + SLOTS
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            return
        assert time.monotonic() < deadline, f"process {pid} survived its call"
        time.sleep(0.05)


@pytest.mark.timeout(20)
def test_infinite_loop_is_timeout(server):
    rid = new_request_id()
    r = run_limited(server, "loop", rid)
    doc = assert_error(r, 504, "timeout", "loop")
    assert str(TIMEOUT_S) in doc["message"]
    assert_recovered(server)
    # What it printed before being killed still reaches the log.
    assert "ENTERING-THE-LOOP" in log_line(server, rid)["output"]


@pytest.mark.timeout(20)
def test_sleep_is_timeout(server):
    r = run_limited(server, "sleeper")
    assert_error(r, 504, "timeout", "sleeper")
    assert_recovered(server)


@pytest.mark.timeout(20)
def test_huge_allocation_is_memory_limit(server):
    r = run_limited(server, "bigalloc")
    assert_error(r, 502, "memory_limit", "bigalloc")
    assert_recovered(server)


@pytest.mark.timeout(30)
def test_a_response_too_big_to_send_is_memory_limit(server):
    doc = assert_error(server.get("/function/bigbody", timeout=20), 502, "memory_limit", "bigbody")
    assert doc["message"].startswith("memory limit reached"), doc
    assert_recovered(server)


@pytest.mark.timeout(20)
def test_slow_leak_is_memory_limit(server):
    rid = new_request_id()
    r = run_limited(server, "leak", rid)
    assert_error(r, 502, "memory_limit", "leak")
    assert_recovered(server)
    rec = log_line(server, rid)
    assert rec["outcome"] == "memory_limit"


@pytest.mark.timeout(20)
def test_os_exit_is_crashed_with_exitcode(server):
    r = run_limited(server, "exit3")
    doc = assert_error(r, 502, "crashed", "exit3")
    assert doc["exitcode"] == 3
    assert_recovered(server)


@pytest.mark.timeout(20)
def test_segfault_is_crashed_with_signal(server):
    r = run_limited(server, "segv")
    doc = assert_error(r, 502, "crashed", "segv")
    assert doc["signal"] == "SIGSEGV"
    assert_recovered(server)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["spawn", "dfork"])
def test_grandchild_is_killed_when_the_call_ends(server, name):
    r = run_limited(server, name)
    assert r.status_code == 200, r.text
    pid = r.json()["pid"]
    assert isinstance(pid, int) and pid > 1
    assert_gone(pid)
    assert_recovered(server)


@pytest.mark.timeout(40)
def test_concurrency_cap_is_per_server_not_per_machine(server, make_server):
    """max_concurrency holds across the workers of one server; another fnbox server on the same machine with a
    function of the same name must not use up this server's places (nor this one its)."""
    other = make_server(functions={"same_name": "import time\ndef main(request):\n    time.sleep(2)\n"
                                                "    return 'other server'\n"},
                        profiles={"functions.toml": "[same_name]\nmax_concurrency = 1\n"})
    other.start()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(other.get, "/function/same_name")
        deadline = time.monotonic() + 5
        while other.get("/healthz").json()["calls_in_flight"] < 1:
            assert time.monotonic() < deadline, "the other server's call never started"
            time.sleep(0.02)
        # The other server's own cap holds...
        assert_error(other.get("/function/same_name"), 503, "busy", "same_name")
        # ...and is not ours.
        r = server.get("/function/same_name")
        assert (r.status_code, r.text) == (200, "this server")
        assert busy.result().text == "other server"
