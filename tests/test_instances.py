"""Warm instances (`reuse_calls = N`), through a real server: module state survives between calls of one function,
version and profile, and nothing survives a deploy, a profile edit, a limit breach or `idle_s`; two functions
never share a process. One Gunicorn worker, so consecutive calls reach the same fork server."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.conftest import Server, dedent

TOKEN = "reuse-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Counts its calls in a module global and says which process it is; `sleep`, `cpu`, `exit`, `thread` and `raise`
# make one call misbehave on purpose.
COUNTER = """
import os, socket, threading, time

VERSION = {version!r}
CALLS = 0

def main(request):
    global CALLS
    CALLS += 1
    a = request.args
    if "sleep" in a:
        time.sleep(float(a["sleep"]))
    if "cpu" in a:
        end = time.process_time() + float(a["cpu"])
        while time.process_time() < end:
            pass
    if "hoard" in a:
        globals().setdefault("HOARD", []).append(bytearray(int(a["hoard"]) << 20))
    if "exit" in a:
        os._exit(3)
    if "raise" in a:
        raise ValueError("on purpose")
    if a.get("fds") == "close":  # the instance's own control socket (4) and /dev/null (5)
        os.close(4)
        os.close(5)
    if a.get("fds") == "replace":  # a socket of its own where the control socket was
        globals()["MINE"] = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.dup2(MINE[0].fileno(), 4)
    if "thread" in a:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return {{"calls": CALLS, "pid": os.getpid(), "version": VERSION, "fn": __name__}}
"""


def counter(version: str = "v1") -> str:
    return COUNTER.format(version=version)


PROFILES = {"functions.toml": dedent("""
    [count]
    reuse_calls = 50
    idle_s = 30
    timeout_s = 2
    cpu_s = 1
    memory_mb = 64

    [other]
    reuse_calls = 50
    idle_s = 30

    [cpu]
    reuse_calls = 50
    timeout_s = 30
    cpu_s = 1

    [fresh]
    timeout_s = 5

    [fds]
    reuse_calls = 50
    idle_s = 60
    timeout_s = 60
