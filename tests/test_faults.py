"""Faults injected into real servers: admission under overload, kill -9 of a fork server or of a Gunicorn worker,
graceful stop and reload under load, a full scratch file system, an unreadable functions folder, a locked or
corrupt call-history database. Each test is bounded in time, and every process it starts is ended by its pid.

Isolation (tests/faultkit.py): these servers run their calls as uids of their own (100000 and up, per process,
not the 61000.. of the other test files) with a scratch folder of their own, and the `iso` fixture points
conftest's leftover checks (`sandbox_processes`, `scratch_entries`, `assert_nothing_left`) at that range and
folder: a test that kills processes and counts leftovers sees only its own, even while another test run on the
machine has calls in flight.

Spares: a fork server may keep idle children forked ahead of demand (FNBOX_SPARES), which run as sandbox uids
with a scratch folder each. While a server runs, faultkit's `assert_no_leftovers` allows those (children of a
live fork server, at most FNBOX_SPARES each) and nothing else; once it is stopped, `assert_nothing_left` allows
nothing. Calls say that they run by leaving a marker named after their pid in a world-writable folder (`world`),
so the tests count running calls, and find their processes, without mistaking a spare for one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import requests

import tests.conftest as conftest
from tests.conftest import REPO, SHARED, Server, assert_nothing_left, sandbox_processes
from tests.faultkit import (
    FAULTS_UID_BASE,
    alive,
    assert_no_leftovers,
    fork_servers,
    isolated_env,
    make_scratch_dir,
    wait_for,
    workers_of,
)

with open(os.path.join(REPO, "functions", "hello.py")) as _f:
    HELLO_SRC = _f.read()

SLOW = """
import os, time

def main(request):
    if request.args.get("dir"):  # "I run, as this pid"
        open(os.path.join(request.args["dir"], f"call-{os.getpid()}"), "w").close()
    time.sleep(float(request.args.get("s", "1")))
    return "slept " + request.args.get("s", "1")
"""

WRITER = """
def main(request):
    with open("data.bin", "wb") as f:  # in the call's scratch dir (its cwd)
        f.write(b"x" * int(request.args.get("n", "4096")))
    return "wrote"
"""

FUNCTIONS = {"hello": HELLO_SRC, "slow": SLOW, "capped": SLOW, "writer": WRITER}
PROFILES = {"functions.toml": """
    [slow]
    timeout_s = 40
    max_concurrency = 16
    [capped]
    timeout_s = 10
    max_concurrency = 2
"""}


# -- harness -----------------------------------------------------------------------------------------------------
@pytest.fixture
def iso(monkeypatch) -> Iterator[dict[str, str]]:
    """The environment of an isolated server (own uid range, own scratch folder); conftest's checks follow it."""
    scratch = make_scratch_dir("fnbox-faults-scratch-")
    monkeypatch.setattr(conftest, "UID_BASE", FAULTS_UID_BASE)
    monkeypatch.setattr(conftest, "SCRATCH", scratch)
    try:
        yield isolated_env(FAULTS_UID_BASE, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def world() -> Iterator[str]:
    """A folder every sandbox uid may write to: the calls' markers."""
    d = tempfile.mkdtemp(prefix="fnbox-faults-world-", dir=SHARED)
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def running_calls(world: str) -> list[int]:
    """Pids of the calls that said they run (slow?dir=world) and are still alive."""
    pids = []
    for name in os.listdir(world):
        if name.startswith("call-") and alive(int(name[5:])):
            pids.append(int(name[5:]))
    return pids


def start(make_server: Callable[..., Server], iso: dict[str, str], workers: int = 2, threads: int = 16,
          env: dict[str, str] | None = None, **kw: Any) -> Server:
    kw.setdefault("functions", FUNCTIONS)
    kw.setdefault("profiles", PROFILES)
    return make_server(workers=workers, threads=threads, env={**iso, **(env or {})}, **kw).start()


def timed_get(srv: Server, path: str, timeout: float = 60, **kw: Any) -> tuple[float, requests.Response]:
    t0 = time.monotonic()
    r = srv.get(path, timeout=timeout, **kw)
    return time.monotonic() - t0, r


def best_ms(srv: Server, path: str, tries: int = 3) -> float:
    """The fastest of a few fresh requests, in ms: a correctness bound on responsiveness, not a benchmark."""
    best = float("inf")
    for _ in range(tries):
        elapsed, r = timed_get(srv, path, timeout=10)
        assert r.status_code == 200, r.text
        best = min(best, elapsed * 1000)
    return best


def concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Runs fn(0..n-1) in n threads released together; returns results or exceptions, in order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(10)
        try:
            return fn(i)
        except Exception as e:  # the test decides what an exception means
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def assert_json_error(r: requests.Response, status: int | range, error: str | set[str] | None = None) -> dict:
    ok = r.status_code in status if isinstance(status, range) else r.status_code == status
    assert ok, (r.status_code, r.text[:500])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    doc = r.json()
    assert isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str) and doc["message"], doc
    if error is not None:
        assert doc["error"] in ({error} if isinstance(error, str) else error), doc
    return doc


