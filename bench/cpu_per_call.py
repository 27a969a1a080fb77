"""CPU per call by process (gateway workers, fork servers, warm instances or fresh children, wrk), side by side
with the seed: a profiling aid for docs/performance.md, not part of `make bench`.

Usage: .venv/bin/python bench/cpu_per_call.py [--seconds S] [--connections C] [--threads T] [--keep]
                                               [--servers seed,fnbox-opt]
Runs wrk against GET /function/hello for S seconds per server and prints, per role, CPU ms per answered call
(process CPU times before and after, children reaped by a process counted to it; user and system apart), and
req/s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import memstats
import psutil
from run import OPT_SERVER, gunicorn_settings, prepare_workdir, start_server
from servers import stop, wait_http_ok, wait_quiet


def _role(p: psutil.Process, master: int) -> str:
    try:
        return memstats.role(p, master)
    except psutil.Error:
        return "gone"


def _snapshot(root: psutil.Process) -> dict[int, tuple[str, float, float]]:
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (_role(p, root.pid), t.user + t.children_user, t.system + t.children_system)
        except psutil.Error:
            pass
    return out


def measure(server, seconds: float, connections: int) -> None:
    root = psutil.Process(server.proc.pid)
    url = server.base_url + "/function/hello"
    subprocess.run(["wrk", "-t1", "-c", str(connections), "-d", "2s", url], capture_output=True, check=True)
    wait_quiet(server, timeout_s=10)
    before = _snapshot(root)
    t0 = time.monotonic()
    wrk = subprocess.Popen(["wrk", "-t1", "-c", str(connections), "-d", f"{int(seconds)}s", url],
                           stdout=subprocess.PIPE, text=True)
    wrk_ps = psutil.Process(wrk.pid)
    out, _ = wrk.communicate()
    wall = time.monotonic() - t0
    after = _snapshot(root)
    n = 0
    for line in out.splitlines():
        if "requests in" in line:
            n = int(line.split()[0])
    del wrk_ps
    if not n:
        print(out)
    by_role: dict[str, list[float]] = {}
    for pid, (role, user, system) in after.items():
        _, user0, system0 = before.get(pid, (role, 0.0, 0.0))
        acc = by_role.setdefault(role, [0.0, 0.0])
        acc[0] += user - user0
        acc[1] += system - system0
    per = 1000 / max(n, 1)
    print(f"{server.name}: {n} calls, {n / wall:.0f} req/s at {connections} connections")
    for role, (user, system) in sorted(by_role.items()):
        print(f"  {role:16s} {(user + system) * per:6.3f} ms CPU per call "
              f"(user {user * per:.3f}, system {system * per:.3f})")
    total = sum(u + s for u, s in by_role.values())
    print(f"  {'total':16s} {total * per:6.3f} ms CPU per call")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--servers", default=f"seed,{OPT_SERVER}")
    p.add_argument("--threads", type=int, default=None, help="Gunicorn threads per worker (default: the conf's)")
    p.add_argument("--keep", action="store_true", help="keep the servers running until Enter")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fnbox-cpu-"))
    paths = prepare_workdir(tmp)
    settings = gunicorn_settings(None, args.threads)
    servers = [start_server(name, paths, settings) for name in args.servers.split(",")]
    try:
        for s in servers:
            wait_http_ok(s, "/healthz" if s.name.startswith("fnbox") else "/function/hello")
        for s in servers:
            measure(s, args.seconds, args.connections)
        if args.keep:
            print("servers:", ", ".join(f"{s.name} {s.base_url} pid {s.proc.pid}" for s in servers), flush=True)
            sys.stdin.readline()
    finally:
        for s in servers:
            stop(s)


if __name__ == "__main__":
    main()