""")}


@pytest.fixture(scope="module")
def srv():
    s = Server(functions={"count": counter(), "other": counter("other"), "fresh": counter(), "cpu": counter(),
                          "fds": counter()},
               profiles=PROFILES,
               workers=1, env={"FNBOX_ADMIN_TOKEN": TOKEN})
    try:
        s.start()
        yield s
    finally:
        s.stop()


def call(srv: Server, name: str = "count", **params) -> dict:
    r = srv.get(f"/function/{name}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def fresh_instance(srv: Server, name: str = "count") -> dict:
    """Makes sure the next call starts a new instance (a breach ends the current one), and returns its first."""
    srv.get(f"/function/{name}", params={"exit": 1})
    first = call(srv, name)
    assert first["calls"] == 1, first
    return first


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_module_state_survives_between_calls_of_one_function(srv):
    first = fresh_instance(srv)
    for n in range(2, 6):
        doc = call(srv)
        assert doc["calls"] == n and doc["pid"] == first["pid"], doc


def test_without_reuse_every_call_is_a_fresh_process(srv):
    docs = [call(srv, "fresh") for _ in range(3)]
    assert [d["calls"] for d in docs] == [1, 1, 1]
    assert len({d["pid"] for d in docs}) == 3


def test_two_functions_never_share_a_process(srv):
    a, b = fresh_instance(srv, "count"), fresh_instance(srv, "other")
    for _ in range(3):
        da, db = call(srv, "count"), call(srv, "other")
        assert da["pid"] == a["pid"] and db["pid"] == b["pid"] and da["pid"] != db["pid"]
        assert (da["fn"], db["fn"]) == ("functions.count", "functions.other")
    assert (da["calls"], db["calls"]) == (4, 4)


def test_each_call_has_its_own_deadline(srv):
    """timeout_s = 2 per call: three calls sleeping 1 s in one process are all fine (a deadline for the
    instance's whole life would have stopped them)."""
    first = fresh_instance(srv)
    for n in range(2, 5):
        doc = call(srv, sleep=1)
        assert doc["calls"] == n and doc["pid"] == first["pid"], doc


def test_each_call_has_its_own_cpu_limit(srv):
    """cpu_s = 1 per call (and a wall clock long enough for a loaded machine): three calls using 0.5 s of CPU in
    one process are all fine; one call using more than 1 s is a CPU timeout and ends the instance."""
    first = fresh_instance(srv, "cpu")
    for n in range(2, 5):
        doc = call(srv, "cpu", cpu=0.5)
        assert doc["calls"] == n and doc["pid"] == first["pid"], doc
    r = srv.get("/function/cpu", params={"cpu": 1.5})
    assert r.status_code == 504 and r.json()["message"].startswith("CPU time limit of 1 s exceeded"), r.text
    assert gone(first["pid"])
    assert call(srv, "cpu")["calls"] == 1


@pytest.mark.parametrize("params, status, error", [
    ({"sleep": 3}, 504, "timeout"),
    ({"hoard": 200}, 502, "memory_limit"),
    ({"exit": 1}, 502, "crashed"),
    ({"raise": 1}, 500, "function_error"),
])
def test_a_breach_or_an_error_ends_the_instance(srv, params, status, error):
    first = fresh_instance(srv)
    assert call(srv)["calls"] == 2
    r = srv.get("/function/count", params=params)
    assert r.status_code == status and r.json()["error"] == error, r.text
    assert gone(first["pid"])
    doc = call(srv)
    assert doc["calls"] == 1 and doc["pid"] != first["pid"], doc


def test_a_call_that_leaves_a_thread_behind_ends_the_instance(srv):
    first = fresh_instance(srv)
    assert call(srv, thread=1)["calls"] == 2  # answered normally, but its thread would run on into later calls
    assert gone(first["pid"])
    assert call(srv)["calls"] == 1


@pytest.mark.parametrize("fds", ["close", "replace"])
def test_a_call_that_closes_or_replaces_the_instances_fds_is_answered_and_ends_it(srv, fds):
    """Its answer stands (every time: no race between the answer and the instance's exit), and the instance ends
    at once rather than waiting for the call's 60 s deadline on a socket that is no longer the fork server's."""
    for _ in range(5):
        first = fresh_instance(srv, "fds")
        doc = call(srv, "fds", fds=fds)
        assert doc["calls"] == 2 and doc["pid"] == first["pid"], doc
        assert gone(first["pid"])
        assert call(srv, "fds")["calls"] == 1


def test_a_file_replace_starts_a_new_instance(srv):
    first = fresh_instance(srv)
    assert call(srv)["calls"] == 2
    srv.write_function("count", counter("v2"))
    doc = call(srv)
    assert doc == {"calls": 1, "pid": doc["pid"], "version": "v2", "fn": "functions.count"}
    assert doc["pid"] != first["pid"] and gone(first["pid"])  # the old version's idle instance is ended at once
    srv.write_function("count", counter())


def test_a_deploy_through_the_admin_api_starts_a_new_instance(srv):
    first = fresh_instance(srv)
    assert call(srv)["calls"] == 2
    r = srv.request("PUT", "/admin/functions/count", data=counter("deployed").encode(), headers=AUTH)
    assert r.status_code == 201, r.text
    doc = call(srv)
    assert (doc["calls"], doc["version"]) == (1, "deployed") and doc["pid"] != first["pid"], doc
    assert call(srv)["calls"] == 2


def test_a_profile_edit_starts_a_new_instance(srv):
    first = fresh_instance(srv)
    assert call(srv)["calls"] == 2
    srv.write_profile("functions.toml", PROFILES["functions.toml"].replace("memory_mb = 64", "memory_mb = 65"))
    try:
        doc = call(srv)
        assert doc["calls"] == 1 and doc["pid"] != first["pid"], doc
        assert gone(first["pid"])
    finally:
        srv.write_profile("functions.toml", PROFILES["functions.toml"])


def test_an_env_edit_starts_a_new_instance(srv):
    first = fresh_instance(srv, "other")
    srv.write_profile("functions.toml", PROFILES["functions.toml"] + '\n[other.env]\nTOKEN = "b"\n')
    try:
        doc = call(srv, "other")
        assert doc["calls"] == 1 and doc["pid"] != first["pid"], doc
    finally:
        srv.write_profile("functions.toml", PROFILES["functions.toml"])


def test_an_idle_instance_ends_after_idle_s(make_server):
    s = make_server(functions={"count": counter()}, workers=1,
                    profiles={"functions.toml": "[count]\nreuse_calls = 50\nidle_s = 2\n"}).start()
    first = call(s)
    assert call(s)["calls"] == 2  # (within 2 s of the first, even on a loaded machine)
    assert gone(first["pid"], timeout=20)  # no call for idle_s: the fork server ends it by itself
    doc = call(s)
    assert doc["calls"] == 1 and doc["pid"] != first["pid"], doc


def test_an_instance_serves_at_most_reuse_calls(make_server):
    s = make_server(functions={"count": counter()}, workers=1,
                    profiles={"functions.toml": "[count]\nreuse_calls = 3\n"}).start()
    docs = [call(s) for _ in range(7)]
    assert [d["calls"] for d in docs] == [1, 2, 3, 1, 2, 3, 1]
    assert len({d["pid"] for d in docs}) == 3


def test_concurrent_calls_on_two_workers_all_answer_from_few_processes(make_server):
    from concurrent.futures import ThreadPoolExecutor

    s = make_server(functions={"count": counter()}, workers=2, threads=16,
                    profiles={"functions.toml": "[count]\nreuse_calls = 1000\n"}).start()
    with ThreadPoolExecutor(8) as pool:
        docs = list(pool.map(lambda _: call(s), range(80)))
    pids = {d["pid"] for d in docs}
    assert len(pids) <= 16, len(pids)  # at most one instance per call in flight per worker, kept warm
    assert max(d["calls"] for d in docs) >= 5  # and reused
