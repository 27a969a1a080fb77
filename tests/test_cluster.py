"""Three fnbox boards on one machine (own ports, data, state and uid ranges) on a real redis-server (password,
loopback, append-only) behind a real nginx upstream: async calls, callbacks, retries and dead letters, a
schedule ticking once per period across the boards, deploys applied by every board, kill -9 of a board and a
Redis restart under load without losing an accepted call."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from tests.asynckit import ECHO_FUNCTION, board_uid_base, slow_function, stop_keeping_state, wait_call, wait_for
from tests.conftest import REPO, SHARED, Server
from tests.console_kit import sign_in
from tests.helpers import LoopbackHTTP
from tests.rediskit import RedisServer
from tests.test_async_callbacks import Receiver
from tests.test_nginx import NGINX, Nginx

pytestmark = [pytest.mark.skipif(not NGINX or not shutil.which("redis-server"),
                                 reason="needs nginx and redis-server (ops/setup-system.sh installs them)")]
TOKEN = "cluster-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Crashes while this flag exists; under SHARED, the only host folder a call's file system view shows.
FLAG = os.path.join(SHARED, f"cluster-flaky-{os.getpid()}.flag")
FUNCTIONS = {
    "echo": ECHO_FUNCTION,
    "slow": slow_function(0.3),
    "flaky": f"""
        import os
        FLAG_PATH = {FLAG!r}

        def main(request):
            if os.path.exists(FLAG_PATH):
                os._exit(3)
            return "recovered"
    """,
    "tick": """
        def main(request):
            return request.headers.get("X-Fnbox-Scheduled-Time", "")
    """,
    "probe": """
        import socket

        def main(request):
            try:
                socket.create_connection(("127.0.0.1", int(request.args["port"])), timeout=2).close()
                return "connected"
            except OSError as e:
                return "no route: " + type(e).__name__
    """,
}
FUNCTIONS["netprobe"] = FUNCTIONS["probe"]  # the same probe with network = true (its profile, below)
PROFILES = {"functions.toml": """
    [netprobe]
    network = true

    [flaky]
    retries = 1
    retry_backoff_s = 0.1

    [slow]
    retries = 3
    retry_backoff_s = 0.1

    [tick]
    every = "1s"
"""}


class Cluster:
    def __init__(self) -> None:
        self.redis = RedisServer().start()
        self.receiver = Receiver()
        self.boards: list[Server] = []
        for i in range(3):
            # Own uids, state and data folders per board (the harness gives each server its own state dir).
            env = {"FNBOX_REDIS_URL": self.redis.url, "FNBOX_BOARD": f"b{i + 1}", "FNBOX_ADMIN_TOKEN": TOKEN,
                   "FNBOX_UID_BASE": str(board_uid_base(i)), "FNBOX_ASYNC_CONCURRENCY": "3",
                   "FNBOX_CALLBACK_ALLOW": f"127.0.0.1:{self.receiver.port}"}
            self.boards.append(Server(functions=FUNCTIONS, profiles=PROFILES, env=env, threads=16))
        for b in self.boards:
            b.start()
        # One upstream listing the three boards, rendered by ops/render_nginx.py (max_fails=1 fail_timeout=10s).
        self.nginx = Nginx([f"127.0.0.1:{b.port}" for b in self.boards], self.boards[0].profiles_dir)
        self.nginx.start()
        self.url = f"http://127.0.0.1:{self.nginx.port}"

    def enqueue(self, path: str, retry_s: float = 30, **kw) -> str:
        """Through nginx; a refusal before acceptance (a dead board's 502, a Redis outage's 503) is retried, as a
        client must: only a 202 means the call was accepted."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                r = requests.post(f"{self.url}/async-function/{path}", timeout=30, **kw)
                if r.status_code == 202:
                    return r.json()["call_id"]
                assert r.status_code in (502, 503), r.text
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no board accepted {path} within {retry_s}s")
            time.sleep(0.1)

    def close(self) -> None:
        self.nginx.stop()
        for b in self.boards:
            b.stop()
        self.receiver.close()
        self.redis.cleanup()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def test_async_calls_through_nginx_complete_and_every_board_shows_them(cluster):
    ids = [cluster.enqueue("echo", data=str(i)) for i in range(24)]
    status = requests.get(f"{cluster.url}/calls/{ids[0]}", timeout=10)
    assert status.status_code == 200  # any board answers for any call
    for i, cid in enumerate(ids):
        call = wait_call(cluster.url, cid)
        assert call["status"] == "done" and json.loads(call["result"]["body"])["body"] == str(i)
    # Each board lists the calls of every board, each labelled with the board that accepted and ran it.
    for b in cluster.boards:
        listed = {c["call_id"]: c for c in b.get("/admin/queue?limit=1000", headers=AUTH).json()["calls"]}
        assert set(ids) <= set(listed)
        assert {listed[c]["ran_on"] for c in ids} <= {"b1", "b2", "b3"}
    ran = {wait_call(cluster.url, c)["ran_on"] for c in ids}
    assert len(ran) >= 2, ran  # three executors take jobs from one queue


