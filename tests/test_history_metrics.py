"""Call history (SQLite, admin API, retention), Prometheus metrics across two workers, and Server-Timing."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, dedent, server_fixture

TOKEN = "history-test-token-81d2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

FUNCTIONS = {
    "hello": """
        def main(request):
            return 'hello'
    """,
    "flaky": """
        def main(request):
            print('flaky ran', request.args.get('n'))
            if request.args.get('fail'):
                raise RuntimeError('asked to fail')
            return 'fine'
    """,
    "m_ok": """
        def main(request):
            return 'ok'
    """,
    "m_err": """
        def main(request):
            raise ValueError('always')
    """,
    "m_slow": """
        import time
        def main(request):
            time.sleep(float(request.args.get('s', '0')))
            return 'slept'
    """,
    "m_loop": """
        def main(request):
            while True:
                pass
    """,
    "timed": """
        import time
        def main(request):
            time.sleep(0.2)
            if request.args.get('fail'):
                raise KeyError('x')
            return 'timed'
    """,
}
PROFILES = {
    "functions.toml": """
        [m_loop]
        timeout_s = 1
        [m_slow]
        timeout_s = 5
    """,
}
RECORD_KEYS = {"time", "request_id", "function", "version", "method", "path", "status", "outcome", "duration_ms",
               "cpu_ms", "max_rss_kb", "output"}


# Two workers, so that every count and every record crosses processes. The harness gives each server its own
# FNBOX_DATA_DIR (s.data_dir), where the history database (s.db_path) lives.
server = server_fixture(functions=FUNCTIONS, profiles=PROFILES, workers=2, env={"FNBOX_ADMIN_TOKEN": TOKEN})
small_server = server_fixture("small_server", functions=FUNCTIONS, profiles=PROFILES, workers=2,
                              env={"FNBOX_ADMIN_TOKEN": TOKEN, "FNBOX_HISTORY_MAX_ROWS": "300",
                                   "FNBOX_HISTORY_MAX_AGE_DAYS": "1"})


def admin(server: Server, path: str, **kw) -> requests.Response:
    return server.get("/admin" + path, headers=AUTH, **kw)


def db_rows(server: Server, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


# -- history -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_each_call_is_recorded_with_every_field(server):
    src = dedent("""
        def main(request):
            print('recorded output', request.args.get('x'))
            return {'got': request.get_data(as_text=True)}, 201
    """).encode()
    r = server.request("PUT", "/admin/functions/rec", data=src, headers=AUTH)
    assert r.status_code == 201 and r.json()["version"] == 1
    r = server.request("PUT", "/admin/functions/rec", data=src.replace(b"201", b"202"), headers=AUTH)
    assert r.json()["version"] == 2
    t0 = time.time()
    r = server.request("POST", "/function/rec/a/b?x=42", data=b"payload")
    t1 = time.time()
    assert r.status_code == 202
    rid = r.headers["X-Request-Id"]

    rec = admin(server, f"/calls/{rid}")
    assert rec.status_code == 200, rec.text
    rec = rec.json()
    assert set(rec) >= RECORD_KEYS, rec
    assert rec["request_id"] == rid and rec["function"] == "rec" and rec["version"] == 2
    assert rec["method"] == "POST" and rec["path"] == "/function/rec/a/b"
    assert rec["status"] == 202 and rec["outcome"] == "ok"
    assert t0 - 1 <= rec["time"] <= t1 + 1
    assert 0 < rec["duration_ms"] <= (t1 - t0) * 1000 + 50
    assert isinstance(rec["cpu_ms"], int | float) and rec["cpu_ms"] >= 0
    assert isinstance(rec["max_rss_kb"], int) and rec["max_rss_kb"] > 1000
    assert rec["output"] == "recorded output 42\n"

    # It is a row of the SQLite database in the data folder.
    rows = db_rows(server, "SELECT * FROM calls WHERE request_id=?", (rid,))
    assert len(rows) == 1
    assert {k: rows[0][k] for k in RECORD_KEYS} == {k: rec[k] for k in RECORD_KEYS}


@pytest.mark.timeout(30)
def test_a_client_request_id_is_the_key(server):
    rid = f"client-{uuid.uuid4().hex[:12]}"
    r = server.get("/function/hello", headers={"X-Request-Id": rid})
    assert r.headers["X-Request-Id"] == rid
    rec = admin(server, f"/calls/{rid}").json()
    assert rec["request_id"] == rid and rec["function"] == "hello" and rec["version"] is None
    assert rec["output"] == ""


def _hold_write_lock(path: str, locked: threading.Event, seconds: float) -> None:
    db = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        db.execute("COMMIT")
    finally:
        db.close()


@pytest.mark.timeout(30)
def test_a_call_is_in_the_history_when_its_response_arrives(server):
    # The next request may land on the other worker: its read waits for every live writer's accepted records
    # (gateway/history.py, flush), so the call is found even though the answer did not wait for the commit, and
    # even when the database was busy for a moment (another writer holding its lock).
    assert server.get("/function/hello").status_code == 200  # the database exists, in WAL mode
    for _ in range(5):
        locked = threading.Event()
        holder = threading.Thread(target=_hold_write_lock, args=(server.db_path, locked, 0.3))
        holder.start()
        try:
            assert locked.wait(5)
            r = server.get("/function/hello")
            assert r.status_code == 200
            rid = r.headers["X-Request-Id"]
            found = admin(server, f"/calls/{rid}")
            assert found.status_code == 200, f"{rid} not in the history right after its call: {found.text}"
        finally:
            holder.join(10)
    for _ in range(20):
        rid = server.get("/function/hello").headers["X-Request-Id"]
        assert admin(server, f"/calls/{rid}").status_code == 200


@pytest.mark.timeout(30)
def test_calls_endpoint_limit_and_outcome(server):
    rids = []
    for n, fail in enumerate([False, True, False, True, False]):
        r = server.get("/function/flaky", params={"n": n, **({"fail": 1} if fail else {})})
        assert r.status_code == (500 if fail else 200)
        rids.append(r.headers["X-Request-Id"])

    doc = admin(server, "/functions/flaky/calls").json()
    assert doc["function"] == "flaky"
    assert [c["request_id"] for c in doc["calls"]] == rids[::-1]  # newest first
    doc = admin(server, "/functions/flaky/calls", params={"limit": 2}).json()
    assert [c["request_id"] for c in doc["calls"]] == rids[:-3:-1]
    doc = admin(server, "/functions/flaky/calls", params={"outcome": "function_error"}).json()
    assert [c["request_id"] for c in doc["calls"]] == [rids[3], rids[1]]
    assert all(c["status"] == 500 and c["output"] == f"flaky ran {i}\n"
               for c, i in zip(doc["calls"], (3, 1), strict=True))
    doc = admin(server, "/functions/flaky/calls", params={"outcome": "ok", "limit": 1}).json()
    assert [c["request_id"] for c in doc["calls"]] == [rids[4]]
    assert admin(server, "/functions/flaky/calls", params={"outcome": "timeout"}).json()["calls"] == []
    assert admin(server, "/functions/nosuchfn/calls").status_code == 404  # not a function: say so

    for bad in ("0", "-1", "abc", "1001"):
        r = admin(server, "/functions/flaky/calls", params={"limit": bad})
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = admin(server, "/calls/no-such-request-id")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = admin(server, "/functions/_private/calls")
    assert r.status_code == 400 and r.json()["error"] == "invalid_name"


@pytest.mark.timeout(30)
def test_functions_cannot_read_the_history(server):
    # The history holds every function's output; a sandboxed call must not be able to open it.
    paths = [server.db_path, server.db_path + "-wal", server.db_path + "-shm"]
    src = dedent(f"""
        def main(request):
            out = []
            for p in {paths!r}:
                try:
                    with open(p, 'rb') as f:
                        f.read(1)
                    out.append('READABLE ' + p)
                except OSError as e:
                    out.append(type(e).__name__)
            return ' '.join(out)
    """).encode()
    assert server.request("PUT", "/admin/functions/snoop", data=src, headers=AUTH).status_code == 201
    server.get("/function/hello")  # make sure the WAL exists
    r = server.get("/function/snoop")
    assert r.status_code == 200
    assert "READABLE" not in r.text, r.text


# -- Server-Timing -------------------------------------------------------------------------------------------
def server_timing(resp: requests.Response) -> dict[str, float]:
    header = resp.headers.get("Server-Timing")
    assert header, f"no Server-Timing header: {dict(resp.headers)}"
    out = {}
    for entry in header.split(","):
        m = re.fullmatch(r"\s*([A-Za-z0-9_-]+);dur=([0-9.]+)\s*", entry)
        assert m, header
        out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fail", [False, True])
def test_server_timing_header(server, fail):
    t0 = time.monotonic()
    r = server.get("/function/timed", params={"fail": 1} if fail else {})
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert r.status_code == (500 if fail else 200)
    st = server_timing(r)
    assert set(st) == {"total", "sandbox", "function"}, st
    assert st["function"] >= 200  # the function sleeps 0.2 s
    assert 0 <= st["sandbox"] < st["function"]
    assert st["total"] + 0.02 >= st["sandbox"] + st["function"]
    assert st["total"] <= elapsed_ms


# -- metrics -------------------------------------------------------------------------------------------------
def metrics(server: Server) -> list:
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def in_flight_after_calls_end(server: Server, timeout: float = 10.0) -> float:
    """fnbox_calls_in_flight once it reaches 0 (bounded): a call is in flight until its last process is gone,
    which may be a moment after its answer."""
    deadline = time.monotonic() + timeout
    while (n := value(metrics(server), "fnbox_calls_in_flight")) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


@pytest.mark.timeout(60)
def test_metrics_count_calls_exactly_across_workers(server):
    assert in_flight_after_calls_end(server) == 0
    before = metrics(server)
    kills_before = value(before, "fnbox_sandbox_kills_total", reason="timeout")
    assert value(before, "fnbox_calls_in_flight") == 0

    paths = ["/function/m_loop"] + ["/function/m_ok"] * 13 + ["/function/m_err"] * 5
    with ThreadPoolExecutor(6) as pool:  # below every function's max_concurrency (8)
        statuses = list(pool.map(lambda p: requests.get(server.url + p, timeout=30).status_code, paths))
    assert statuses == [504] + [200] * 13 + [500] * 5

    after = metrics(server)
    calls = {(s.labels["function"], s.labels["outcome"], s.labels["status"]): s.value
             for s in after if s.name == "fnbox_calls_total" and s.labels["function"].startswith("m_")}
    assert calls == {("m_ok", "ok", "200"): 13, ("m_err", "function_error", "500"): 5,
                     ("m_loop", "timeout", "504"): 1}
    assert value(after, "fnbox_call_duration_seconds_count", function="m_ok") == 13
    assert value(after, "fnbox_call_duration_seconds_count", function="m_err") == 5
    assert value(after, "fnbox_call_duration_seconds_count", function="m_loop") == 1
    assert value(after, "fnbox_call_duration_seconds_bucket", function="m_loop", le="0.5") == 0
    assert value(after, "fnbox_call_duration_seconds_bucket", function="m_loop", le="2.5") == 1
    assert value(after, "fnbox_call_duration_seconds_sum", function="m_loop") >= 1.0
    assert value(after, "fnbox_sandbox_kills_total", reason="timeout") == kills_before + 1
    assert in_flight_after_calls_end(server) == 0
    # Both workers served these calls, so both workers' files were merged.
    pids = {requests.get(server.url + "/healthz", timeout=10).json()["worker_pid"] for _ in range(40)}
    assert len(pids) == 2


@pytest.mark.timeout(30)
def test_in_flight_gauge_follows_a_call(server):
    result: list = []
    t = threading.Thread(target=lambda: result.append(server.get("/function/m_slow", params={"s": "1.5"})))
    t.start()
    try:
        deadline = time.monotonic() + 5
        seen = 0.0
        while time.monotonic() < deadline and seen != 1:
            seen = value(metrics(server), "fnbox_calls_in_flight")
            time.sleep(0.05)
        assert seen == 1
    finally:
        t.join(30)
    assert result[0].status_code == 200
    assert in_flight_after_calls_end(server) == 0


@pytest.mark.timeout(60)
def test_fork_server_restart_is_counted(server):
    before = value(metrics(server), "fnbox_forkserver_restarts_total")
    health = server.get("/healthz").json()
    pid = health["fork_server_pid"]
    assert pid and pid in server.pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    ok_in_a_row, restarts = 0, before
    while time.monotonic() < deadline and (ok_in_a_row < 10 or restarts < before + 1):
        r = server.get("/function/hello", timeout=10)
        ok_in_a_row = ok_in_a_row + 1 if r.status_code == 200 else 0
        restarts = value(metrics(server), "fnbox_forkserver_restarts_total")
        time.sleep(0.02)
    assert ok_in_a_row >= 10, "hello did not work again after the fork server was killed"
    assert restarts == before + 1
    # The worker that lost its fork server has a new one and says so.
    seen = {}
    for _ in range(40):
        h = server.get("/healthz").json()
        seen[h["worker_pid"]] = h
    assert health["worker_pid"] in seen
    again = seen[health["worker_pid"]]
    assert again["status"] == "ok" and again["fork_server_pid"] != pid and again["fork_server_restarts"] == 1


# -- retention and a failing database ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_retention_keeps_the_newest_max_rows(small_server):
    s = small_server
    statuses: list[int] = []
    failures: list[str] = []

    def worker(n: int) -> None:
        with requests.Session() as sess:
            for _ in range(n):
                r = sess.get(s.url + "/function/m_ok", timeout=30)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=worker, args=(125,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(80)
    assert len(statuses) == 1000 and set(statuses) == {200}, failures[:3]
    last = s.get("/function/hello").headers["X-Request-Id"]
    # Retention runs in each worker's writer once its calls pause (PRUNE_IDLE_S): shortly after calls stop,
    # exactly max_rows rows are left (ids are consecutive here), and the newest call is among them.
    assert admin(s, f"/calls/{last}").status_code == 200
    assert _eventually(lambda: db_rows(s, "SELECT COUNT(*) AS n FROM calls")[0]["n"] == 300)
    listing = {f["name"]: f for f in admin(s, "/functions").json()["functions"]}
    assert listing["m_ok"]["calls"] == 299 and listing["hello"]["calls"] == 1
    assert db_rows(s, "SELECT COUNT(*) AS n FROM calls")[0]["n"] == 300
    assert len(admin(s, "/functions/m_ok/calls", params={"limit": 1000}).json()["calls"]) == 299

    # Age: a row older than FNBOX_HISTORY_MAX_AGE_DAYS is gone after the next call.
    db = sqlite3.connect(s.db_path, timeout=5)
    with db:
        db.execute("INSERT INTO calls (time, request_id, function, outcome) VALUES (?, 'ancient', 'hello', 'ok')",
                   (time.time() - 2 * 86400,))
    db.close()
    assert admin(s, "/calls/ancient").status_code == 200
    s.get("/function/hello")
    assert _eventually(lambda: admin(s, "/calls/ancient").status_code == 404)
    # The other worker's pass may have removed it before this call's row was written: then this row's own
    # writer trims the rows after its pause, as above.
    assert _eventually(lambda: db_rows(s, "SELECT COUNT(*) AS n FROM calls")[0]["n"] <= 300)


def _eventually(check, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _resumes(s: Server) -> bool:
    """History works again: a call is readable right after it (bounded wait for each worker to reopen)."""
    deadline = time.monotonic() + 10
    found = 0
    while found < 5 and time.monotonic() < deadline:
        rid = s.get("/function/hello").headers["X-Request-Id"]
        found = found + 1 if admin(s, f"/calls/{rid}").status_code == 200 else 0
    return found == 5


@pytest.mark.timeout(60)
def test_a_locked_history_never_fails_a_call(small_server):
    s = small_server
    assert s.get("/function/hello").status_code == 200  # the database exists, in WAL mode
    locked = threading.Event()
    # Longer than the writers' lock wait (2 s): the records of this moment are lost, the calls are not.
    holder = threading.Thread(target=_hold_write_lock, args=(s.db_path, locked, 2.5))
    holder.start()
    try:
        assert locked.wait(10)
        for _ in range(3):
            t0 = time.monotonic()
            r = s.get("/function/m_ok")
            # Served, and held up by the history no longer than its bounded wait (1 s).
            assert r.status_code == 200 and r.text == "ok"
            assert time.monotonic() - t0 < 1.8
        assert admin(s, "/functions/m_ok/calls").status_code == 200  # readers are not blocked by a writer
    finally:
        holder.join(30)
    assert _resumes(s)
    assert "call history: database is locked" in s.read_log()


@pytest.mark.timeout(60)
def test_a_broken_history_is_a_clear_503_and_never_fails_a_call(small_server):
    s = small_server
    moved = s.db_path + ".moved"
    os.rename(s.db_path, moved)
    try:
        os.mkdir(s.db_path)  # what readers open now is not a database file
        r = s.get("/function/m_ok")
        assert r.status_code == 200 and r.text == "ok"
        for path in ("/functions/m_ok/calls", f"/calls/{r.headers['X-Request-Id']}", "/functions"):
            r = admin(s, path)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "unavailable" and "history" in r.json()["message"]
        # /healthz says so: the answering worker's writer lost the record (each worker reports its own; a call
        # per request makes the answering worker one that failed).
        for _ in range(20):
            assert s.get("/function/m_ok").status_code == 200
            hist = s.get("/healthz").json()["history"]
            if hist["error"]:  # not `dropped`: a worker may still count records the previous test's lock lost
                break
        assert hist["dropped"] >= 1 and hist["write_errors"] >= 1 and hist["error"], hist
    finally:
        os.rmdir(s.db_path)
        os.replace(moved, s.db_path)
    assert _resumes(s)


# -- the writer's progress, shared between processes -----------------------------------------------------------
_OTHER_WORKER = """
import sys
from gateway.history import History
h = History(sys.argv[1])
h.record({"time": 1.0, "request_id": sys.argv[2], "function": "f", "outcome": "ok"}, wait=False)
print("queued", flush=True)
sys.stdin.read()  # until the test is done reading
h.close(timeout=5.0)
"""


@pytest.mark.timeout(30)
def test_a_read_waits_for_a_record_another_process_has_not_committed_yet(tmp_path):
    """A call's answer does not wait for its history commit: a read in another worker (another process) waits
    for it instead, through the writers' shared progress counters. The database is locked while the other
    process records, so its row cannot be committed before the read begins."""
    import subprocess
    import sys

    from gateway.history import History

    path = str(tmp_path / "h.sqlite3")
    reader = History(path)
    rid = f"other-{uuid.uuid4().hex[:8]}"
    locked = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, locked, 0.5))
    holder.start()
    assert locked.wait(5)
    other = subprocess.Popen([sys.executable, "-c", _OTHER_WORKER, path, rid], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert other.stdout.readline().strip() == "queued"
        assert reader.flush(timeout=10.0)
        found = reader.call(rid)
        assert found is not None and found["request_id"] == rid
    finally:
        other.communicate("", timeout=10)
        holder.join(10)
        reader.close(timeout=5.0)
    assert other.returncode == 0
    reader.flush(timeout=1.0)  # the other writer is gone: its file is removed, not waited for
    assert not [n for n in os.listdir(path + ".pending") if not n.startswith(f"{os.getpid()}-")]


def test_a_dead_writers_progress_file_is_not_waited_for(tmp_path):
    from gateway.history import History

    path = str(tmp_path / "h.sqlite3")
    h = History(path)
    try:
        os.makedirs(path + ".pending", exist_ok=True)
        stale = os.path.join(path + ".pending", "999999999-1")
        with open(stale, "wb") as f:
            f.write((5).to_bytes(8, "little") + (0).to_bytes(8, "little"))  # 5 accepted, none written
        assert h.flush(timeout=2.0)  # False if it had waited for the 5 records (a live writer's)
        assert not os.path.exists(stale)
    finally:
        h.close(timeout=5.0)


def test_a_rows_completion_in_the_same_batch_is_one_complete_row(tmp_path):
    from gateway.history import History

    h = History(str(tmp_path / "h.sqlite3"))
    try:
        h.record({"time": 1.0, "request_id": "r1", "function": "f", "outcome": "ok", "complete": 0}, wait=False)
        h.finish("r1", 3.5, 2048, "timeout", 12.0)
        assert h.flush(timeout=5.0)
        row = h.call("r1")
        assert row is not None
        assert (row["cpu_ms"], row["max_rss_kb"], row["outcome"], row["duration_ms"]) == (3.5, 2048, "timeout", 12.0)
        assert h.count() == 1
    finally:
        h.close(timeout=5.0)
