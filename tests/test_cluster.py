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
import threading
import time

import pytest
import requests

from tests.asynckit import stop_keeping_state, wait_call, wait_for
from tests.conftest import SHARED, Server
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
    "echo": """
        import os

        def main(request):
            return {"body": request.get_data().decode(), "trigger": request.headers.get("X-Fnbox-Trigger")}
    """,
    "slow": """
        import time

        def main(request):
            time.sleep(float(request.args.get("s", "0.3")))
            return "slow done"
    """,
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
PROFILES = {"functions.toml": """
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
            # Own uids per board; the slot locks and cgroups stay machine-wide (one state dir), as one machine's
            # sandbox slots must: two boards on one machine never hold the same slot.
            env = {"FNBOX_REDIS_URL": self.redis.url, "FNBOX_BOARD": f"b{i + 1}", "FNBOX_ADMIN_TOKEN": TOKEN,
                   "FNBOX_UID_BASE": str(64000 + 300 * i), "FNBOX_SANDBOX_SLOTS": "64", "FNBOX_ASYNC_CONCURRENCY": "3",
                   "FNBOX_CALLBACK_ALLOW": f"127.0.0.1:{self.receiver.port}"}
            self.boards.append(Server(functions=FUNCTIONS, profiles=PROFILES, env=env, threads=16))
        for b in self.boards:
            b.start()
        self.nginx = Nginx(f"127.0.0.1:{self.boards[0].port}", self.boards[0].profiles_dir)
        site = os.path.join(self.nginx.dir, "fnbox.conf")
        with open(site) as f:
            text = f.read()
        servers = "\n".join(f"    server 127.0.0.1:{b.port} max_fails=1 fail_timeout=10s;" for b in self.boards)
        text = re.sub(r"^\s*server 127\.0\.0\.1:\d+;", servers, text, count=1, flags=re.M)
        with open(site, "w") as f:
            f.write(text)
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
    # Default profile: network = false, an empty network namespace. (network = true: see docs/cluster.md.)
    r = cluster.boards[0].get(f"/function/probe?port={cluster.redis.port}")
    assert r.status_code == 200 and r.text.startswith("no route"), r.text
    cid = cluster.enqueue(f"probe?port={cluster.redis.port}")
    assert wait_call(cluster.url, cid)["result"]["body"].startswith("no route")


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


def test_history_of_every_board_in_one_place(cluster):
    """`fnbox logs --all-boards` (GET /admin/cluster/calls): sync calls made on each board, labelled."""
    import subprocess

    from tests.conftest import REPO

    rids = {}
    for b in cluster.boards:
        r = b.get("/function/echo")
        assert r.status_code == 200
        rids[r.headers["X-Request-Id"]] = b.env["FNBOX_BOARD"]
    doc = cluster.boards[0].get("/admin/cluster/calls?function=echo&limit=1000", headers=AUTH).json()
    seen = {c["request_id"]: c["board"] for c in doc["calls"] if c["request_id"] in rids}
    assert seen == rids and doc["unreachable"] == []
    out = subprocess.run([os.path.join(REPO, ".venv", "bin", "fnbox"), "--url", cluster.boards[1].url, "logs", "echo",
                          "--all-boards", "-n", "1000"], env=dict(os.environ, FNBOX_ADMIN_TOKEN=TOKEN),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for rid, board in rids.items():
        line = next(line for line in out.stdout.splitlines() if rid in line)
        assert f" {board} " in line and " sync " in line


@pytest.mark.timeout(120)
def test_kill_9_of_a_board_under_load_loses_no_accepted_call(cluster):
    victim = cluster.boards[2]
    ids = [cluster.enqueue("slow?s=1") for _ in range(30)]
    wait_for(lambda: any(c["status"] == "running" and c["ran_on"] == "b3"
                         for c in victim.get("/admin/queue?state=running", headers=AUTH).json()["calls"]),
             30, "board 3 running a call")
    stop_keeping_state(victim, hard=True)
    ids += [cluster.enqueue("slow?s=0.1") for _ in range(12)]  # nginx skips the dead board
    for cid in ids:
        call = wait_call(cluster.url, cid, timeout=60)
        assert call["status"] == "done", call
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