def calls_by_worker(srv: Server, world: str) -> dict[int, list[int]]:
    """worker pid -> pids of the calls (main processes) its fork server runs now."""
    fs = fork_servers(srv)
    out: dict[int, list[int]] = {}
    for pid in running_calls(world):
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            continue
        if parent in fs:
            out.setdefault(fs[parent], []).append(pid)
    return out


def health(srv: Server) -> dict[str, Any]:
    r = srv.get("/healthz", timeout=5)
    return r.json()


def hello_ok(srv: Server) -> None:
    r = srv.get("/function/hello?name=Ok", timeout=10)
    assert r.status_code == 200 and r.text == "Hello Ok!", (r.status_code, r.text[:300])


# -- admission ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_admission_caps_answer_busy_at_once(make_server, iso, world):
    srv = start(make_server, iso, env={"FNBOX_MAX_CALLS": "4"})
    assert health(srv)["max_calls"] == 4

    # Per function: max_concurrency = 2 of `capped` (the global cap of 4 is not reached).
    results = concurrently(5, lambda i: timed_get(srv, "/function/capped?s=2"))
    assert not [r for r in results if isinstance(r, Exception)], results
    served = [(t, r) for t, r in results if r.status_code == 200]
    refused = [(t, r) for t, r in results if r.status_code != 200]
    assert len(served) == 2 and len(refused) == 3, [(t, r.status_code, r.text[:200]) for t, r in results]
    for t, r in served:
        assert r.text == "slept 2" and 2 <= t < 4, (t, r.text)
    for t, r in refused:
        doc = assert_json_error(r, 503, "busy")
        assert "max_concurrency" in doc["message"] and r.headers.get("Retry-After") == "1", (doc, r.headers)
        assert t < 1, f"a busy answer took {t:.2f} s: it waited behind the slow calls"

    # Global: FNBOX_MAX_CALLS = 4 across both workers; 10 calls of a function allowing 16.
    with ThreadPoolExecutor(1) as side:
        during: Future = side.submit(_while_all_slots_busy, srv, world)
        results = concurrently(10, lambda i: timed_get(srv, f"/function/slow?s=3&dir={world}"))
        busy_view = during.result(30)
    assert not [r for r in results if isinstance(r, Exception)], results
    served = [(t, r) for t, r in results if r.status_code == 200]
    refused = [(t, r) for t, r in results if r.status_code != 200]
    assert len(served) == 4 and len(refused) == 6, [(round(t, 2), r.status_code, r.text[:200]) for t, r in results]
    for t, r in served:
        assert r.text == "slept 3" and 3 <= t < 5, (t, r.text)
    for t, r in refused:
        doc = assert_json_error(r, 503, "busy")
        assert "FNBOX_MAX_CALLS" in doc["message"] and r.headers.get("Retry-After") == "1", (doc, r.headers)
        assert t < 1, f"a busy answer took {t:.2f} s: it waited behind the slow calls"
    assert busy_view["running"] == 4, busy_view
    assert busy_view["healthz_ms"] < 100, busy_view
    assert busy_view["hello"][0] == 503 and busy_view["hello"][1] == "busy" and busy_view["hello_s"] < 1, busy_view
    hello_ok(srv)  # the places are given back


