"""Async calls benchmark: enqueue rate, completion rate and enqueue-to-done latency (p50/p99), on one board
(the embedded SQLite queue, and RQ on Redis) and on three boards (RQ on Redis behind nginx).

Usage: .venv/bin/python bench/async_bench.py [--calls N] [--clients C]

Each configuration gets fresh real servers (the test harness's: Gunicorn, a real redis-server with a password
and fsync on every write, a real nginx upstream). C client threads POST N calls of a trivial function to
/async-function/hello as fast as the servers accept them; the rates and latencies come from the call records
(queued_at, finished_at) that GET /admin/queue returns. Prints a Markdown table (docs/cluster.md keeps one).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.asynckit import board_uid_base  # noqa: E402
from tests.conftest import Server  # noqa: E402
from tests.rediskit import RedisServer  # noqa: E402
from tests.test_nginx import Nginx  # noqa: E402

TOKEN = "bench-" + os.urandom(8).hex()
HELLO = {"hello": "def main(request):\n    return 'hello'\n"}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def drive(url: str, admin: Server, calls: int, clients: int) -> dict[str, float]:
    ids: list[str] = []
    lock = threading.Lock()
    budget = iter(range(calls))
    refused = 0

    def client() -> None:
        nonlocal refused
        s = requests.Session()
        while True:
            with lock:
                if next(budget, None) is None:
                    return
            while True:
                r = s.post(f"{url}/async-function/hello", timeout=30)
                if r.status_code == 202:
                    with lock:
                        ids.append(r.json()["call_id"])
                    break
                with lock:
                    refused += 1
                time.sleep(0.05)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    enqueue_s = time.monotonic() - t0
    deadline = time.monotonic() + 600
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wanted, done = set(ids), {}
    while True:
        # The listing holds the latest 1000 finished calls: gathered across polls, a run of more calls than
        # that is still counted whole (each poll sees the calls finished since the last one).
        listed = admin.get("/admin/queue?limit=1000&state=done", headers=auth).json()["calls"]
        done.update((c["call_id"], c) for c in listed if c["call_id"] in wanted)
        if len(done) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    recs = list(done.values())
    lat = [(c["finished_at"] - c["queued_at"]) * 1000 for c in recs]
    first = min(c["queued_at"] for c in recs)
    last = max(c["finished_at"] for c in recs)
    boards = {c["ran_on"] for c in recs}
    return {"calls": len(ids), "done": len(recs), "enqueue_rate": len(ids) / enqueue_s,
            "completion_rate": len(recs) / (last - first), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "refused": refused, "boards": len(boards)}


def one_board(redis_url: str | None) -> tuple[Callable[[], None], str, Server]:
    env = {"FNBOX_ADMIN_TOKEN": TOKEN, "FNBOX_QUEUE_MAX": "100000", "FNBOX_BOARD": "b1"}
    if redis_url:
        env["FNBOX_REDIS_URL"] = redis_url
    s = Server(functions=HELLO, env=env, workers=2, threads=16).start()
    return s.stop, s.url, s


def three_boards(redis_url: str) -> tuple[Callable[[], None], str, Server]:
    boards = [Server(functions=HELLO, env={"FNBOX_ADMIN_TOKEN": TOKEN, "FNBOX_QUEUE_MAX": "100000",
                                           "FNBOX_REDIS_URL": redis_url, "FNBOX_BOARD": f"b{i + 1}",
                                           "FNBOX_UID_BASE": str(board_uid_base(i))},
                     workers=2, threads=16).start() for i in range(3)]
    nginx = Nginx(f"127.0.0.1:{boards[0].port}", boards[0].profiles_dir)
    site = os.path.join(nginx.dir, "fnbox.conf")
    with open(site) as f:
        text = f.read()
    servers = "\n".join(f"    server 127.0.0.1:{b.port} max_fails=1 fail_timeout=10s;" for b in boards)
    with open(site, "w") as f:
        f.write(re.sub(r"^\s*server 127\.0\.0\.1:\d+;", servers, text, count=1, flags=re.M))
    nginx.start()

    def stop() -> None:
        nginx.stop()
        for b in boards:
            b.stop()

    return stop, f"http://127.0.0.1:{nginx.port}", boards[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args(argv)
    rows = []
    for label in ("1 board, SQLite (embedded)", "1 board, RQ on Redis", "3 boards, RQ on Redis, nginx"):
        redis = RedisServer().start() if "Redis" in label else None
        try:
            if "3 boards" in label:
                stop, url, admin = three_boards(redis.url)  # type: ignore[union-attr]
            else:
                stop, url, admin = one_board(redis.url if redis else None)
            try:
                requests.post(f"{url}/async-function/hello", timeout=30)  # warm: first fork, first connection
                time.sleep(1)
                r = drive(url, admin, args.calls, args.clients)
            finally:
                stop()
        finally:
            if redis:
                redis.cleanup()
        rows.append((label, r))
        print(f"{label}: {r}", file=sys.stderr, flush=True)
    print(f"\n{args.calls} calls of a trivial function, {args.clients} client threads, each board: 2 Gunicorn "
          f"workers x 2 queue threads (FNBOX_ASYNC_CONCURRENCY), all on one {os.cpu_count()}-core machine.\n")
    print("| setup | enqueue rate (calls/s) | completion rate (calls/s) | enqueue-to-done p50 (ms) | p99 (ms) "
          "| boards that ran calls |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        print(f"| {label} | {r['enqueue_rate']:.0f} | {r['completion_rate']:.0f} | {r['p50']:.0f} | "
              f"{r['p99']:.0f} | {r['boards']:.0f} |")
    print(f"\n(done: {sum(int(r['done']) for _, r in rows)} of {sum(int(r['calls']) for _, r in rows)} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