def test_a_function_cannot_reach_redis(cluster):
    # Default profile: network = false, an empty network namespace.
    r = cluster.boards[0].get(f"/function/probe?port={cluster.redis.port}")
    assert r.status_code == 200 and r.text.startswith("no route"), r.text
    cid = cluster.enqueue(f"probe?port={cluster.redis.port}")
    assert wait_call(cluster.url, cid)["result"]["body"].startswith("no route")


def test_a_function_with_the_network_on_cannot_reach_redis_either(cluster):
    # network = true reaches out, never the host: the egress layer refuses the sandbox uids every local address.
    layer = cluster.boards[0].get("/healthz").json()["sandbox"].get("network_egress", "")
    if not str(layer).startswith("active"):
        pytest.skip(f"network_egress layer not active on this machine: {layer}")
    r = cluster.boards[1].get(f"/function/netprobe?port={cluster.redis.port}")
    assert r.status_code == 200 and r.text.startswith("no route"), r.text


def test_callbacks_are_delivered(cluster):
    cid = cluster.enqueue("echo", data="cb", headers={"X-Callback-Url": f"http://127.0.0.1:{cluster.receiver.port}/x"})
    wait_for(lambda: any(g["body"]["call_id"] == cid for g in cluster.receiver.got), 20, "the callback")
    got = [g for g in cluster.receiver.got if g["body"]["call_id"] == cid]
    assert len(got) == 1 and got[0]["body"]["status"] == "done"
    assert wait_for(lambda: wait_call(cluster.url, cid)["callback"]["state"] == "delivered", 10, "delivered")


def test_retries_dead_letters_and_requeue_across_boards(cluster):
    flags = [FLAG]  # every board's calls see it: SHARED is bound into every call's view
    for f in flags:
        open(f, "w").close()
        os.chmod(f, 0o644)
    cid = cluster.enqueue("flaky")
    call = wait_call(cluster.url, cid)
    assert call["status"] == "failed" and call["attempts"] == 2
    assert [a["outcome"] for a in call["attempt_log"]] == ["crashed", "crashed"]
    failed = cluster.boards[2].get("/admin/queue?state=failed", headers=AUTH).json()["calls"]
    assert cid in [c["call_id"] for c in failed]
    for f in flags:
        os.unlink(f)
    r = cluster.boards[1].request("POST", f"/admin/queue/{cid}/requeue", headers=AUTH)
    assert r.status_code == 200, r.text
    call = wait_call(cluster.url, cid)
    assert call["status"] == "done" and call["result"]["body"] == "recovered"


def test_a_schedule_ticks_once_per_period_across_three_boards(cluster):
    def ticks() -> list[float]:
        calls = cluster.boards[0].get("/admin/queue?limit=1000", headers=AUTH).json()["calls"]
        return sorted(c["scheduled_for"] for c in calls if c["function"] == "tick")

    start = len(ticks())
    wait_for(lambda: len(ticks()) >= start + 5, 30, "five more ticks")
    t = ticks()
    assert len(t) == len(set(t)), t
    assert t == [t[0] + i for i in range(len(t))], t  # one per second, none twice, none skipped


