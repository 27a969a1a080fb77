"""Async calls on the embedded queue (no configuration: SQLite in FNBOX_DATA_DIR), through real servers.

POST /async-function/<name> answers 202 once the call is on disk; GET /calls/<id> follows it to its result;
retries, dead letters and re-queueing; the queue cap; and restarts, graceful or kill -9, with calls queued.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest
import requests

from tests.asynckit import enqueue, start_worker, stop_keeping_state, stop_worker, wait_call, wait_for
from tests.conftest import REPO, SHARED
from tests.helpers import assert_error

TOKEN = "async-test-token"
ECHO = """
    def main(request):
        return {
            "method": request.method, "path": request.path, "subpath": request.view_args.get("subpath"),
            "args": request.args.to_dict(), "body": request.get_data().decode(),
            "trigger": request.headers.get("X-Fnbox-Trigger"), "call_id": request.headers.get("X-Fnbox-Call-Id"),
            "callback": request.headers.get("X-Callback-Url"),
        }
"""
BINARY = """
    def main(request):
        return bytes(range(256)), 201, {"Content-Type": "application/octet-stream", "X-Kind": "bin"}
"""
# Crashes while a flag file exists: the test decides when it starts working. The flag is under SHARED, the
# only host folder a call's file system view shows.
FLAG = os.path.join(SHARED, f"async-flaky-{os.getpid()}.flag")
FLAKY = f"""
    import os

    def main(request):
        if os.path.exists({FLAG!r}):
            os._exit(3)
        return "recovered"
"""
RAISES = """
    def main(request):
        raise ValueError("nope")
"""
SLEEPY = """
    import time

    def main(request):
        time.sleep(float(request.args.get("s", "2")))
        return "slept"
"""
HANGS = """
    import time

    def main(request):
        time.sleep(3600)
"""
# Touches every page it allocates, so its RSS grows until the memory limit ends it.
HOG = """
    import time

    def main(request):
        chunks = []
        while True:
            chunks.append(bytearray(1024 * 1024))
            chunks[-1][::4096] = b"x" * 256
            time.sleep(0.003)
"""
FUNCTIONS = {"echo": ECHO, "binary": BINARY, "flaky": FLAKY, "raises": RAISES, "sleepy": SLEEPY,
             "sleepy_once": SLEEPY, "hangs": HANGS, "hangs_once": HANGS, "hog": HOG}
BACKOFF_S = 1.0  # hangs' and hog's retry_backoff_s: well above the executor's 0.2 s poll of an idle queue
PROFILES = {"functions.toml": """
    [flaky]
    retries = 2
    retry_backoff_s = 0.05

    [raises]
    retries = 3

    [echo]
    max_request_kb = 1

    [sleepy]
    retries = 1
    retry_backoff_s = 0.05

    [hangs]
    timeout_s = 0.5
    retries = 1
    retry_backoff_s = 1.0

    [hangs_once]
    timeout_s = 0.5

    [hog]
    memory_mb = 32
    retries = 1
    retry_backoff_s = 1.0
