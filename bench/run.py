"""fnbox benchmark: fnbox against the seed's in-process design, a bare fork per call and a spawn per call.

Usage: .venv/bin/python bench/run.py [--servers seed,floor,spawn,fnbox] [--rounds N] [--duration S] [--quick]
                                      [--no-write] [--keep-tmp]

All four servers run side by side on free loopback ports under the same Gunicorn settings (gthread, the
workers/threads defaults of ops/gunicorn.conf.py) and are driven by wrk in alternation, scenario by scenario,
so slow drift of the machine (thermal, page cache, other tenants) hits every server alike. Results go to
stdout and to the "Latest benchmark run" section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
from loadgen import OPT_SCENARIOS, SCENARIOS, Scenario, WrkResult, echo_body, run_wrk, write_scripts, wrk_binary
from memstats import inflight_uss, tree_pss
from report import MemoryRow, aggregate, machine_description, render, target_checks, write_doc
from servers import Server, free_port, start, stop, wait_http_ok, wait_quiet

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GUNICORN_CONF = REPO / "ops" / "gunicorn.conf.py"
ALL_SERVERS = ("seed", "floor", "spawn", "fnbox")
# Started beside fnbox: the same server with the opt-in modes on (see OPT_TOML); it runs OPT_SCENARIOS only.
OPT_SERVER = "fnbox-opt"
# Also beside fnbox: the same server with the second sandbox's layers off (FNBOX_SANDBOX_OFF: file system view,
# syscall filter, cpuacct, egress), so that their per-call cost is measured side by side; hello scenarios only.
V1_SERVER = "fnbox-v1"
V1_SCENARIOS = ("hello@1", "hello@8")
V1_OFF = "file_system_view,syscall_filter,cpu_cgroup,network_egress"
EXTRA_SERVERS = (OPT_SERVER, V1_SERVER)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WARMUP = next(sc for sc in SCENARIOS if sc.key == "hello@8")
INFLIGHT_FUNCTION = "sleep2"
INFLIGHT_SECONDS = 2.0
# fnbox's default max_concurrency (8) would answer 503 busy beyond 8 calls of one function: sleep100 is
# driven with 32 connections and sleep2 with up to 16 concurrent calls for the memory measurement. hello
# and echo keep every default (they run at 8 connections at most).
FUNCTIONS_TOML = """\
# Written by bench/run.py for the benchmark's copy of the profiles.
[sleep100]
max_concurrency = 32

[sleep2]
max_concurrency = 32
"""
# fnbox-opt: warm instances for hello, the webhook's library preloaded. Nothing else differs from fnbox.
OPT_TOML = """
[hello]
reuse_calls = 1000

[webhook]
preload = ["requests", "boto3"]
"""


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GunicornSettings:
    workers: int
    threads: int
    keepalive: int | None  # None: Gunicorn's default, which the baselines then also get

    def describe(self) -> str:
        return f"gthread, {self.workers} workers x {self.threads} threads, the same for every server"


def _conf_values() -> dict[str, object]:
    """workers/threads/worker_class/keepalive as ops/gunicorn.conf.py sets them with no FNBOX_* in the env.

    The conf file is evaluated in a child interpreter (so nothing it does can touch this process) with the
    FNBOX_* variables removed, which yields its defaults however they are computed. If that fails, fall back
    to the literal defaults of FNBOX_WORKERS / FNBOX_THREADS in its source.
    """
    found: dict[str, object] = {}
    code = (
        "import json, runpy, sys\n"
        "ns = runpy.run_path(sys.argv[1])\n"
        "keys = ('workers', 'threads', 'worker_class', 'keepalive')\n"
        "print(json.dumps({k: ns.get(k) for k in keys}, default=str))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FNBOX_")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(GUNICORN_CONF)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            values = json.loads(out.stdout.strip().splitlines()[-1])
            found = {k: v for k, v in values.items() if v is not None}
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        pass
    src = GUNICORN_CONF.read_text()
    for key, var in (("workers", "FNBOX_WORKERS"), ("threads", "FNBOX_THREADS")):
        m = re.search(rf"""["']{var}["']\s*,\s*["']?(\d+)""", src)
        if m and key not in found:
            found[key] = int(m.group(1))
    return found


def gunicorn_settings(workers: int | None, threads: int | None) -> GunicornSettings:
    """The settings every server runs with: ops/gunicorn.conf.py's defaults unless overridden."""
    found: dict[str, object] = {}
    if GUNICORN_CONF.exists():
        found = _conf_values()
    elif workers is None or threads is None:
        log(f"warning: {GUNICORN_CONF} not found; baselines default to 2 workers x 4 threads")
        found = {"workers": 2, "threads": 4}
    if workers is not None:
        found["workers"] = workers
    if threads is not None:
        found["threads"] = threads
    if "workers" not in found or "threads" not in found:
        raise SystemExit(f"cannot read workers/threads from {GUNICORN_CONF}; pass --workers and --threads")
    worker_class = str(found.get("worker_class", "gthread"))
    if "gthread" not in worker_class:
        log(f"warning: ops/gunicorn.conf.py uses worker_class={worker_class!r}; the baselines run gthread")
    keepalive = found.get("keepalive")
    return GunicornSettings(
        workers=int(str(found["workers"])),
        threads=int(str(found["threads"])),
        keepalive=int(str(keepalive)) if keepalive is not None else None,
    )