def test_a_deploy_or_rollback_on_one_board_is_served_by_every_board(cluster):
    b1, b2, b3 = cluster.boards

    def serving(text: str) -> bool:
        return all(b.get("/function/fresh").text == text for b in cluster.boards)

    t0 = time.monotonic()
    r = b1.request("PUT", "/admin/functions/fresh", data=b"def main(request):\n    return 'v1'\n", headers=AUTH)
    assert r.status_code == 201, r.text
    wait_for(lambda: serving("v1"), 10, "v1 on every board")
    print(f"deploy served by all boards after {time.monotonic() - t0:.2f} s")
    r = b2.request("PUT", "/admin/functions/fresh", data=b"def main(request):\n    return 'v2'\n", headers=AUTH)
    assert r.status_code == 201, r.text
    wait_for(lambda: serving("v2"), 10, "v2 on every board")
    r = b3.request("POST", "/admin/functions/fresh/rollback", headers=AUTH)
    assert r.status_code == 200, r.text
    wait_for(lambda: serving("v1"), 10, "the rollback on every board")
    r = b1.request("DELETE", "/admin/functions/fresh", headers=AUTH)
    assert r.status_code == 200, r.text
    wait_for(lambda: all(b.get("/function/fresh").status_code == 404 for b in cluster.boards), 10, "deleted")


def fnbox_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(REPO, ".venv", "bin", "fnbox"), "--url", url, *args],
                          env=dict(os.environ, FNBOX_ADMIN_TOKEN=TOKEN), capture_output=True, text=True, timeout=60)


def calls_on_each_board(cluster) -> tuple[dict[str, str], float]:
    """A sync call of echo on each board, and a failing call (probe with port=x: a ValueError) on board 2:
    request id -> board, and a time before them."""
    t0 = time.time()
    rids = {}
    for b in cluster.boards:
        r = b.get("/function/echo")
        assert r.status_code == 200
        rids[r.headers["X-Request-Id"]] = b.env["FNBOX_BOARD"]
    r = cluster.boards[1].get("/function/probe?port=x")
    assert r.status_code == 500 and r.json()["error"] == "function_error"
    rids[r.headers["X-Request-Id"]] = "b2"
    return rids, t0


def rows_of(html: str) -> dict[str, str]:
    """The console's calls table: request id -> the board of its row."""
    out = {}
    for m in re.finditer(r'<tr data-id="\d+" data-board="([^"]+)">(.*?)</tr>', html, re.S):
        out[re.search(r'/console/calls/([^"?]+)', m.group(2)).group(1)] = m.group(1)
    return out