def _while_all_slots_busy(srv: Server, world: str) -> dict[str, Any]:
    """Once 4 calls run (every slot of FNBOX_MAX_CALLS): how fast /healthz and a refused hello answer."""
    wait_for(lambda: len(running_calls(world)) >= 4, 10)
    time.sleep(0.2)  # let the refused ones come and go
    out: dict[str, Any] = {"running": len(running_calls(world))}
    out["healthz_ms"] = best_ms(srv, "/healthz")
    t, r = timed_get(srv, "/function/hello", timeout=10)
    out["hello"], out["hello_s"] = (r.status_code, r.json().get("error") if r.status_code != 200 else r.text), t
    return out


@pytest.mark.timeout(90)
def test_no_request_waits_behind_slow_calls_in_one_worker(make_server, iso, world):
    """Gunicorn does not spread connections evenly: one worker may accept most of them. However they fall, every
    request is either served at once or refused at once; none waits in a worker's queue for a thread that a
    slow call holds (which would also hold /healthz up). 2 workers x 4 threads, the default caps."""
    srv = start(make_server, iso, threads=4)
    t_slow = 3.0

    with ThreadPoolExecutor(1) as side:
        def probe() -> list[float]:
            wait_for(lambda: len(running_calls(world)) >= 3, 10)
            time.sleep(0.3)
            return [timed_get(srv, "/healthz", timeout=10)[0] for _ in range(5)]

        during = side.submit(probe)
        results = concurrently(10, lambda i: timed_get(srv, f"/function/slow?s={t_slow:g}&dir={world}"))
        healthz_s = during.result(30)
    assert not [r for r in results if isinstance(r, Exception)], results
    summary = [(round(t, 2), r.status_code, r.text[:120]) for t, r in results]
    for t, r in results:
        if r.status_code == 200:
            assert t < t_slow + 1.5, f"a call was served {t:.2f} s after it came: it queued behind others {summary}"
        else:
            assert_json_error(r, 503, "busy")
            assert t < 1, f"a busy answer took {t:.2f} s {summary}"
    assert 1 <= sum(r.status_code == 200 for _, r in results) <= 6, summary  # derived FNBOX_MAX_CALLS: 6
    assert max(healthz_s) < 1, f"/healthz waited behind slow calls: {healthz_s}"


# -- kill -9 -----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_kill_fork_server_during_calls(make_server, iso, world):
    srv = start(make_server, iso, workers=1)
    old = health(srv)["fork_server_pid"]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(timed_get, srv, f"/function/slow?s=20&dir={world}", 40) for _ in range(4)]
        assert wait_for(lambda: len(running_calls(world)) >= 4, 10), "the calls did not start"
        calls = running_calls(world)
        assert not any(f.done() for f in futs)
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        back = wait_for(lambda: (health(srv).get("fork_server_pid") or old) != old, 1.0)
        back_s = time.monotonic() - killed
        results = [f.result(30) for f in futs]  # a connection reset would raise here
    ended = time.time()
    assert back, f"no new fork server within 1 s of the kill ({back_s:.2f} s)"
    h = health(srv)
    assert h["status"] == "ok" and h["fork_server_pid"] not in (None, old) and h["fork_server_restarts"] == 1, h
    for t, r in results:
        doc = assert_json_error(r, range(500, 600))
        assert doc["error"] == "crashed" and doc["function"] == "slow", doc
        assert t < 20, f"the call waited {t:.1f} s: it should fail as soon as its fork server died"
    assert not [p for p in calls if alive(p)], "a call of the dead fork server still runs"
    for _ in range(5):
        hello_ok(srv)
    assert_no_leftovers(srv, ended)