def prepare_workdir(tmp: Path) -> dict[str, Path]:
    """Lay out the functions package, the fnbox profiles dir, wrk scripts and a logs dir under tmp."""
    # mkdtemp makes the dir 0700, but fnbox runs each call as its own unprivileged uid, which must be able to
    # reach and read the function files; copytree keeps the sources' (world-readable) modes.
    tmp.chmod(0o755)
    functions = tmp / "functions"
    shutil.copytree(BENCH_DIR / "functions", functions, ignore=shutil.ignore_patterns("__pycache__"))
    profiles = tmp / "profiles"
    repo_profiles = REPO / "sandbox_profiles"
    if repo_profiles.is_dir():
        shutil.copytree(repo_profiles, profiles, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        profiles.mkdir()
    (profiles / "functions.toml").write_text(FUNCTIONS_TOML)
    # fnbox-opt: a copy of the same profiles with the opt-in modes on.
    # Its own copy of the functions too: max_concurrency is counted per functions folder, so two servers serving
    # one folder would take each other's places.
    shutil.copytree(functions, tmp / "functions-opt")
    shutil.copytree(functions, tmp / "functions-v1")
    opt_profiles = tmp / "profiles-opt"
    shutil.copytree(profiles, opt_profiles)
    (opt_profiles / "functions.toml").write_text(FUNCTIONS_TOML + OPT_TOML)
    logs = tmp / "logs"
    logs.mkdir()
    wrk_dir = tmp / "wrk"
    wrk_dir.mkdir()
    return {"root": tmp, "functions": functions, "profiles": profiles, "profiles-opt": opt_profiles, "logs": logs,
            "wrk": wrk_dir}


def start_server(name: str, paths: dict[str, Path], settings: GunicornSettings) -> Server:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FNBOX_")}
    if name in ("fnbox", *EXTRA_SERVERS):
        folder = {OPT_SERVER: "functions-opt", V1_SERVER: "functions-v1"}.get(name, "functions")
        env.update(
            FNBOX_BIND=f"127.0.0.1:{port}",
            FNBOX_FUNCTIONS_DIR=str(paths["root"] / folder),
            FNBOX_PROFILES_DIR=str(paths["profiles-opt" if name == OPT_SERVER else "profiles"]),
            FNBOX_WORKERS=str(settings.workers),
            FNBOX_THREADS=str(settings.threads),
        )
        if name == V1_SERVER:
            env["FNBOX_SANDBOX_OFF"] = V1_OFF
        argv = [gunicorn, "-c", str(GUNICORN_CONF)]
        cwd = REPO
    else:
        argv = [
            gunicorn,
            "--worker-class",
            "gthread",
            "--workers",
            str(settings.workers),
            "--threads",
            str(settings.threads),
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(paths["root"]),  # the seed's layout: the functions package in the working dir
            "--pythonpath",
            str(BENCH_DIR),
            # Gunicorn 27 otherwise binds one fixed control socket path (~/.gunicorn/gunicorn.ctl) that
            # side-by-side servers would fight over; ops/gunicorn.conf.py disables it for fnbox likewise.
            "--no-control-socket",
        ]
        if settings.keepalive is not None:
            argv += ["--keep-alive", str(settings.keepalive)]
        argv.append(f"{name}_app:app")
        cwd = paths["root"]
    log(f"starting {name} on 127.0.0.1:{port}")
    return start(name, argv, cwd=cwd, env=env, log_path=paths["logs"] / f"{name}.log", port=port)


def check_answers(server: Server) -> None:
    """Each bench function must answer correctly before any number about it means anything."""
    base = server.base_url + "/function/"
    small = {"k": [1, 2, 3], "s": "x"}
    cases = [
        ("GET", "hello", None, "Hello World!"),
        ("GET", "hello/Tony", None, "Hello Tony!"),
        ("GET", "hello?name=Ann", None, "Hello Ann!"),
        ("POST", "echo", small, small),
        ("GET", "sleep100", None, "ok"),
        ("GET", "webhook?text=hi", None, {"method": "POST", "url": "https://chat.example.com/hooks/T000/B000",
                                          "bytes": 14}),
    ]
    for method, path, body, expected in cases:
        if server.name == "spawn" and path.startswith("webhook"):
            continue  # spawn does not run the webhook scenario (see runs())
        r = requests.request(method, base + path, json=body, timeout=30)
        got = r.json() if isinstance(expected, dict) and r.status_code == 200 else r.text
        if r.status_code != 200 or got != expected:
            raise RuntimeError(
                f"{server.name}: {method} /function/{path} gave HTTP {r.status_code} {r.text[:200]!r}, "
                f"expected {expected!r}\n{server.log_tail()}"
            )
    big = echo_body()
    r = requests.post(base + "echo", data=big, headers={"Content-Type": "application/json"}, timeout=30)
    if r.status_code != 200 or r.json() != json.loads(big):
        raise RuntimeError(f"{server.name}: 64 KB echo gave HTTP {r.status_code} {r.text[:200]!r}")


def fnbox_outcomes(log_path: Path) -> str:
    """A summary of the one-JSON-line-per-call log fnbox writes, so errors in its rows can be explained."""
    counts: Counter[str] = Counter()
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if not (line.startswith("{") and '"outcome"' in line):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                counts[f"{rec.get('outcome')} (HTTP {rec.get('status')})"] += 1
    except OSError:
        return "fnbox call log not readable"
    if not counts:
        return "fnbox logged no calls (its call log format may have changed)"
    parts = ", ".join(f"{k}: {v:,}" for k, v in counts.most_common())
    return f"fnbox logged {sum(counts.values()):,} calls, warm-up and checks included: {parts}"


def background_cpu() -> float:
    """System-wide CPU use in percent over one second, while no server of ours is running."""
    return psutil.cpu_percent(interval=1.0)


def settle(server: Server) -> None:
    if not wait_quiet(server, timeout_s=60, window_s=0.3):
        log(f"warning: {server.name} still busy after 60 s; measuring anyway")


def run_bench(args: argparse.Namespace, names: Sequence[str], tmp: Path) -> str:
    wrk = wrk_binary()
    if wrk is None:
        raise SystemExit("wrk is not installed: run `bash ops/setup-system.sh` (or `make bench`)")
    settings = gunicorn_settings(args.workers, args.threads)
    # Everything here shares 2 cores with wrk, so CPU used by anything else skews every number: record it.
    load_before = background_cpu()
    if load_before > 10:
        log(f"warning: {load_before:.0f} % CPU busy before the servers started; results will be noisy")
    paths = prepare_workdir(tmp)
    scripts = write_scripts(paths["wrk"])
    servers: dict[str, Server] = {}
    try:
        for name in [*names, *(EXTRA_SERVERS if "fnbox" in names else [])]:
            servers[name] = start_server(name, paths, settings)
        for name, srv in servers.items():
            wait_http_ok(srv, "/healthz" if name.startswith("fnbox") else "/function/hello", timeout_s=30)
            check_answers(srv)
            # A short warm-up so every worker has imported the functions and Flask's lazy bits before any
            # measurement; the seed would otherwise pay first-import costs inside round 1.
            run_wrk(f"{srv.base_url}/function/hello", WARMUP, scripts[WARMUP.key], 1.0)
            log(f"{name} ready: {srv.base_url}")

        mem = {name: MemoryRow() for name in servers if name not in EXTRA_SERVERS}
        for name, srv in servers.items():
            if name in mem:
                settle(srv)
                mem[name].idle_warm = tree_pss(srv)

        samples: dict[tuple[str, str], list[WrkResult]] = {}
        for rnd in range(1, args.rounds + 1):
            for sc in SCENARIOS:
                for name, srv in servers.items():
                    if not runs(sc, name):
                        continue
                    url = f"{srv.base_url}/function/{sc.function}"
                    res = run_wrk(
                        url,
                        sc,
                        scripts[sc.key],
                        args.duration,
                        paths["logs"] / f"wrk_r{rnd}_{sc.key}_{name}.txt",
                    )
                    samples.setdefault((sc.key, name), []).append(res)
                    p50 = res.p50_ms if res.p50_ms is not None else float("nan")
                    log(
                        f"round {rnd}/{args.rounds} {sc.key:<12} {name:<6} {res.rps:10.1f} req/s  "
                        f"p50 {p50:8.2f} ms  errors: socket/timeout {res.socket_errors}, "
                        f"HTTP {res.status_errors}"
                    )
                    settle(srv)

        capacity = settings.workers * settings.threads
        calls = min(args.inflight_calls, capacity)
        if calls < args.inflight_calls:
            log(f"note: in-flight calls capped at {calls} = workers x threads, the gateway's capacity")
        for name, srv in servers.items():
            if name not in mem:
                continue
            settle(srv)
            mem[name].idle_after = tree_pss(srv)
            if name != "seed":  # the seed runs calls on worker threads: nothing per call to measure
                mem[name].inflight = inflight_uss(srv, f"/function/{INFLIGHT_FUNCTION}", calls, INFLIGHT_SECONDS)
                settle(srv)
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave servers behind; stop() is bounded.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            for srv in servers.values():
                stop(srv)
                log(f"stopped {srv.name} (pid {srv.proc.pid})")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    load_after = background_cpu()
    notes = []
    for name in ("fnbox", *EXTRA_SERVERS):
        if name in servers:
            notes.append(f"{name}: {fnbox_outcomes(servers[name].log_path)}")

    rows = {key: aggregate(vals) for key, vals in samples.items()}
    checks = target_checks(rows, mem)
    machine = machine_description(
        {
            "Gunicorn": settings.describe(),
            "Runs": f"{args.rounds} round(s) x {args.duration:g} s per scenario and server, alternating",
            "Servers": ", ".join([*names, *(n for n in EXTRA_SERVERS if n in servers)]),
            "CPU busy outside the benchmark": f"{load_before:.0f} % before, {load_after:.0f} % after "
            "(all cores, over 1 s)",
        },
        wrk,
    )
    shown = [*names, *(n for n in EXTRA_SERVERS if n in servers)]
    return render(machine, rows, mem, checks, shown, notes)


def runs(sc: Scenario, server: str) -> bool:
    """Which server runs which scenario: fnbox-opt only its own; spawn not the webhook (a new interpreter
    importing requests per call measures nothing new, for 15 s a round)."""
    if server == OPT_SERVER:
        return sc.key in OPT_SCENARIOS
    if server == V1_SERVER:
        return sc.key in V1_SCENARIOS
    return not (server == "spawn" and sc.key == "webhook@8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of seed,floor,spawn,fnbox (default: all)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of all scenarios (default 3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, overriding --rounds/--duration")
    p.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    p.add_argument("--workers", type=int, help="override the Gunicorn workers read from ops/gunicorn.conf.py")
    p.add_argument("--threads", type=int, help="override the Gunicorn threads read from ops/gunicorn.conf.py")
    p.add_argument("--inflight-calls", type=int, default=16, help="concurrent calls for the USS measurement")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server and wrk logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_SERVERS]
    if bad or not names:
        p.error(f"unknown server(s) {bad}; choose from {','.join(ALL_SERVERS)}")
    # Keep the canonical order so tables and alternation read seed, floor, spawn, fnbox whatever the flag's order.
    args.names = [n for n in ALL_SERVERS if n in names]
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM/SIGHUP take the same path as Ctrl-C, so the finally blocks stop every server.
    # SIGINT is set explicitly too: Python leaves it ignored when started in the background by a
    # non-interactive shell, and a Ctrl-C-equivalent must always reach the cleanup.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="fnbox-bench-"))
    started = time.monotonic()
    ok = False
    try:
        report = run_bench(args, args.names, tmp)
        ok = True
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        return 130
    except RuntimeError as e:
        log(f"error: {e}")
        return 1
    finally:
        if args.keep_tmp or not ok:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report, end="")
    if not args.no_write:
        doc = REPO / "docs" / "performance.md"
        write_doc(doc, report)
        log(f"wrote {doc.relative_to(REPO)}")
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
