"""One board on a real redis-server (RQ) whose queued calls are run only by `fnbox worker` processes: the worker
runs what the board queued; jobs fnbox did not write (pickled, naming another function, unreadable) are dropped
and never executed; and kill -9 of the worker mid-call under load loses no accepted call."""

from __future__ import annotations

import builtins
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import requests
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.rq_backend import FIXED_FUNCTION, QUEUE_NAME
from tests.asynckit import ECHO_FUNCTION, enqueue, slow_function, start_worker, stop_worker, wait_call, wait_for
from tests.conftest import Server
from tests.rediskit import RedisServer

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
TOKEN = "redis-worker-test-token"
FUNCTIONS = {"echo": ECHO_FUNCTION, "slow": slow_function(1)}
PROFILES = {"functions.toml": """
    [slow]
    retries = 2
    retry_backoff_s = 0.1
"""}


@pytest.fixture(scope="module")
def board() -> Iterator[tuple[Server, RedisServer]]:
    """A board with FNBOX_ASYNC_CONCURRENCY=0: its Gunicorn workers queue calls (and recover those of dead
    runners) but run none; only a `fnbox worker` started by a test does."""
    redis_server = RedisServer().start()
    s = Server(functions=FUNCTIONS, profiles=PROFILES,
               env={"FNBOX_REDIS_URL": redis_server.url, "FNBOX_BOARD": "b1", "FNBOX_ADMIN_TOKEN": TOKEN,
                    "FNBOX_ASYNC_CONCURRENCY": "0", "FNBOX_SCHEDULES": "0"})
    try:
        s.start()
        yield s, redis_server
    finally:
        s.stop()
        redis_server.cleanup()


def _worker_logs(server: Server) -> str:
    out = []
    for path in glob.glob(server.log_path + ".worker-*"):
        with open(path, "rb") as f:
            out.append(f.read().decode("utf-8", "replace"))
    return "\n".join(out)


def test_a_call_queued_by_the_board_is_run_by_a_fnbox_worker(board):
    s, _ = board
    worker = start_worker(s, "--concurrency", "1", "--no-schedules")
    try:
        assert "queue redis" in _worker_logs(s)
        cid = enqueue(s.url, "echo", data="from the board")
        call = wait_call(s.url, cid)
    finally:
        stop_worker(worker)
    assert call["status"] == "done" and call["attempts"] == 1, call
    assert call["board"] == call["ran_on"] == "b1"
    assert json.loads(call["result"]["body"]) == {"body": "from the board", "trigger": "async"}
    hist = requests.get(f"{s.url}/admin/calls/{call['request_id']}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10).json()
    assert hist["trigger"] == "async" and hist["outcome"] == "ok"  # the worker wrote the board's history


class _OpensOnUnpickle:
    """Unpickling this object calls open(path, "w"): the file appears if anything unpickles the job's payload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_foreign_and_pickled_jobs_are_dropped_and_never_executed(board):
    s, redis_server = board
    d = tempfile.mkdtemp(prefix="fnbox-test-foreign-")
    marker = os.path.join(d, "executed")
    r = redis_server.client()
    try:
        # The fixed function's name with a pickled argument (RQ's default serializer), whose unpickling creates
        # the marker; a JSON job naming another function, which would create it if run.
        pickled = Queue(QUEUE_NAME, connection=r).enqueue_call(FIXED_FUNCTION, args=(_OpensOnUnpickle(marker),))
        other = Queue(QUEUE_NAME, connection=r, serializer=JSONSerializer).enqueue_call(
            "os.system", args=(f"touch {marker}",))
        # A job hash RQ itself cannot read (an unknown status): RQ raises before fnbox sees a job at all.
        broken = Queue(QUEUE_NAME, connection=r, serializer=JSONSerializer).enqueue_call(
            FIXED_FUNCTION, args=(uuid.uuid4().hex,))
        r.hset(broken.key, "status", "no-such-status")
        foreign = [pickled.id, other.id, broken.id]
        assert not os.path.exists(marker)
        worker = start_worker(s, "--concurrency", "1", "--no-schedules")
        try:
            cid = enqueue(s.url, "echo", data="legit")  # queued behind them: taken after the three
            call = wait_call(s.url, cid)
            assert call["status"] == "done" and json.loads(call["result"]["body"])["body"] == "legit", call
            wait_for(lambda: all(f"dropped job {j}" in _worker_logs(s) for j in foreign), 10, "three drops logged")
        finally:
            stop_worker(worker)
        assert not os.path.exists(marker), "a foreign job was unpickled or executed"
        # Gone for good: not in the queue, not left in RQ's intermediate list (to be pushed back), hashes deleted.
        waiting = {j.decode() for j in r.lrange(f"rq:queue:{QUEUE_NAME}", 0, -1)}
        taken = {j.decode() for j in r.lrange(f"rq:queue:{QUEUE_NAME}:intermediate", 0, -1)}
        assert not (set(foreign) & (waiting | taken)), (waiting, taken)
        assert not any(r.exists(f"rq:job:{j}") for j in foreign)
        assert "does not name" in _worker_logs(s) and "cannot be read" in _worker_logs(s)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(120)
def test_kill_9_of_a_fnbox_worker_under_load_loses_no_accepted_call(board):
    s, _ = board
    ids = [enqueue(s.url, "slow?s=1", data=str(i)) for i in range(8)]  # retries = 2
    first = start_worker(s, "--concurrency", "2", "--no-schedules")
    try:
        wait_for(lambda: any(requests.get(f"{s.url}/calls/{c}", timeout=10).json()["status"] == "running"
                             for c in ids), 30, "the worker running a call")
    finally:
        stop_worker(first, hard=True)  # the worker, its fork server and its calls' processes
    ids += [enqueue(s.url, "slow?s=0.1", data=str(i)) for i in range(4)]  # accepted while no worker runs
    second = start_worker(s, "--concurrency", "2", "--no-schedules")
    try:
        calls = [wait_call(s.url, c, timeout=60) for c in ids]
    finally:
        stop_worker(second)
    for c in calls:
        assert c["status"] == "done" and c["result"]["body"] == "slow done", json.dumps(c, indent=1)
    interrupted = [c for c in calls if c["attempt_log"][0]["outcome"] == "unavailable"]
    assert interrupted, "the kill hit no running call"
    for c in interrupted:
        assert [a["outcome"] for a in c["attempt_log"]][-1] == "ok" and c["attempts"] >= 2
