"""The idle-memory measures of ops/gunicorn.conf.py, as a real server shows them (memory sizes are the
benchmark's job, bench/memstats.py): the master imports the gateway's modules before forking the workers and
says so, while every per-worker thing (threads, fork server, metrics files) stays in the workers; the workers'
malloc arenas follow FNBOX_MALLOC_ARENA_MAX, which is validated like every FNBOX_* setting."""

from __future__ import annotations

import glob
import os
import re
import signal
import time

import psutil
import pytest
import requests

from runner.config import ConfigError, Settings
from tests.faultkit import fork_servers, workers_of, zygotes_of

HELLO = {"hello": "def main(request):\n    return 'Hello World!'\n"}


def _wait_log(srv, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    log = srv.read_log()
    while text not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = srv.read_log()
    return log


def test_master_shares_modules_but_runs_nothing_per_worker(make_server):
    srv = make_server(functions=HELLO, workers=2).start()
    log = _wait_log(srv, "malloc arenas per worker")
    assert "modules imported in the master and shared with the workers" in log, log
    assert "malloc arenas per worker: 2 (FNBOX_MALLOC_ARENA_MAX)" in log, log
    for _ in range(4):  # both workers answer calls with what they inherited
        r = srv.get("/function/hello")
        assert r.status_code == 200 and r.text == "Hello World!", r.text
    master = psutil.Process(srv.proc.pid)
    # Single-threaded, and its only children are the workers and the fork-server zygote: no fork server, history
    # writer or queue thread.
    assert master.num_threads() == 1
    workers, zygotes = workers_of(srv), zygotes_of(srv)
    assert len(workers) == 2 and len(zygotes) == 1 and len(master.children()) == 3
    assert all("runner.forkserver" not in " ".join(w.cmdline()) for w in workers)
    assert sorted(fork_servers(srv).values()) == sorted(w.pid for w in workers)  # one each, forked by the zygote
    # /metrics lists the workers' files only: the master's, made by importing gateway.metrics, are gone.
    assert "fnbox_calls_total" in srv.get("/metrics").text
    dirs = {d for w in workers for d in (p.rsplit("/", 1)[0] for p in glob.glob(f"/tmp/fnbox-metrics-*/*_{w.pid}.db"))}
    assert len(dirs) == 1, dirs
    assert glob.glob(f"{dirs.pop()}/*_{master.pid}.db") == []


def test_malloc_arena_max_zero_keeps_the_c_library_default(make_server):
    srv = make_server(functions=HELLO, env={"FNBOX_MALLOC_ARENA_MAX": "0"}).start()
    log = _wait_log(srv, "modules imported in the master")
    assert "malloc arenas per worker" not in log, log
    assert srv.get("/function/hello").text == "Hello World!"


@pytest.mark.parametrize("value, reason", [("x", "must be an integer"), ("-1", "must be at least 0")])
def test_invalid_malloc_arena_max_refuses_to_start(make_server, value, reason):
    srv = make_server(functions=HELLO, env={"FNBOX_MALLOC_ARENA_MAX": value})
    srv.start(wait=False)
    assert srv.proc.wait(30) != 0
    log = srv.read_log()
    assert "refusing to start" in log and f"FNBOX_MALLOC_ARENA_MAX={value!r}: {reason}" in log, log
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/healthz", timeout=2)


def test_malloc_arena_max_setting():
    assert Settings.from_env({}).malloc_arena_max == 2
    assert Settings.from_env({"FNBOX_MALLOC_ARENA_MAX": "4"}).malloc_arena_max == 4
    s = Settings.from_env({"FNBOX_MALLOC_ARENA_MAX": "1"})
    assert Settings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="FNBOX_MALLOC_ARENA_MAX"):
        Settings.from_env({"FNBOX_MALLOC_ARENA_MAX": "many"})


def test_reload_imports_fnbox_modules_again_before_new_workers(make_server):
    """SIGHUP is the documented upgrade (`systemctl reload fnbox`): new workers fork from the master, so the
    master must import fnbox's modules again from disk, not hand them the previous release's."""
    srv = make_server(functions=HELLO).start()
    line = "modules imported in the master and shared with the workers"
    assert line in _wait_log(srv, line)
    master = psutil.Process(srv.proc.pid)
    old = {w.pid for w in workers_of(srv)}
    os.kill(master.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [ln for ln in srv.read_log().splitlines() if line in ln]
        new = {w.pid for w in workers_of(srv)}
        if len(lines) == 2 and new and not new & old:
            break
        time.sleep(0.1)
    assert len(lines) == 2, srv.read_log()
    count = int(re.search(r"fnbox: (\d+) modules imported", lines[1]).group(1))
    assert count >= 20, lines[1]  # gateway.*, runner.*, jobs.*: imported anew, not found in sys.modules
    assert not new & old, (old, new)
    srv.wait_healthy()
    r = srv.get("/function/hello")
    assert r.status_code == 200 and r.text == "Hello World!", r.text
    assert master.num_threads() == 1


def test_a_board_without_redis_never_loads_the_redis_client():
    """The master imports every module a worker uses, and each stays in every process's memory: the Redis
    client (with redis.asyncio, ~90 modules) belongs only to a server configured with FNBOX_REDIS_URL."""
    import subprocess
    import sys

    probe = ("import sys, gateway.app\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'rq', 'asyncio')))\n")
    env = {k: v for k, v in os.environ.items() if k != "FNBOX_REDIS_URL"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