@pytest.mark.timeout(120)
def test_kill_worker_during_calls(make_server, iso, world):
    # Graceful timeout short: the calls of the surviving worker sleep 30 s and the server is stopped before that.
    srv = start(make_server, iso, threads=8, env={"FNBOX_GRACEFUL_TIMEOUT": "3"})
    pool = ThreadPoolExecutor(14)
    futs: list[Future] = []
    try:
        # A worker still starting up (its fork server warming) accepts no connection: wait until both answer.
        seen: set[int] = set()
        assert wait_for(lambda: seen.add(health(srv).get("fork_server_pid")) or len(seen - {None}) == 2, 30), seen
        # Launch calls one by one until both workers run some (connections do not alternate between workers).
        for _ in range(14):
            futs.append(pool.submit(timed_get, srv, f"/function/slow?s=30&dir={world}", 60))
            time.sleep(0.15)
            by_worker = calls_by_worker(srv, world)
            if len(by_worker) == 2:
                break
        by_worker = calls_by_worker(srv, world)
        assert len(by_worker) == 2, f"could not get calls onto both workers: {by_worker}"
        victim = max(by_worker, key=lambda w: len(by_worker[w]))
        victim_calls = by_worker[victim]
        victim_fork_server = [f for f, w in fork_servers(srv).items() if w == victim]
        survivor_calls = [pid for w, pids in by_worker.items() if w != victim for pid in pids]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        gone = wait_for(lambda: not [p for p in victim_calls if alive(p)], 3)
        assert gone, f"calls of the killed worker still run 3 s later: {[p for p in victim_calls if alive(p)]}"
        assert wait_for(lambda: not [p for p in victim_fork_server if alive(p)], 3), \
            f"the killed worker's fork server {victim_fork_server} outlived it"
        replaced = wait_for(lambda: len(workers_of(srv)) == 2 and victim not in [w.pid for w in workers_of(srv)], 5)
        assert replaced, [w.pid for w in workers_of(srv)]
        assert all(alive(p) for p in survivor_calls), "a call of the other worker was killed"
        # The clients of the killed worker's calls see their connection closed at once, not a 30 s hang.
        def cut() -> int:
            return sum(1 for f in futs if f.done() and f.exception() is not None)

        assert wait_for(lambda: cut() >= len(victim_calls), 3), \
            f"only {cut()} of the killed worker's {len(victim_calls)} clients got an answer"
        assert time.monotonic() - killed < 10
        assert health(srv)["status"] == "ok"
        for _ in range(3):
            hello_ok(srv)
        assert set(running_calls(world)) == set(survivor_calls)
        live = fork_servers(srv)
        orphans = [p.pid for p in sandbox_processes() if p.ppid() not in live]
        assert not orphans, f"sandbox processes outside the live fork servers: {orphans}"
    finally:
        srv.stop()
        pool.shutdown(wait=True, cancel_futures=True)
    assert_nothing_left(time.time(), timeout=5)


# -- graceful stop and reload ------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_graceful_stop_finishes_calls_then_everything_is_gone(make_server, iso, world):
    srv = start(make_server, iso)
    durations = [1 + (i % 5) / 4 for i in range(12)]  # 1 .. 2 s
    with ThreadPoolExecutor(len(durations)) as pool:
        futs = [pool.submit(timed_get, srv, f"/function/slow?s={d:g}&dir={world}", 30) for d in durations]
        assert wait_for(lambda: len(running_calls(world)) >= len(durations), 10), "the calls did not all start"
        master = srv.proc.pid
        known = set(srv.pids())
        forks = set(fork_servers(srv))
        assert len(forks) == 2 and len(workers_of(srv)) == 2
        os.kill(master, signal.SIGTERM)
        results = [f.result(30) for f in futs]
    for d, (t, r) in zip(durations, results, strict=True):
        assert r.status_code == 200 and r.text == f"slept {d:g}", (d, r.status_code, r.text[:300])
        assert t < d + 1.5, f"a {d} s call took {t:.2f} s"
    try:
        srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the master did not exit within 15 s of SIGTERM:\n{srv.read_log()[-3000:]}")
    assert srv.proc.returncode == 0, srv.proc.returncode
    left = wait_for(lambda: not [p for p in known | forks if alive(p)], 5)
    assert left, f"still running after the master exited: {[p for p in known | forks if alive(p)]}"
    assert_nothing_left(time.time())  # every sandbox process (spares too), scratch folder and file