def test_every_boards_calls_in_one_place_api_cli_and_console(cluster):
    """GET /admin/calls, `fnbox logs` and the console of any board list the calls of every board, labelled."""
    rids, t0 = calls_on_each_board(cluster)
    echo = dict(list(rids.items())[:3])
    failing = list(rids)[3]
    doc = cluster.boards[0].get("/admin/calls?function=echo&limit=1000", headers=AUTH).json()
    assert doc["board"] == "b1" and doc["boards"] == ["b1", "b2", "b3"] and doc["unreachable"] == []
    seen = {c["request_id"]: c["board"] for c in doc["calls"] if c["request_id"] in rids}
    assert seen == echo
    times = [c["time"] for c in doc["calls"]]
    assert times == sorted(times, reverse=True)  # newest first across boards
    # The filters work across boards: each board applies them, the rows are merged.
    every = cluster.boards[2].get(f"/admin/calls?since={t0!r}&limit=1000", headers=AUTH).json()["calls"]
    assert {c["request_id"]: c["board"] for c in every if c["function"] in ("echo", "probe")} == rids
    errs = cluster.boards[0].get(f"/admin/calls?errors=1&since={t0!r}", headers=AUTH).json()["calls"]
    assert [(c["request_id"], c["board"], c["outcome"]) for c in errs if c["function"] != "tick"] == \
        [(failing, "b2", "function_error")]
    only3 = cluster.boards[0].get("/admin/calls?function=echo&board=b3&limit=1000", headers=AUTH).json()
    assert {c["board"] for c in only3["calls"]} == {"b3"} and only3["boards"] == ["b3"]
    assert {c["request_id"] for c in only3["calls"]} & set(rids) == {r for r, b in echo.items() if b == "b3"}
    newest = cluster.boards[0].get(f"/admin/calls?function=echo&since={t0!r}&limit=2", headers=AUTH).json()["calls"]
    assert [c["request_id"] for c in newest] == list(echo)[:0:-1]  # boards 3 and 2: the two newest
    old = cluster.boards[0].get("/admin/cluster/calls?function=echo&limit=1000", headers=AUTH).json()
    assert {c["request_id"]: c["board"] for c in old["calls"] if c["request_id"] in rids} == echo

    # fnbox logs: every board by default, each line with its board; --board narrows, --this-board is (--url)'s.
    out = fnbox_cli(cluster.boards[1].url, "logs", "echo", "-n", "1000")
    assert out.returncode == 0, out.stderr
    for rid, board in echo.items():
        line = next(line for line in out.stdout.splitlines() if rid in line)
        assert re.match(rf"^\S+ \S+  {board}  {rid}  ", line), line
    out = fnbox_cli(cluster.boards[1].url, "logs", "probe", "--errors", "--since", "5m")
    assert out.returncode == 0 and failing in out.stdout and "  b2  " in out.stdout, out
    out = fnbox_cli(cluster.boards[1].url, "logs", "echo", "-n", "1000", "--board", "b3")
    assert [r for r in echo if r in out.stdout] == [r for r, b in echo.items() if b == "b3"], out.stdout
    out = fnbox_cli(cluster.boards[1].url, "logs", "echo", "-n", "1000", "--this-board")
    assert [r for r in echo if r in out.stdout] == [r for r, b in echo.items() if b == "b2"], out.stdout
    assert "  b2  " not in out.stdout  # one board's lines, as before
    out = fnbox_cli(cluster.boards[1].url, "logs", "echo", "-n", "1000", "--all-boards")  # accepted, the default
    assert out.returncode == 0 and all(r in out.stdout for r in echo), out

    # The console of board 1: its calls page, a board filter, and a call of board 3 opened from there.
    sess, _ = sign_in(cluster.boards[0], TOKEN)
    page = sess.get(cluster.boards[0].url + "/console/calls?function=echo", timeout=30)
    assert page.status_code == 200
    shown = rows_of(page.text)
    assert {r: shown.get(r) for r in echo} == echo
    assert '<select name="board">' in page.text and "did not answer" not in page.text
    page = sess.get(cluster.boards[0].url + "/console/calls?board=b2", timeout=30).text
    assert set(rows_of(page).values()) == {"b2"} and failing in rows_of(page)
    page = sess.get(cluster.boards[0].url + "/console/calls?outcome=function_error&range=15m", timeout=30).text
    assert rows_of(page) == {failing: "b2"}
    rid3 = next(r for r, b in echo.items() if b == "b3")
    assert f"/console/calls/{rid3}?board=b3" in sess.get(cluster.boards[0].url + "/console/calls", timeout=30).text
    for path in (f"/console/calls/{rid3}?board=b3", f"/console/calls/{rid3}"):
        detail = sess.get(cluster.boards[0].url + path, timeout=30)
        assert detail.status_code == 200, detail.text
        assert 'id="call-board">b3<' in detail.text and 'id="elsewhere"' in detail.text
        assert "GET /function/echo" in detail.text
    detail = sess.get(cluster.boards[0].url + f"/console/calls/{failing}?board=b2", timeout=30).text
    assert "ValueError" in detail and 'id="call-board">b2<' in detail
    assert sess.get(cluster.boards[0].url + f"/console/calls/{rid3}?board=b2", timeout=30).status_code == 404
    assert sess.get(cluster.boards[0].url + f"/console/calls/{rid3}?board=nosuch", timeout=30).status_code == 404
    fn = sess.get(cluster.boards[0].url + "/console/functions/echo", timeout=30).text
    assert all(r in fn for r in echo)  # the function page's recent calls, of every board

    # The live tail of board 1 shows new calls of every board, each with its board.
    with sess.get(cluster.boards[0].url + "/console/api/calls/stream?function=echo", stream=True, timeout=15) as resp:
        lines = resp.iter_lines(decode_unicode=True)
        assert next(lines).startswith("retry:")  # the stream is open: calls from now on are sent
        made = {b.get("/function/echo").headers["X-Request-Id"]: b.env["FNBOX_BOARD"] for b in cluster.boards[::-1]}
        got: dict[str, str] = {}
        deadline = time.monotonic() + 10
        for line in lines:
            if line.startswith("data:"):
                c = json.loads(line[5:])
                got[c["request_id"]] = c["board"]
            if set(made) <= set(got) or time.monotonic() > deadline:
                break
    assert {r: got.get(r) for r in made} == made


