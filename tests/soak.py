"""Soak: a real server (2 workers) under a mix of concurrent calls for a bounded time, then a leak check.

    .venv/bin/python tests/soak.py                 # short form, 60 s of load (tests/test_soak.py runs it)
    .venv/bin/python tests/soak.py --minutes 10    # long form

Mostly `hello`, a JSON echo and a warm function (reuse_calls), plus hostile calls with small limits from
functions.toml, so they end fast: busy loops, memory bombs, crashes, fork bombs, output floods, sleepers past their
timeout, and a warm function that breaches its limits on every call. A `limits` call
reports the cgroup limits it runs under, which must be those of its own profile. Before any hostile call runs, the
sandbox layers containing it must be active (as tests/test_attacks.py requires): otherwise the soak stops.

Recorded: every good call answered 200 with the right body; every bad call answered with its expected error; the
RSS (sum over master, workers and fork servers), open fds and threads of the server, idle, after a warm-up (every
request thread started, then the same mix for a tenth of the duration, 10 to 60 s) and at the end; zombies; fork
servers or workers replaced; sandbox processes, scratch folders and files left behind while the server idles and
after it stopped. Some fds are caches bounded by configuration (per sandbox slot a fork server used: a lock file
and an empty network namespace; per concurrency place a worker tried: a lock file): checked against those bounds
instead. One summary table; the exit status is
1 if a call got a wrong answer, RSS grew by more than 10 MB, other fds or threads grew, a server process was
replaced or anything was left behind.

Worker RSS grows, boundedly, while the history database grows: SQLite's page cache of each worker's history
writer (2 MB by default) fills up. Measured: with a 64 KiB cache the workers' RSS stays flat over 14 000 calls.

Bounded: the load stops at the deadline (and after --max-calls calls), every request has a timeout, every wait
is bounded. The server runs its calls as uids of its own with its own scratch folder (tests/faultkit.py), is stopped
by its pid, and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import psutil  # noqa: E402
import requests  # noqa: E402

from runner.config import Settings  # noqa: E402
from runner.profiles import load_profiles  # noqa: E402
from tests.conftest import Server  # noqa: E402
from tests.faultkit import (  # noqa: E402
    SOAK_UID_BASE,
    everything_gone,
    follow,
    fork_servers,
    isolated_env,
    leftovers,
    make_scratch_dir,
    server_processes,
    spares_per_fork_server,
    workers_of,
    zygotes_of,
)

MiB = 1024 * 1024
RSS_GROWTH_LIMIT = 10 * MiB
STOP = threading.Event()  # SIGTERM/SIGINT: the clients stop, the server is stopped, the soak fails

with open(os.path.join(REPO, "functions", "hello.py")) as _f:
    HELLO_SRC = _f.read()

FUNCTIONS = {
    "hello": HELLO_SRC,
    "echo": """
        def main(request):
            return request.get_json()
    """,
    # Reports the limits its call runs under (cgroup v1 memory and pids).
    "limits": """
        def _read(path):
            with open(path) as f:
                return f.read().strip()

        def main(request):
            groups = {}
            with open("/proc/self/cgroup") as f:
                for line in f:
                    _, ctrls, path = line.rstrip("\\n").split(":", 2)
                    for c in ctrls.split(","):
                        groups[c] = path
            mem = int(_read("/sys/fs/cgroup/memory" + groups["memory"] + "/memory.limit_in_bytes"))
            return {"memory_mb": mem >> 20, "pids_max": _read("/sys/fs/cgroup/pids" + groups["pids"] + "/pids.max")}
    """,
    "busy_loop": """
        def main(request):
            while True:
                pass
    """,
    "memory_bomb": """
        import time
        def main(request):
            hoard = []
            while True:
                hoard.append(b"x" * (4 << 20))
                time.sleep(0.001)
    """,
    "crash": """
        import os
        def main(request):
            os._exit(3)
    """,
    "fork_bomb": """
        import os
        def main(request):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """,
    "output_flood": """
        import sys
        def main(request):
            line = "y" * 65536 + "\\n"
            for _ in range(64):  # 4 MiB of log: max_log_kb keeps 16 KiB of it
                sys.stdout.write(line)
            return "z" * (1 << 20)  # 1 MiB body: over max_response_kb
    """,
    "sleeper": """
        import time
        def main(request):
            time.sleep(30)
            return "woke up"
    """,
    # Warm instances (reuse_calls, functions.toml below): module state counts the calls one process served.
    "warm_count": """
        CALLS = 0
        def main(request):
            global CALLS
            CALLS += 1
            return {"name": request.args.get("name", ""), "calls": CALLS}
    """,
    # A warm function whose every call breaches its limits: each ends its instance.
    "warm_spin": """
        def main(request):
            while True:
                pass
    """,
}

# Small limits, so that each bad call ends within about a second. `limits` keeps the default profile.
PROFILES = {"functions.toml": """
    [busy_loop]
    timeout_s = 1
    cpu_s = 1
    [memory_bomb]
    memory_mb = 64
    timeout_s = 5
    [crash]
    timeout_s = 2
    [fork_bomb]
    timeout_s = 1
    cpu_s = 2
    max_processes = 8
    [output_flood]
    timeout_s = 5
    max_response_kb = 64
    max_log_kb = 16
    [sleeper]
    timeout_s = 0.5
    [warm_count]
    reuse_calls = 50
    idle_s = 1
    [warm_spin]
    reuse_calls = 20
    idle_s = 1
    timeout_s = 1
    cpu_s = 1
