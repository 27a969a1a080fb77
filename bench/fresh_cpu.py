"""`python -m bench.fresh_cpu [N] [TREE ...]` (as root): CPU per fresh `hello` call of a real fnbox server, by
process, from N sequential calls: the gateway worker, and the fork server with every child it reaped (calls,
spares: what `getrusage` charges to it and its children). Each TREE is a checkout of fnbox to compare (default:
this one); a TREE of the form `PATH:VAR=VALUE` runs with that environment variable set. CPU time, unlike req/s,
barely moves when other work shares the machine, so two trees can be compared on a busy machine.
"""

from __future__ import annotations

import statistics
import sys
import time

import psutil

from tests import conftest
from tests.conftest import REPO, Server
from tests.faultkit import fork_servers, workers_of

HELLO = open(f"{REPO}/bench/functions/hello.py").read()


def _cpu(p: psutil.Process, children: bool) -> float:
    t = p.cpu_times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


def measure(tree: str, env: dict[str, str], n: int) -> tuple[float, float, float]:
    conftest.REPO = tree
    s = Server(functions={"hello": HELLO}, env=env, workers=1)
    try:
        s.start()
        for _ in range(20):  # warm-up: the fork server and its first slots
            s.get("/function/hello")
        worker = workers_of(s)[0]
        fs = psutil.Process(next(iter(fork_servers(s))))
        w0, f0, t0 = _cpu(worker, False), _cpu(fs, True), time.perf_counter()
        for _ in range(n):
            assert s.get("/function/hello").status_code == 200
        time.sleep(0.3)  # the last call's reaping
        w1, f1, t1 = _cpu(worker, False), _cpu(fs, True), time.perf_counter()
        return (w1 - w0) / n * 1000, (f1 - f0) / n * 1000, (t1 - t0) / n * 1000
    finally:
        s.stop()
        conftest.REPO = REPO


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 200
    trees = argv[1:] or [REPO]
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in trees}
    for _ in range(3):  # interleaved rounds: every tree sees the same load
        for t in trees:
            path, _, var = t.partition(":")
            env = dict([var.split("=", 1)]) if var else {}
            results[t].append(measure(path, env, n))
    print(f"{n} sequential calls x 3 rounds, medians (load average {psutil.getloadavg()[0]:.1f})")
    print("| tree | gateway worker ms/call | fork server + children ms/call | wall ms/call |")
    print("| --- | ---: | ---: | ---: |")
    for t, rows in results.items():
        print(f"| {t} | " + " | ".join(f"{statistics.median(r[i] for r in rows):.2f}" for i in range(3)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