def test_a_board_that_does_not_answer_is_named_and_the_others_listed(cluster):
    """A dead board (connection refused), a board that never answers and one that redirects: each is skipped and
    named in `unreachable`; the listing of the others still comes (never a 500, never a followed redirect)."""
    rids, _ = calls_on_each_board(cluster)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does), never answers
    mover = Redirector()
    r = cluster.redis.client()
    now = time.time()
    r.hset("fnbox:boards", mapping={
        "ghost": json.dumps({"url": f"http://127.0.0.1:{silent.getsockname()[1]}", "seen": now}),
        "mover": json.dumps({"url": f"http://127.0.0.1:{mover.port}", "seen": now})})
    victim = cluster.boards[2]
    stop_keeping_state(victim, hard=True)
    try:
        doc = cluster.boards[0].get("/admin/calls?function=echo&limit=1000", headers=AUTH).json()
        down = {u["board"]: u["error"] for u in doc["unreachable"]}
        assert set(down) == {"b3", "ghost", "mover"}, down
        assert "no answer within" in down["ghost"] and "HTTP 302" in down["mover"], down
        assert doc["boards"] == ["b1", "b2"]
        seen = {c["request_id"]: c["board"] for c in doc["calls"] if c["request_id"] in rids}
        assert seen == {rid: b for rid, b in list(rids.items())[:2]}
        assert mover.followed == 0 and mover.asked >= 1
        out = fnbox_cli(cluster.boards[0].url, "logs", "echo", "-n", "1000")
        assert out.returncode == 0 and "board b3 " in out.stderr and "did not answer" in out.stderr, out
        assert all(rid in out.stdout for rid in list(rids)[:2])
        sess, _ = sign_in(cluster.boards[0], TOKEN)
        page = sess.get(cluster.boards[0].url + "/console/calls?function=echo", timeout=30).text
        assert 'id="unreachable-b3"' in page and 'id="unreachable-ghost"' in page
        assert {r: b for r, b in rows_of(page).items() if r in rids} == {rid: b for rid, b in list(rids.items())[:2]}
        detail = sess.get(cluster.boards[0].url + f"/console/calls/{list(rids)[2]}?board=b3", timeout=30)
        assert detail.status_code == 503 and "does not answer" in detail.text
    finally:
        r.hdel("fnbox:boards", "ghost", "mover")
        silent.close()
        mover.close()
        victim.start()


class Redirector(LoopbackHTTP):
    """An HTTP server on 127.0.0.1 answering a 302 to its own /followed, which would answer an empty listing:
    `followed` counts the requests that did follow it."""

    def __init__(self) -> None:
        import http.server

        outer = self
        self.asked = self.followed = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/followed"):
                    outer.followed += 1
                    body = b'{"calls": []}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    outer.asked += 1
                    body = b""
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{outer.port}/followed")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.serve(Handler)


@pytest.mark.timeout(120)
def test_kill_9_of_a_board_under_load_loses_no_accepted_call(cluster):
    victim = cluster.boards[2]
    ids = [cluster.enqueue("slow?s=1") for _ in range(30)]
    wait_for(lambda: any(c["status"] == "running" and c["ran_on"] == "b3"
                         for c in victim.get("/admin/queue?state=running", headers=AUTH).json()["calls"]),
             30, "board 3 running a call")
    stop_keeping_state(victim, hard=True)
    # nginx skips the dead board (passive health checks: max_fails=1 fail_timeout=10s): round robin would send
    # every third request there; once one has failed, none does, so at most one 502 among these (one nginx worker).
    statuses = []
    while len(statuses) < 12:
        r = requests.post(f"{cluster.url}/async-function/slow?s=0.1", timeout=30)
        statuses.append(r.status_code)
        if r.status_code == 202:
            ids.append(r.json()["call_id"])
    assert statuses.count(502) <= 1 and statuses.count(202) >= 11, statuses
    try:
        for cid in ids:
            call = wait_call(cluster.url, cid, timeout=60)
            assert call["status"] == "done", json.dumps(call, indent=1)
    finally:
        victim.start()


@pytest.mark.timeout(120)
def test_redis_restart_under_load_loses_no_accepted_call(cluster):
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            accepted.append(cluster.enqueue("echo", retry_s=60, data="x"))

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: len(accepted) >= 5, 30, "calls accepted")
        cluster.redis.stop()  # SIGTERM: Redis syncs its append-only file and exits
        refused = requests.post(f"{cluster.url}/async-function/echo", timeout=30)
        assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
        cluster.redis.start()
        n = len(accepted)
        wait_for(lambda: len(accepted) >= n + 5, 60, "calls accepted again")
    finally:
        stop.set()
        t.join(90)
    for cid in accepted:
        assert wait_call(cluster.url, cid, timeout=60)["status"] == "done"
    _ = signal