"""}
DEFAULT_LIMITS = {"memory_mb": 128, "pids_max": "16"}  # sandbox_profiles/default.toml


@dataclass
class Kind:
    name: str
    weight: int
    good: bool
    expect: str  # for the table
    request: Callable[[random.Random], dict[str, Any]]  # requests kwargs (params/json)
    check: Callable[[dict[str, Any], requests.Response], str | None]  # None: right; else what is wrong


def _hello_req(rng: random.Random) -> dict[str, Any]:
    return {"params": {"name": f"n{rng.randrange(10**6)}"}}


def _hello_check(req: dict[str, Any], r: requests.Response) -> str | None:
    want = f"Hello {req['params']['name']}!"
    return None if (r.status_code, r.text) == (200, want) else f"{r.status_code} {r.text[:200]!r}"


def _echo_req(rng: random.Random) -> dict[str, Any]:
    doc = {"id": rng.randrange(10**9), "tags": [f"t{rng.randrange(100)}" for _ in range(rng.randrange(8))],
           "nested": {"x": rng.random(), "s": "é✓" * rng.randrange(200)}, "ok": rng.random() < 0.5}
    return {"json": doc}


def _echo_check(req: dict[str, Any], r: requests.Response) -> str | None:
    try:
        ok = r.status_code == 200 and r.json() == req["json"]
    except ValueError:
        ok = False
    return None if ok else f"{r.status_code} {r.text[:200]!r}"


def _limits_check(req: dict[str, Any], r: requests.Response) -> str | None:
    try:
        ok = r.status_code == 200 and r.json() == DEFAULT_LIMITS
    except ValueError:
        ok = False
    return None if ok else f"{r.status_code} {r.text[:200]!r} (its profile: {DEFAULT_LIMITS})"


WARM_REUSED: list[int] = []  # call counts above 1 that warm_count answered: its instances were reused


def _warm_check(req: dict[str, Any], r: requests.Response) -> str | None:
    try:
        doc = r.json()
        ok = r.status_code == 200 and doc["name"] == req["params"]["name"] and 1 <= doc["calls"] <= 50
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return f"{r.status_code} {r.text[:200]!r}"
    if doc["calls"] > 1:
        WARM_REUSED.append(doc["calls"])
    return None


def _error_check(status: int, error: str) -> Callable[[dict[str, Any], requests.Response], str | None]:
    def check(req: dict[str, Any], r: requests.Response) -> str | None:
        try:
            got = r.json().get("error") if r.headers.get("Content-Type", "").startswith("application/json") else None
        except ValueError:
            got = None
        return None if (r.status_code, got) == (status, error) else f"{r.status_code} {r.text[:200]!r}"

    return check


KINDS = [
    Kind("hello", 40, True, "200 Hello <name>!", _hello_req, _hello_check),
    Kind("echo", 30, True, "200 the same JSON", _echo_req, _echo_check),
    Kind("limits", 6, True, "200 its own limits", lambda rng: {}, _limits_check),
    Kind("busy_loop", 4, False, "504 timeout", lambda rng: {}, _error_check(504, "timeout")),
    Kind("memory_bomb", 4, False, "502 memory_limit", lambda rng: {}, _error_check(502, "memory_limit")),
    Kind("crash", 4, False, "502 crashed", lambda rng: {}, _error_check(502, "crashed")),
    Kind("fork_bomb", 3, False, "504 timeout", lambda rng: {}, _error_check(504, "timeout")),
    Kind("output_flood", 4, False, "502 output_limit", lambda rng: {}, _error_check(502, "output_limit")),
    Kind("sleeper", 5, False, "504 timeout", lambda rng: {}, _error_check(504, "timeout")),
    Kind("warm_count", 12, True, "200 name, a count", _hello_req, _warm_check),
    Kind("warm_spin", 3, False, "504 timeout (warm)", lambda rng: {}, _error_check(504, "timeout")),
]


@dataclass
class Stats:
    calls: int = 0
    right: int = 0
    latencies: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # the first few wrong answers


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


# -- the server's footprint ----------------------------------------------------------------------------------------
def _fd_targets(pid: int) -> list[str]:
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def footprint(srv: Server) -> dict[str, int]:
    """RSS, threads and open fds of master + workers + fork servers. Some fds are caches bounded by configuration,
    counted apart and checked against their bounds: a fork server keeps a lock file and an empty network namespace
    per sandbox slot it ever used (at most 2 x FNBOX_SANDBOX_SLOTS), a worker a lock file per concurrency place it
    ever tried (at most the sum of max_concurrency plus max_calls). Every other fd must be back to its count at
    the start."""
    settings = Settings.from_env(srv.env)
    slot_locks = settings.slot_registry + "/"
    conc_locks = os.path.join(settings.state_dir, "concurrency") + "/"
    out = {"rss": 0, "fds": 0, "threads": 0, "slot_lock_fds": 0, "concurrency_lock_fds": 0,
           "rss_master": 0, "rss_workers": 0, "rss_fork_servers": 0}
    master, workers = srv.proc.pid, {w.pid for w in workers_of(srv)}
    for p in server_processes(srv):
        try:
            with p.oneshot():
                rss = p.memory_info().rss
                out["threads"] += p.num_threads()
        except psutil.Error:
            continue
        out["rss"] += rss
        out["rss_master" if p.pid == master else "rss_workers" if p.pid in workers else "rss_fork_servers"] += rss
        slots = conc = 0
        for target in _fd_targets(p.pid):
            if target.startswith(slot_locks) or target.startswith("net:["):
                slots += 1  # a lock file and an empty network namespace per slot used
            elif target.startswith(conc_locks):
                conc += 1
            else:
                out["fds"] += 1
        out["slot_lock_fds"] = max(out["slot_lock_fds"], slots)  # the most of one process
        out["concurrency_lock_fds"] = max(out["concurrency_lock_fds"], conc)
    return out


def fd_kinds(srv: Server) -> dict[str, dict[str, int]]:
    """Per server process (role:pid), its open fds by kind (socket, pipe, anon_inode:..., /path/prefix)."""
    roles = {srv.proc.pid: "master"}
    roles.update({w.pid: "worker" for w in workers_of(srv)})
    roles.update({z.pid: "zygote" for z in zygotes_of(srv)})
    roles.update({f: "fork server" for f in fork_servers(srv)})
    out: dict[str, dict[str, int]] = {}
    for pid, role in roles.items():
        kinds: dict[str, int] = defaultdict(int)
        for target in _fd_targets(pid):
            kinds[target.split(":[")[0] if ":[" in target else "/".join(target.split("/")[:4])] += 1
        out[f"{role}:{pid}"] = dict(kinds)
    return out


def zombies(srv: Server) -> list[int]:
    try:
        tree = psutil.Process(srv.proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in tree:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def wait_idle(srv: Server, timeout: float = 20.0) -> bool:
    """No call in flight: every fork server has at most its spares as children (no call, no janitor). A spare
    keeps root's uid until it gets a call (the file system view is entered then), so children are counted, not
    told apart by uid."""
    allowed = spares_per_fork_server(srv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for fs in fork_servers(srv):
            try:
                kids = psutil.Process(fs).children()
            except psutil.Error:
                continue
            if len(kids) > allowed:  # calls beyond the spares, or a janitor
                busy = True
        if not busy:
            return True
        time.sleep(0.1)
    return False


def least(srv: Server, seconds: float) -> dict[str, int]:
    """The smallest footprint sampled over a few seconds of idleness."""
    best = footprint(srv)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = footprint(srv)
        best = {k: min(best[k], now[k]) for k in best}
    return best


def settle(srv: Server, start: dict[str, int], seconds: float = 10.0) -> dict[str, int]:
    """The footprint once idle: sampled for up to `seconds` until fds and threads are back to their start values
    (keep-alive connections closing, a thread finishing its last call); RSS is the smallest sample."""
    deadline = time.monotonic() + seconds
    best = footprint(srv)
    while time.monotonic() < deadline:
        if best["fds"] <= start["fds"] and best["threads"] <= start["threads"] and best["rss"] <= start["rss"]:
            break
        time.sleep(0.5)
        now = footprint(srv)
        best = {k: min(best[k], now[k]) for k in best}
    return best


# -- safety --------------------------------------------------------------------------------------------------------
def check_layers(srv: Server) -> list[str]:
    """The layers that contain the hostile calls, from /healthz and from inside a real call with their limits."""
    problems = []
    sandbox = srv.get("/healthz", timeout=10).json().get("sandbox", {})
    for layer in ("uid_pool", "memory_cgroup", "pids_cgroup"):
        if not str(sandbox.get(layer, "")).startswith("active"):
            problems.append(f"{layer}: {sandbox.get(layer)}")
    r = srv.get("/function/limits", timeout=10)
    if r.status_code != 200 or r.json() != DEFAULT_LIMITS:
        problems.append(f"a call does not run under its profile's cgroup limits: {r.status_code} {r.text[:200]}")
    return problems


# -- the load ------------------------------------------------------------------------------------------------------
def run_load(srv: Server, seconds: float, clients: int, seed: int, max_calls: int,
             timeline: list[dict[str, Any]]) -> dict[str, Stats]:
    """The clients, until the deadline; every ~30 s the server's footprint (under load) goes to timeline."""
    stats: dict[str, Stats] = defaultdict(Stats)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    per_client = max(1, max_calls // clients)
    weights = [k.weight for k in KINDS]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with requests.Session() as session:
            for _ in range(per_client):
                if time.monotonic() >= deadline or STOP.is_set():
                    return
                kind = rng.choices(KINDS, weights)[0]
                req = kind.request(rng)
                t0 = time.monotonic()
                try:
                    r = session.post(f"{srv.url}/function/{kind.name}", timeout=30, **req) if "json" in req else \
                        session.get(f"{srv.url}/function/{kind.name}", timeout=30, **req)
                    wrong = kind.check(req, r)
                except requests.RequestException as e:
                    wrong = f"no answer: {e!r}"[:300]
                elapsed = time.monotonic() - t0
                with lock:
                    st = stats[kind.name]
                    st.calls += 1
                    st.latencies.append(elapsed * 1000)
                    if wrong is None:
                        st.right += 1
                    elif len(st.wrong) < 5:
                        st.wrong.append(wrong)

    threads = [threading.Thread(target=client, args=(i,), name=f"soak-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    started = time.monotonic()
    next_sample = started + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 120:  # bounded
        time.sleep(0.2)
        if time.monotonic() >= next_sample:
            fp = footprint(srv)
            timeline.append({"t": round(time.monotonic() - started),
                             **{k: fp[k] for k in ("rss_workers", "rss_fork_servers", "threads", "fds")}})
            next_sample += 30
    return stats


def warm_up(srv: Server, threads: int) -> None:
    """Every kind of call a few times, then waves of concurrent calls until each worker has started all of its
    request threads (Gunicorn's pool grows on demand and never shrinks: growth during the soak is not a leak)."""
    rng = random.Random(0)
    for kind in KINDS:
        for _ in range(3):
            req = kind.request(rng)
            if "json" in req:
                requests.post(f"{srv.url}/function/{kind.name}", timeout=30, **req)
            else:
                requests.get(f"{srv.url}/function/{kind.name}", timeout=30, **req)
    n = threads * len(workers_of(srv)) * 2
    for _ in range(10):  # bounded
        before = footprint(srv)["threads"]
        barrier = threading.Barrier(n)

        def one(barrier: threading.Barrier) -> None:
            try:
                barrier.wait(10)
                requests.get(f"{srv.url}/function/hello", timeout=30)
            except (requests.RequestException, threading.BrokenBarrierError):
                pass

        wave = [threading.Thread(target=one, args=(barrier,)) for _ in range(n)]
        for t in wave:
            t.start()
        for t in wave:
            t.join(60)
        time.sleep(0.5)
        if footprint(srv)["threads"] <= before:
            break


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="load duration (default 60)")
    ap.add_argument("--minutes", type=float, help="load duration in minutes (overrides --seconds)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--max-calls", type=int, default=2_000_000, help="stop after this many calls at the latest")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else args.seconds

    def interrupted(signum: int, frame: object) -> None:
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # so that `finally` stops the server

    scratch = make_scratch_dir("fnbox-soak-scratch-")
    follow(SOAK_UID_BASE, scratch)
    srv = Server(functions=FUNCTIONS, profiles=PROFILES, env=isolated_env(SOAK_UID_BASE, scratch),
                 workers=args.workers, threads=args.threads)
    failures: list[str] = []
    report: dict[str, Any] = {"seconds": seconds, "clients": args.clients, "workers": args.workers,
                              "threads": args.threads, "seed": args.seed}
    stats: dict[str, Stats] = {}
    zero = {k: 0 for k in ("rss", "fds", "threads", "slot_lock_fds", "concurrency_lock_fds", "rss_master",
                           "rss_workers", "rss_fork_servers")}
    start_fp, end_fp, load_s = zero, zero, 0.0
    start_procs: set[int] = set()
    end_procs: set[int] = set()
    all_pids: set[int] = set()
    zombie_pids: list[int] = []
    left_running: dict[str, object] = {}
    try:
        srv.start()
        all_pids.update(srv.pids())
        pset = load_profiles(srv.profiles_dir)
        report["slot_bound"] = 2 * Settings.from_env(srv.env).slots  # a lock fd and a netns fd per slot
        report["concurrency_bound"] = sum(pset.for_function(name).max_concurrency for name in FUNCTIONS) + \
            (srv.get("/healthz", timeout=10).json().get("max_calls") or 0)
        problems = check_layers(srv)
        if problems:
            print("soak: refusing to run hostile calls, a sandbox layer is missing: " + "; ".join(problems),
                  file=sys.stderr)
            return 2
        warm_up(srv, args.threads)
        # Then the mix itself for a while: the allocators' high-water marks (concurrent floods, bodies) are
        # reached before the start is measured, so that growth afterwards is what accumulates.
        warm_s = min(60.0, max(10.0, seconds / 10))
        warm_stats = run_load(srv, warm_s, args.clients, args.seed + 1, args.max_calls, [])
        report["warm_up"] = {"seconds": warm_s, "calls": sum(st.calls for st in warm_stats.values())}
        if not wait_idle(srv):
            failures.append("the server did not become idle after the warm-up")
        start_fp = least(srv, 2.0)
        report["fds_start"] = fd_kinds(srv)
        start_procs = {p.pid for p in server_processes(srv)}
        all_pids |= start_procs
        t_load = time.monotonic()
        report["timeline"] = []
        WARM_REUSED.clear()  # the warm-up's are not the load's
        stats = run_load(srv, seconds, args.clients, args.seed, args.max_calls, report["timeline"])
        load_s = time.monotonic() - t_load
        if not wait_idle(srv):
            failures.append("the server did not become idle after the load")
        since = time.time()
        time.sleep(1)
        end_fp = settle(srv, start_fp)
        report["fds_end"] = fd_kinds(srv)
        end_procs = {p.pid for p in server_processes(srv)}
        all_pids |= end_procs | set(srv.pids())
        zombie_pids = zombies(srv)
        left_running = leftovers(srv, since)
    finally:
        all_pids |= set(srv.pids())
        srv.stop()
    left_stopped = everything_gone(all_pids)
    shutil.rmtree(scratch, ignore_errors=True)

    # -- verdicts ----------------------------------------------------------------------------------------------
    total = sum(s.calls for s in stats.values())
    for kind in KINDS:
        st = stats.get(kind.name, Stats())
        if st.right != st.calls:
            failures.append(f"{kind.name}: {st.calls - st.right} of {st.calls} calls answered wrongly, e.g. "
                            f"{st.wrong[:3]}")
    for kind in KINDS:
        if kind.good and stats.get(kind.name, Stats()).calls == 0:
            failures.append(f"{kind.name}: no call made")
    if stats.get("warm_count", Stats()).calls >= 20 and not WARM_REUSED:
        failures.append("warm_count: no call was served by a reused instance (reuse_calls = 50)")
    report["warm_reused"] = len(WARM_REUSED)
    rss_growth = end_fp["rss"] - start_fp["rss"]
    if rss_growth > RSS_GROWTH_LIMIT:
        failures.append(f"RSS grew by {rss_growth / MiB:.1f} MB (limit {RSS_GROWTH_LIMIT // MiB} MB)")
    if end_fp["fds"] > start_fp["fds"]:
        grew = {p: {k: n - report.get("fds_start", {}).get(p, {}).get(k, 0) for k, n in kinds.items()
                    if n > report.get("fds_start", {}).get(p, {}).get(k, 0)}
                for p, kinds in report.get("fds_end", {}).items()}
        failures.append(f"open fds grew: {start_fp['fds']} -> {end_fp['fds']} "
                        f"({ {p: g for p, g in grew.items() if g} })")
    slot_bound, conc_bound = report.get("slot_bound", 0), report.get("concurrency_bound", 0)
    if end_fp["slot_lock_fds"] > slot_bound:
        failures.append(f"a fork server holds {end_fp['slot_lock_fds']} slot lock and netns fds, over {slot_bound}")
    if end_fp["concurrency_lock_fds"] > conc_bound:
        failures.append(f"a worker holds {end_fp['concurrency_lock_fds']} concurrency lock fds, over {conc_bound}")
    if end_fp["threads"] > start_fp["threads"]:
        failures.append(f"threads grew: {start_fp['threads']} -> {end_fp['threads']}")
    if zombie_pids:
        failures.append(f"zombies: {zombie_pids}")
    if start_procs != end_procs:
        failures.append(f"server processes replaced (a worker or fork server died): {sorted(start_procs)} -> "
                        f"{sorted(end_procs)}")
    if left_running:
        failures.append(f"left behind while idle: {left_running}")
    if left_stopped:
        failures.append(f"left behind after the stop: {left_stopped}")

    # -- table -------------------------------------------------------------------------------------------------
    lines = [f"fnbox soak: {load_s:.0f} s of load, {total} calls ({total / max(load_s, 1e-9):.0f}/s), "
             f"{args.clients} clients, {args.workers} workers x {args.threads} threads, seed {args.seed}", "",
             f"| {'call':<13} | {'kind':<4} | {'expected':<18} | {'calls':>6} | {'right':>6} | {'wrong':>5} | "
             f"{'p50 ms':>7} | {'p99 ms':>7} |",
             f"|{'-' * 15}|{'-' * 6}|{'-' * 20}|{'-' * 8}|{'-' * 8}|{'-' * 7}|{'-' * 9}|{'-' * 9}|"]
    for kind in KINDS:
        st = stats.get(kind.name, Stats())
        p50, p99 = pct(st.latencies, 50), pct(st.latencies, 99)
        lines.append(f"| {kind.name:<13} | {'good' if kind.good else 'bad':<4} | {kind.expect:<18} | {st.calls:>6} | "
                     f"{st.right:>6} | {st.calls - st.right:>5} | {p50 or 0:>7.1f} | {p99 or 0:>7.1f} |")
    lines += ["", f"| {'server (idle)':<24} | {'start':>9} | {'end':>9} | {'change':>9} | {'allowed':>9} |",
              f"|{'-' * 26}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|"]
    lines.append(f"| {'RSS MB':<24} | {start_fp['rss'] / MiB:>9.1f} | {end_fp['rss'] / MiB:>9.1f} | "
                 f"{rss_growth / MiB:>+9.1f} | {'+10.0':>9} |")
    for key, label in (("rss_master", "  master"), ("rss_workers", "  workers"),
                       ("rss_fork_servers", "  fork servers")):
        lines.append(f"| {label:<24} | {start_fp[key] / MiB:>9.1f} | {end_fp[key] / MiB:>9.1f} | "
                     f"{(end_fp[key] - start_fp[key]) / MiB:>+9.1f} | {'':>9} |")
    lines.append(f"| {'other open fds':<24} | {start_fp['fds']:>9} | {end_fp['fds']:>9} | "
                 f"{end_fp['fds'] - start_fp['fds']:>+9} | {'+0':>9} |")
    lines.append(f"| {'slot lock+netns fds/proc':<24} | {start_fp['slot_lock_fds']:>9} | "
                 f"{end_fp['slot_lock_fds']:>9} | "
                 f"{end_fp['slot_lock_fds'] - start_fp['slot_lock_fds']:>+9} | {'<= ' + str(slot_bound):>9} |")
    lines.append(f"| {'conc. lock fds, max/proc':<24} | {start_fp['concurrency_lock_fds']:>9} | "
                 f"{end_fp['concurrency_lock_fds']:>9} | "
                 f"{end_fp['concurrency_lock_fds'] - start_fp['concurrency_lock_fds']:>+9} | "
                 f"{'<= ' + str(conc_bound):>9} |")
    lines.append(f"| {'threads':<24} | {start_fp['threads']:>9} | {end_fp['threads']:>9} | "
                 f"{end_fp['threads'] - start_fp['threads']:>+9} | {'+0':>9} |")
    lines.append(f"| {'processes replaced':<24} | {'':>9} | {len(start_procs - end_procs):>9} | {'':>9} | {'0':>9} |")
    lines.append(f"| {'zombies':<24} | {'':>9} | {len(zombie_pids):>9} | {'':>9} | {'0':>9} |")
    lines.append(f"| {'left behind, idle':<24} | {'':>9} | {len(left_running):>9} | {'':>9} | {'0':>9} |")
    lines.append(f"| {'left behind, stopped':<24} | {'':>9} | {len(left_stopped):>9} | {'':>9} | {'0':>9} |")
    lines.append(f"| {'warm calls, reused proc.':<24} | {'':>9} | {len(WARM_REUSED):>9} | {'':>9} | {'> 0':>9} |")
    lines.append("")
    lines.append("RSS: master + workers + fork servers (not calls, spares or janitors), idle, after a warm-up (every "
                 f"request thread started, then {report.get('warm_up', {}).get('seconds', 0):.0f} s of the same mix).")
    lines.append("FAIL: " + "; ".join(failures) if failures else "PASS")
    print("\n".join(lines))
    if args.json:
        report.update(load_s=load_s, calls=total, failures=failures, start=start_fp, end=end_fp,
                      kinds={k: {"calls": s.calls, "right": s.right, "p50_ms": pct(s.latencies, 50),
                                 "p99_ms": pct(s.latencies, 99), "wrong": s.wrong} for k, s in stats.items()})
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
