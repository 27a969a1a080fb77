"""Memory measurements: idle PSS of a whole server, and USS added per in-flight call.

`.venv/bin/python bench/memstats.py <Gunicorn master pid>` prints the PSS, USS and RSS of every process of a
running fnbox server by role (master, worker, fork server, spare or call), the breakdown docs/performance.md's
"Idle memory" tables come from.

PSS (proportional set size) charges each shared page to its sharers in equal parts, so summing it over a
process tree counts the pages that Gunicorn workers and fork servers share copy-on-write once, not once per
process; RSS would overstate a forking design several times over. Per in-flight call we sum USS (pages
private to a process) over the processes that appeared for the calls: what each call really adds.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import requests
from servers import Server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for runner/
from runner.zygote import FORK_SERVER_PREFIX, ZYGOTE_NAME  # noqa: E402  (the names it gives its processes)

MB = 1024 * 1024


@dataclass(frozen=True)
class TreePss:
    processes: int
    pss_bytes: int


@dataclass(frozen=True)
class InflightUss:
    calls: int
    ok: int  # calls that answered 200
    new_processes: int  # processes under the server that were not there at idle
    uss_bytes: int  # sum of USS over those processes, measured while the calls were in flight

    @property
    def per_call_bytes(self) -> float:
        return self.uss_bytes / self.calls if self.calls else 0.0


def tree_pss(server: Server) -> TreePss:
    """Total PSS of the master and all its descendants."""
    total = 0
    procs = server.processes()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return TreePss(processes=len(procs), pss_bytes=total)


def _identities(server: Server) -> set[tuple[int, float]]:
    ids = set()
    for p in server.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            ids.add((p.pid, p.create_time()))
    return ids


def inflight_uss(server: Server, path: str, calls: int, call_seconds: float) -> InflightUss:
    """Start ``calls`` concurrent GETs of a function that sleeps ``call_seconds``, measure while they run.

    New processes are identified by (pid, create time) against an idle snapshot, so a pid reused between the
    snapshot and the measurement is still seen as new. Measurement happens once the expected number of
    new processes exists, plus a short settle so each has finished starting up and is inside main(); at
    80 % of the call's duration at the latest, so the calls are certainly still in flight. The caller keeps
    ``calls`` within the gateway's thread capacity, else some calls would still be queued and the figure
    would be low.
    """
    idle = _identities(server)
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            status = requests.get(server.base_url + path, timeout=call_seconds + 15).status_code
        except requests.RequestException:
            status = 0
        with lock:
            results.append(status)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(calls)]
    started = time.monotonic()
    for t in threads:
        t.start()

    def new_processes() -> list[psutil.Process]:
        out = []
        for p in server.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if (p.pid, p.create_time()) not in idle:
                    out.append(p)
        return out

    latest = started + 0.8 * call_seconds
    while time.monotonic() < latest and len(new_processes()) < calls:
        time.sleep(0.05)
    time.sleep(min(0.3, max(0.0, latest - time.monotonic())))
    fresh = new_processes()
    uss = 0
    for p in fresh:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            uss += p.memory_full_info().uss

    for t in threads:
        t.join(timeout=max(0.0, started + call_seconds + 20 - time.monotonic()))
    return InflightUss(
        calls=calls,
        ok=sum(1 for s in results if s == 200),
        new_processes=len(fresh),
        uss_bytes=uss,
    )


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    role: str  # master, worker, zygote, fork server, spare/call (a fork server's child)
    threads: int
    pss: int
    uss: int
    rss: int


def _is_fork_server_family(proc: psutil.Process) -> bool:
    """A fork server or one of its children: forked by the zygote (named FORK_SERVER_PREFIX + the worker's pid)
    or started by its worker (FNBOX_ZYGOTE=0: `python -m runner.forkserver`)."""
    return proc.name().startswith(FORK_SERVER_PREFIX) or "runner.forkserver" in " ".join(proc.cmdline())


def role(proc: psutil.Process, master: int) -> str:
    """master, zygote, worker, fork server, spare/call (a fork server's child: a spare, call or warm instance)."""
    if proc.pid == master:
        return "master"
    if proc.name() == ZYGOTE_NAME:
        return "zygote"
    if _is_fork_server_family(proc):
        parent = proc.parent()
        return "spare/call" if parent is not None and _is_fork_server_family(parent) else "fork server"
    return "worker" if proc.ppid() == master else "other"


def breakdown(master_pid: int) -> list[ProcessMemory]:
    """Every process of the server whose Gunicorn master is master_pid, with its role and memory."""
    master = psutil.Process(master_pid)
    out = []
    for p in [master, *master.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            m = p.memory_full_info()
            out.append(ProcessMemory(p.pid, role(p, master_pid), p.num_threads(), m.pss, m.uss, m.rss))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: memstats.py <Gunicorn master pid>", file=sys.stderr)
        return 2
    rows = breakdown(int(argv[0]))
    print(f"{'role':<12} {'pid':>7} {'threads':>7} {'PSS MB':>7} {'USS MB':>7} {'RSS MB':>7}")
    for r in rows:
        print(f"{r.role:<12} {r.pid:>7} {r.threads:>7} {r.pss / MB:>7.1f} {r.uss / MB:>7.1f} {r.rss / MB:>7.1f}")
    print(f"{'total':<12} {len(rows):>7} {'':>7} {sum(r.pss for r in rows) / MB:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