@pytest.mark.timeout(90)
def test_graceful_reload_keeps_every_call(make_server, iso):
    srv = start(make_server, iso)
    before_workers = {w.pid for w in workers_of(srv)}
    before_forks = set(fork_servers(srv))
    stop_at = time.monotonic() + 7
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def stream(k: int) -> None:
        for n in range(10_000):  # bounded; ends with the clock
            if time.monotonic() > stop_at:
                return
            if k % 2:
                path, want = "/function/slow?s=0.4", "slept 0.4"
            else:
                path, want = f"/function/hello?name=k{k}n{n}", f"Hello k{k}n{n}!"
            try:
                r = srv.get(path, timeout=20)
                got: Any = (r.status_code, r.text[:200])
            except requests.RequestException as e:
                got = repr(e)
            with lock:
                results.append((want, got))

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(srv.proc.pid, signal.SIGHUP)
    time.sleep(2.5)
    os.kill(srv.proc.pid, signal.SIGHUP)
    for t in threads:
        t.join(30)
    failed = [(want, got) for want, got in results if got != (200, want)]
    assert len(results) > 50 and not failed, (len(results), failed[:10])
    # The second reload's old workers finish their calls and exit on their own time (graceful_timeout).
    wait_for(lambda: len(workers_of(srv)) == 2, 15)
    after_workers = {w.pid for w in workers_of(srv)}
    assert len(after_workers) == 2 and not after_workers & before_workers, (before_workers, after_workers)
    assert wait_for(lambda: not [p for p in before_forks if alive(p)], 5), "an old fork server is still running"
    assert not set(fork_servers(srv)) & before_forks
    hello_ok(srv)
    assert_no_leftovers(srv, time.time())


# -- resources ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs() -> Iterator[str]:
    """A 1 MiB tmpfs with 64 inodes on a fresh folder; unmounted afterwards whatever happens."""
    path = tempfile.mkdtemp(prefix="fnbox-faults-tmpfs-", dir="/tmp")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64,mode=0711", "fnbox-faults", path],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        os.rmdir(path)
        pytest.fail(f"cannot mount a tmpfs on {path} (this test needs root, as CI has): {out.stderr.strip()}")
    try:
        yield path
    finally:
        for args in (["umount", path], ["umount", "-l", path]):
            if subprocess.run(args, capture_output=True, timeout=30).returncode == 0:
                break
        os.rmdir(path)


def _fill_blocks(folder: str) -> None:
    """Every block of the file system, as root (as a runaway log would)."""
    with open(os.path.join(folder, "fill.bin"), "wb", buffering=0) as f:  # unbuffered: close() flushes nothing
        for _ in range(64):  # 4 MiB at most: the file system has 1
            try:
                f.write(b"\0" * 65536)
            except OSError:
                break


def _fill_inodes(folder: str) -> None:
    for i in range(256):  # 64 inodes at most
        try:
            open(os.path.join(folder, f"fill-{i}"), "w").close()
        except OSError:
            break