"""}


def _admin(server, method: str, path: str) -> requests.Response:
    return server.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture
def server(make_server):
    return make_server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": TOKEN}).start()


def test_async_call_runs_like_a_sync_call_and_its_result_is_kept(server):
    r = server.request("POST", "/async-function/echo/a/b?x=1", data=b"hello", headers={"X-Request-Id": "rid-1"})
    assert r.status_code == 202, r.text
    doc = r.json()
    assert set(doc) >= {"call_id", "status_url"} and doc["status"] == "queued"
    assert r.headers["Location"] == doc["status_url"] == f"{server.url}/calls/{doc['call_id']}"
    call = wait_call(server.url, doc["call_id"])
    assert call["status"] == "done" and call["outcome"] == "ok" and call["attempts"] == 1
    assert call["trigger"] == "async" and call["request_id"] == "rid-1"
    assert call["queued_at"] <= call["started_at"] <= call["finished_at"]
    res = call["result"]
    assert res["status"] == 200
    assert dict((k.lower(), v) for k, v in res["headers"])["content-type"] == "application/json"
    seen = json.loads(res["body"])
    # The function sees the request of the sync route: its path, subpath, query, body; plus where it came from.
    assert seen == {"method": "POST", "path": "/function/echo/a/b", "subpath": "a/b", "args": {"x": "1"},
                    "body": "hello", "trigger": "async", "call_id": doc["call_id"], "callback": None}
    # Recorded in the call history with its trigger.
    hist = _admin(server, "GET", "/admin/calls/rid-1").json()
    assert hist["trigger"] == "async" and hist["outcome"] == "ok"
    # A sync call of the same function is recorded as such.
    sync = server.get("/function/echo", headers={"X-Request-Id": "rid-2"})
    assert sync.status_code == 200
    assert _admin(server, "GET", "/admin/calls/rid-2").json()["trigger"] == "sync"


def test_binary_result_is_base64_and_get_is_accepted(server):
    cid = enqueue(server.url, "binary", method="GET")
    res = wait_call(server.url, cid)["result"]
    assert res["status"] == 201 and "body" not in res
    assert base64.b64decode(res["body_base64"]) == bytes(range(256))
    assert ["X-Kind", "bin"] in res["headers"]


def test_refusals_are_those_of_the_sync_route(server):
    for path in ("/async-function/nope", "/async-function/_private", "/async-function/os.path"):
        assert_error(server.request("POST", path), 404, "not_found", path.rsplit("/", 1)[1])
    big = b"x" * 2048  # echo's max_request_kb is 1
    assert_error(server.request("POST", "/async-function/echo", data=big), 413, "request_too_large", "echo")
    sync = server.request("POST", "/function/echo", data=big)
    assert sync.status_code == 413 and sync.json()["error"] == "request_too_large"
    assert_error(server.get("/calls/" + "0" * 32), 404, "not_found", None)
    assert_error(server.get("/calls/../../etc"), 404, "not_found", None)
    assert server.get("/healthz").status_code == 200


def test_function_error_fails_without_retry_and_is_a_dead_letter(server):
    cid = enqueue(server.url, "raises")
    call = wait_call(server.url, cid)
    assert call["status"] == "failed" and call["outcome"] == "function_error" and call["attempts"] == 1
    assert call["result"]["status"] == 500
    assert json.loads(call["result"]["body"])["error"] == "function_error"
    failed = _admin(server, "GET", "/admin/queue?state=failed").json()["calls"]
    assert cid in [c["call_id"] for c in failed]


def test_crashes_are_retried_then_dead_lettered_then_requeued(server):
    flag = FLAG
    with open(flag, "w"):
        os.chmod(flag, 0o644)
    cid = enqueue(server.url, "flaky")
    call = wait_call(server.url, cid)
    assert call["status"] == "failed" and call["outcome"] == "crashed"
    assert call["attempts"] == call["max_attempts"] == 3
    assert [a["outcome"] for a in call["attempt_log"]] == ["crashed"] * 3
    assert call["result"]["status"] == 502
    # Listed by `fnbox calls --failed`, re-queued by `fnbox calls --requeue`.
    env = dict(os.environ, FNBOX_ADMIN_TOKEN=TOKEN)
    cli = [os.path.join(REPO, ".venv", "bin", "fnbox"), "--url", server.url]
    out = subprocess.run([*cli, "calls", "--failed"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert cid in out.stdout and "crashed" in out.stdout and "3/3" in out.stdout
    # Re-queueing a call that has not failed is refused.
    ok = enqueue(server.url, "echo")
    wait_call(server.url, ok)
    assert_error(_admin(server, "POST", f"/admin/queue/{ok}/requeue"), 409, "not_failed", "echo")
    assert_error(_admin(server, "POST", f"/admin/queue/{'f' * 32}/requeue"), 404, "not_found", None)
    os.unlink(flag)
    out = subprocess.run([*cli, "calls", "--requeue", cid], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    call = wait_call(server.url, cid)
    assert call["status"] == "done" and call["result"]["body"] == "recovered"
    assert [a["outcome"] for a in call["attempt_log"]] == ["crashed"] * 3 + ["ok"]
    out = subprocess.run([*cli, "calls", "--failed"], env=env, capture_output=True, text=True, timeout=30)
    assert cid not in out.stdout


@pytest.mark.parametrize("function, outcome, status", [("hangs", "timeout", 504), ("hog", "memory_limit", 502)])
def test_timeouts_and_memory_limits_are_retried_after_the_backoff_then_dead_lettered(server, function, outcome,
                                                                                      status):
    """retries = 1: two attempts, the second not before retry_backoff_s after the first ended, then failed."""
    cid = enqueue(server.url, function)
    call = wait_call(server.url, cid)
    assert call["status"] == "failed" and call["outcome"] == outcome, call
    assert call["attempts"] == call["max_attempts"] == 2
    log = call["attempt_log"]
    assert [(a["attempt"], a["outcome"], a["status"]) for a in log] == [(1, outcome, status), (2, outcome, status)]
    # The recorded times, not the test's clock: the retry was claimed only once its backoff had passed.
    assert log[1]["started_at"] - log[0]["finished_at"] >= BACKOFF_S, log
    assert call["result"]["status"] == status and json.loads(call["result"]["body"])["error"] == outcome
    failed = _admin(server, "GET", "/admin/queue?state=failed").json()["calls"]
    assert cid in [c["call_id"] for c in failed]


def test_without_retries_a_timeout_is_one_attempt(server):
    """retries defaults to 0: a timed out call is failed after its only attempt."""
    cid = enqueue(server.url, "hangs_once")
    call = wait_call(server.url, cid)
    assert call["status"] == "failed" and call["outcome"] == "timeout", call
    assert call["attempts"] == call["max_attempts"] == 1
    assert [a["outcome"] for a in call["attempt_log"]] == ["timeout"]
    assert "next_attempt_at" not in call


def test_admin_queue_endpoints_need_the_token(server):
    assert_error(server.get("/admin/queue"), 401, "unauthorized", None)
    assert_error(server.request("POST", f"/admin/queue/{'a' * 32}/requeue"), 401, "unauthorized", None)
    assert_error(_admin(server, "GET", "/admin/queue?state=bogus"), 400, "bad_request", None)


def test_queue_cap_answers_busy(make_server):
    # Nothing runs queued calls here (FNBOX_ASYNC_CONCURRENCY=0): the queue fills up.
    s = make_server(functions=FUNCTIONS, env={"FNBOX_QUEUE_MAX": "2", "FNBOX_ASYNC_CONCURRENCY": "0"}).start()
    for _ in range(2):
        enqueue(s.url, "echo")
    r = s.request("POST", "/async-function/echo")
    assert_error(r, 503, "busy", "echo")
    assert r.headers["Retry-After"] == "1"
    assert s.get("/function/echo").status_code == 200  # sync calls are not affected


def test_queued_calls_survive_a_restart(make_server):
    s = make_server(functions=FUNCTIONS, env={"FNBOX_ASYNC_CONCURRENCY": "0"}).start()
    ids = [enqueue(s.url, f"echo?i={i}", data=str(i)) for i in range(6)]
    assert all(requests.get(f"{s.url}/calls/{c}", timeout=10).json()["status"] == "queued" for c in ids)
    stop_keeping_state(s)
    s.env["FNBOX_ASYNC_CONCURRENCY"] = "2"
    s.start()
    for i, c in enumerate(ids):
        call = wait_call(s.url, c)
        assert call["status"] == "done", call
        assert json.loads(call["result"]["body"])["body"] == str(i)


@pytest.mark.timeout(90)
def test_kill_9_mid_call_retries_the_call_and_loses_no_queued_call(make_server):
    s = make_server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ASYNC_CONCURRENCY": "1"}).start()
    running = enqueue(s.url, "sleepy?s=6")  # retries = 1; timeout_s 10
    queued = [enqueue(s.url, "echo", data=str(i)) for i in range(3)]
    wait_call(s.url, running, states=("running",))
    stop_keeping_state(s, hard=True)  # the whole server: master, worker, fork server, the call's process
    s.start()
    # The interrupted call was charged one attempt and queued again; it runs to its end this time.
    wait_call(s.url, running, states=("running", "done", "failed"))
    for c in queued:
        assert wait_call(s.url, c)["status"] == "done"
    call = wait_call(s.url, running, timeout=40)
    assert call["status"] == "done" and call["attempts"] == 2, call
    assert call["attempt_log"][0]["outcome"] == "unavailable"


def test_retention_removes_finished_calls(make_server):
    s = make_server(functions=FUNCTIONS, env={"FNBOX_CALLS_RETENTION_S": "1"}).start()
    cid = enqueue(s.url, "echo")
    wait_call(s.url, cid)
    wait_for(lambda: s.get(f"/calls/{cid}").status_code == 404, 20, "the record pruned")


@pytest.mark.timeout(90)
def test_kill_9_of_a_fnbox_worker_mid_call_retries_the_call(make_server):
    """Queued calls run only in a separate `fnbox worker` here; killing it mid-call loses nothing."""
    s = make_server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ASYNC_CONCURRENCY": "0"}).start()
    cid = enqueue(s.url, "sleepy?s=5")  # retries = 1
    first = start_worker(s, "--concurrency", "1", "--no-schedules")
    try:
        wait_call(s.url, cid, states=("running",))
    finally:
        stop_worker(first, hard=True)  # the worker, its fork server and the call's process
    second = start_worker(s, "--concurrency", "1", "--no-schedules")
    try:
        call = wait_call(s.url, cid, timeout=40)
    finally:
        stop_worker(second)
    assert call["status"] == "done" and call["attempts"] == 2, call
    assert [a["outcome"] for a in call["attempt_log"]] == ["unavailable", "ok"]


@pytest.mark.timeout(90)
def test_kill_9_mid_call_with_no_attempt_left_marks_the_call_failed(make_server):
    """retries = 0: the runner killed mid-call leaves no attempt, so the call is failed as interrupted (recovered,
    not left running for ever, and not run again by the worker that is there afterwards)."""
    s = make_server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ASYNC_CONCURRENCY": "0"}).start()
    cid = enqueue(s.url, "sleepy_once?s=5")
    first = start_worker(s, "--concurrency", "1", "--no-schedules")
    try:
        wait_call(s.url, cid, states=("running",))
    finally:
        stop_worker(first, hard=True)
    second = start_worker(s, "--concurrency", "1", "--no-schedules")
    try:
        call = wait_call(s.url, cid, timeout=30)
        later = enqueue(s.url, "echo")  # the second worker runs calls: had the call been queued again, it ran it
        assert wait_call(s.url, later)["status"] == "done"
    finally:
        stop_worker(second)
    assert call["status"] == "failed" and call["outcome"] == "unavailable", call
    assert call["attempts"] == call["max_attempts"] == 1
    assert [(a["outcome"], a["status"]) for a in call["attempt_log"]] == [("unavailable", 503)]
    assert "stopped" in call["message"] and call["result"]["status"] == 503
    assert requests.get(f"{s.url}/calls/{cid}", timeout=10).json() == call  # final: nothing ran it since


@pytest.mark.parametrize("env, reason", [
    ({"FNBOX_REDIS_URL": "redis://127.0.0.1:6379/0"}, "Redis without a password is refused"),
    ({"FNBOX_CALLBACK_ALLOW": "127.0.0.1"}, "must be host:port"),
    ({"FNBOX_QUEUE_MAX": "lots"}, "FNBOX_QUEUE_MAX"),
])
def test_bad_queue_settings_refuse_the_start(make_server, env, reason):
    s = make_server(functions=FUNCTIONS, env=env)
    s.start(wait=False)
    assert s.proc.wait(30) == 3
    assert reason in s.read_log()



@pytest.mark.timeout(90)
def test_a_graceful_stop_lets_a_running_queued_call_finish(make_server):
    s = make_server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ASYNC_CONCURRENCY": "1"}).start()
    cid = enqueue(s.url, "sleepy?s=3")
    wait_call(s.url, cid, states=("running",))
    stop_keeping_state(s)  # SIGTERM: the worker stops claiming and waits for the call
    s.env["FNBOX_ASYNC_CONCURRENCY"] = "0"  # nothing could run it again after the restart
    s.start()
    call = wait_call(s.url, cid, timeout=10)
    assert call["status"] == "done" and call["attempts"] == 1 and call["result"]["body"] == "slept", call