def _unfill(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith("fill"):
            os.unlink(os.path.join(folder, name))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spares", ["0", "default"])
def test_scratch_filesystem_full(make_server, iso, world, small_tmpfs, monkeypatch, spares):
    """Spares 0: without a file system view every call needs a new scratch folder, so the full file system must be
    answered; with one a call needs none and is served. Default: the fork server keeps children ready and must
    survive failing to make more."""
    env = {**iso, "FNBOX_SCRATCH_DIR": small_tmpfs, **({"FNBOX_SPARES": "0"} if spares == "0" else {})}
    monkeypatch.setattr(conftest, "SCRATCH", small_tmpfs)
    srv = start(make_server, env, workers=1)
    try:
        worker = workers_of(srv)[0].pid
        fork_server = health(srv)["fork_server_pid"]
        assert srv.get("/function/writer").text == "wrote"
        # The call is answered before its scratch folder is removed: wait for that, or the removal would free
        # blocks after they were filled below.
        assert_no_leftovers(srv, time.time())

        # Blocks full, inodes left: the call starts. Without a file system view its cwd is its scratch folder,
        # so its own write fails, and says why; with one, it writes to its own tmpfs (max_disk_mb), unharmed.
        _fill_blocks(small_tmpfs)
        hello_ok(srv)
        r = srv.get("/function/writer")
        if health(srv)["sandbox"].get("file_system_view", "").startswith("active"):
            assert (r.status_code, r.text) == (200, "wrote"), r.text
        else:
            doc = assert_json_error(r, 500, "function_error")
            assert "No space left on device" in doc["message"], doc

        # Completely full (no inode either: no scratch folder can be made). A call that runs already must not
        # be hurt, and a call is served, fails with its own error, or gets a clear error; never a crash of the
        # sandbox runner.
        answers = []
        with ThreadPoolExecutor(1) as pool:
            bystander = pool.submit(timed_get, srv, f"/function/slow?s=2&dir={world}", 30)
            assert wait_for(lambda: running_calls(world), 5)
            _fill_inodes(small_tmpfs)
            for name in ("hello", "writer", "hello", "hello", "writer"):
                r = srv.get(f"/function/{name}", timeout=10)
                answers.append((name, r.status_code, r.text[:300]))
                if r.status_code == 200:
                    assert r.text == {"hello": "Hello World!", "writer": "wrote"}[name], answers
                    continue
                doc = assert_json_error(r, range(500, 600))
                clear = (doc["error"] == "function_error" and "No space left" in doc["message"]) or (
                    doc["error"] != "crashed" and "space" in doc["message"].lower())
                assert clear, f"not a clear answer to a full scratch file system: {answers}"
            t, r = bystander.result(30)
        assert (r.status_code, r.text) == (200, "slept 2"), \
            f"a call in flight was hurt: {r.status_code} {r.text}; then: {answers}"
        if not health(srv)["sandbox"].get("file_system_view", "").startswith("active"):
            if spares == "0":  # every call needs a scratch folder of its own: some must fail, clearly (above)
                assert any(status != 200 for _, status, _ in answers), f"the full file system went unnoticed: {answers}"
        else:  # a call with a view needs nothing on the scratch file system (its cwd is its own tmpfs)
            assert all(status == 200 for _, status, _ in answers), answers
        h = health(srv)
        assert h["status"] == "ok" and [w.pid for w in workers_of(srv)] == [worker], "the worker was replaced"
        assert h["fork_server_pid"] == fork_server and h["fork_server_restarts"] == 0, \
            f"the fork server died of a full scratch file system: {h['fork_server_pid']} (was {fork_server}), " \
            f"restarts {h['fork_server_restarts']}; answers {answers}"

        # Space again: everything works, nothing of the failed calls is left.
        _unfill(small_tmpfs)
        hello_ok(srv)
        assert srv.get("/function/writer", params={"n": "100000"}).text == "wrote"
        assert_no_leftovers(srv, time.time())
    finally:
        srv.stop()


@pytest.mark.timeout(60)
def test_functions_folder_unreadable(make_server, iso):
    srv = start(make_server, iso)
    workers = {w.pid for w in workers_of(srv)}
    mode = os.stat(srv.functions_dir).st_mode & 0o7777
    hello_ok(srv)
    try:
        os.chmod(srv.functions_dir, 0)
        for _ in range(4):  # both workers, whichever answers
            r = srv.get("/function/hello", timeout=10)
            doc = assert_json_error(r, range(400, 600))
            # The function exists: "no function named hello" would send the operator looking for the wrong thing.
            assert doc["error"] != "not_found" and doc["function"] == "hello", doc
        assert_json_error(srv.get("/function/nope"), 404, "not_found")
        assert health(srv)["status"] == "ok"
    finally:
        os.chmod(srv.functions_dir, mode)
    for _ in range(4):
        hello_ok(srv)
    assert {w.pid for w in workers_of(srv)} == workers
    assert_no_leftovers(srv, time.time())


# -- call history ------------------------------------------------------------------------------------------------
def _history_ids(db_path: str) -> set[str]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return {row[0] for row in db.execute("SELECT request_id FROM calls")}
    finally:
        db.close()


def _calls_recorded(srv: Server, db_path: str, rounds: int = 3, width: int = 6) -> None:
    """Rounds of concurrent calls (so both workers answer some): every one of them reaches the history."""
    ids = []
    for _ in range(rounds):
        for r in concurrently(width, lambda i: srv.get(f"/function/hello?name=h{i}", timeout=10)):
            assert not isinstance(r, Exception) and r.status_code == 200, r
            ids.append(r.headers["X-Request-Id"])

    def missing() -> set[str]:
        try:
            return set(ids) - _history_ids(db_path)
        except sqlite3.Error as e:
            return {repr(e)}

    assert wait_for(lambda: not missing(), 5, 0.1), f"not in the history: {missing()}"


@pytest.mark.timeout(60)
def test_history_locked(make_server, iso):
    srv = start(make_server, iso)
    db_path = os.path.join(srv.data_dir, "history.sqlite3")
    _calls_recorded(srv, db_path, rounds=1)
    holder = sqlite3.connect(db_path, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        locked_until = time.monotonic() + 3
        n = 0
        while time.monotonic() < locked_until and n < 100:
            n += 1
            for t, r in concurrently(4, lambda i: timed_get(srv, f"/function/hello?name=L{i}", 10)):
                assert r.status_code == 200 and r.text.startswith("Hello L"), r.text
                assert t < 2.5, f"a call waited {t:.2f} s for the locked history"
        holder.execute("COMMIT")
    finally:
        holder.close()
    assert wait_for(lambda: "call history: database is locked" in srv.read_log(), 5), srv.read_log()[-2000:]
    _calls_recorded(srv, db_path)


@pytest.mark.timeout(60)
def test_history_corrupt(make_server, iso):
    srv = start(make_server, iso)
    db_path = os.path.join(srv.data_dir, "history.sqlite3")
    _calls_recorded(srv, db_path, rounds=1)
    for suffix in ("", "-wal", "-shm"):  # garbage in place (same files): the writers' connections see it
        path = db_path + suffix
        if os.path.exists(path):
            with open(path, "r+b") as f:
                f.write(os.urandom(max(8192, os.path.getsize(path))))
    for _ in range(3):
        for t, r in concurrently(4, lambda i: timed_get(srv, f"/function/hello?name=C{i}", 10)):
            assert r.status_code == 200 and r.text == f"Hello {r.text[6:-1]}!", r.text
            assert t < 2.5, t
    assert wait_for(lambda: "call history: file is not a database" in srv.read_log()
                    or "call history: database disk image is malformed" in srv.read_log(), 5), \
        srv.read_log()[-2000:]
    # The cause goes away: the operator removes the corrupt files (the server keeps running).
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.unlink(db_path + suffix)
    _calls_recorded(srv, db_path)
    assert os.stat(db_path).st_mode & 0o777 == 0o600  # made again as private as at start
    assert health(srv)["status"] == "ok"
