"""Aggregation, tables, target checks and the docs/performance.md section.

Tables are Markdown so the same text reads well on a terminal and renders in the docs. Per-round numbers are
reduced with the median (robust to one noisy round on a 2-core machine shared with the load generator);
errors are summed over rounds, since a single failed call is what a "zero errors" target is about.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from loadgen import SCENARIOS, WRK_TIMEOUT, WrkResult
from memstats import MB, InflightUss, TreePss

SECTION_HEADING = "## Latest benchmark run"
DOC_INTRO = """# Performance

fnbox runs every call in a fresh, sandboxed process. This page measures what that costs against three
reference designs, and what its two opt-in faster modes (preloaded modules, warm instances) gain, on the
same machine and under the same Gunicorn settings (gthread, the workers and threads of
`ops/gunicorn.conf.py`):

- **seed**: the seed write-up's design (`bench/seed_app.py`). The function is imported once and runs inside
  the Gunicorn worker: no isolation at all, so it is the ceiling.
- **floor**: the fork floor (`bench/floor_app.py`). The seed's app, but each request forks the warm worker;
  the child imports the function, runs `main(request)`, writes the response to a pipe and exits. No sandbox,
  no supervisor, no limits: the cheapest fresh process per call on this machine, which fnbox aims to match.
- **spawn**: the naive way to isolate calls (`bench/spawn_app.py`, `bench/spawn_child.py`). A new `python`
  process per call, the request in and the response out as JSON over stdin/stdout.
- **fnbox**: the real server, `gunicorn -c ops/gunicorn.conf.py`, with a copy of `sandbox_profiles/` whose
  `functions.toml` only raises `max_concurrency` to 32 for the two sleeping functions.
- **fnbox-opt**: the same server with the two opt-in modes, on its own copy of the functions: `hello` with
  `reuse_calls = 1000` (warm instances) and `webhook` with `preload = ["requests", "boto3"]`. It runs only the
  `hello` and `webhook` scenarios. A preloaded module is in every call of its server (docs/operators.md), so
  fresh and preloaded need two servers.
- **fnbox-v1**: the same server with the second sandbox's layers off (`FNBOX_SANDBOX_OFF`: the file system
  view, the syscall filter, cpuacct and the egress table), on its own copy of the functions: what those layers
  cost per call, side by side. It runs only the `hello` scenarios.

## How to run

`make bench`, or `.venv/bin/python bench/run.py` with any of `--quick` (1 round of 2 s), `--rounds N`
(default 3), `--duration S` (default 5), `--servers seed,floor,spawn,fnbox` (fnbox-opt runs whenever fnbox
does), `--no-write` (leave this page alone), `--keep-tmp` (keep server and wrk logs). wrk must be installed
(`bash ops/setup-system.sh`). A default run takes about ten minutes and only ever talks to 127.0.0.1.

## Method

- The five servers run side by side on free loopback ports. wrk drives one at a time, alternating
  seed, floor, spawn, fnbox, fnbox-opt for every scenario of every round, and after each run the bench
  waits until the server just measured is idle again, so a server still draining queued calls never slows
  the next one.
- wrk shares the machine's cores with the servers, so absolute numbers are lower than with a separate
  load generator; the ratios are the point. The run records how busy the CPU was outside the benchmark.
- Errors are socket errors, wrk timeouts (a response slower than 2 s) and HTTP statuses >= 400. A call
  that is slower than the timeout appears as an error and not in the latency columns.
- Idle memory is the PSS summed over every process of a server (master, workers, fork servers), read
  after a warm-up and again after all load; the targets use the larger. Pages shared by the servers
  running side by side (the Python binary, libc) are split among all of them, so each server alone
  would show slightly more. The memory an in-flight call adds is the USS of the processes that appear
  while 16 calls of a function sleeping 2 s are in flight, divided by 16.
"""


@dataclass(frozen=True)
class Row:
    """Medians over rounds of one scenario on one server."""

    rounds: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # summed over rounds


@dataclass
class MemoryRow:
    idle_warm: TreePss | None = None  # after warm-up, before load
    idle_after: TreePss | None = None  # after all load, once quiet again
    inflight: InflightUss | None = None

    @property
    def idle_pss_bytes(self) -> int | None:
        """The larger of the two idle readings: the server's idle footprint may grow once it has seen load."""
        vals = [m.pss_bytes for m in (self.idle_warm, self.idle_after) if m is not None]
        return max(vals) if vals else None


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(results: Sequence[WrkResult]) -> Row:
    return Row(
        rounds=len(results),
        rps=statistics.median(r.rps for r in results),
        p50_ms=_median(r.p50_ms for r in results),
        p99_ms=_median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
    )


def _num(v: float | None, small_digits: int = 2) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.{small_digits}f}"


def _ratio(a: float, b: float | None) -> str:
    if b is None or b <= 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 2) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(str(c).rjust(w) if i >= right_from else str(c).ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i >= right_from else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def throughput_table(rows: dict[tuple[str, str], Row], servers: Sequence[str]) -> str:
    header = ["scenario", "server", "req/s", "p50 ms", "p99 ms", "errors", "/seed", "/floor", "/spawn"]
    out = []
    for sc in SCENARIOS:
        for name in servers:
            row = rows.get((sc.key, name))
            if row is None:
                continue
            ratios = ["", "", ""]
            if name in ("fnbox", "floor", "fnbox-opt", "fnbox-v1"):
                for i, base in enumerate(("seed", "floor", "spawn")):
                    other = rows.get((sc.key, base))
                    if base != name:
                        ratios[i] = _ratio(row.rps, other.rps if other else None)
            out.append([sc.key, name, _num(row.rps, 1), _num(row.p50_ms), _num(row.p99_ms), str(row.errors), *ratios])
    return _md_table(header, out)


def memory_table(mem: dict[str, MemoryRow], servers: Sequence[str]) -> str:
    header = [
        "server",
        "processes",
        "idle PSS MB (warm)",
        "idle PSS MB (after load)",
        "in-flight calls (ok)",
        "new processes",
        "USS MB per call",
    ]
    out = []
    for name in servers:
        m = mem.get(name)
        if m is None:
            continue
        inf = m.inflight
        out.append(
            [
                name,
                str(m.idle_after.processes if m.idle_after else m.idle_warm.processes if m.idle_warm else "—"),
                _num(m.idle_warm.pss_bytes / MB if m.idle_warm else None, 1),
                _num(m.idle_after.pss_bytes / MB if m.idle_after else None, 1),
                f"{inf.calls} ({inf.ok})" if inf else "—",
                str(inf.new_processes) if inf else "—",
                _num(inf.per_call_bytes / MB, 2) if inf and inf.new_processes else "—",
            ]
        )
    return _md_table(header, out, right_from=1)


@dataclass(frozen=True)
class Check:
    name: str
    holds: bool | None  # None: could not be evaluated (a server was not run)
    detail: str

    def line(self) -> str:
        verdict = {True: "HITS  ", False: "MISSES", None: "N/A   "}[self.holds]
        return f"{verdict}  {self.name}: {self.detail}"


def target_checks(rows: dict[tuple[str, str], Row], mem: dict[str, MemoryRow]) -> list[Check]:
    checks: list[Check] = []

    def get(sc: str, srv: str) -> Row | None:
        return rows.get((sc, srv))

    f, fl = get("hello@8", "fnbox"), get("hello@8", "floor")
    name = "hello@8: fnbox req/s >= 1.0 x the fork floor"
    if f and fl:
        checks.append(Check(name, f.rps >= fl.rps, f"{f.rps:,.0f} vs {fl.rps:,.0f} ({f.rps / fl.rps:.2f}x)"))
    else:
        checks.append(Check(name, None, "needs fnbox and floor"))

    f, fl = get("hello@1", "fnbox"), get("hello@1", "floor")
    name = "hello@1: fnbox p50 <= the fork floor's p50"
    if f and fl and f.p50_ms is not None and fl.p50_ms is not None:
        checks.append(Check(name, f.p50_ms <= fl.p50_ms, f"{f.p50_ms:.2f} ms vs {fl.p50_ms:.2f} ms"))
    else:
        checks.append(Check(name, None, "needs fnbox and floor latencies"))

    f, v = get("hello@8", "fnbox"), get("hello@8", "fnbox-v1")
    name = "hello@8: every sandbox layer on (fnbox) req/s >= 0.9 x the second sandbox off (fnbox-v1)"
    if f and v:
        checks.append(Check(name, f.rps >= 0.9 * v.rps, f"{f.rps:,.1f} vs {v.rps:,.1f} ({f.rps / v.rps:.2f}x)"))
    else:
        checks.append(Check(name, None, "needs fnbox and fnbox-v1"))

    f, o = get("webhook@8", "fnbox"), get("webhook@8", "fnbox-opt")
    name = "webhook@8: preloaded (fnbox-opt) req/s >= 10 x fresh (fnbox)"
    if f and o and f.rps > 0:
        checks.append(Check(name, o.rps >= 10 * f.rps and o.errors == 0,
                            f"{o.rps:,.1f} vs {f.rps:,.1f} ({o.rps / f.rps:.1f}x), {o.errors} errors"))
    else:
        checks.append(Check(name, None, "needs fnbox and fnbox-opt"))

    o, s = get("hello@8", "fnbox-opt"), get("hello@8", "seed")
    name = "hello@8: warm instances (fnbox-opt, reuse_calls = 1000) req/s >= 0.5 x seed"
    if o and s:
        checks.append(Check(name, o.rps >= 0.5 * s.rps and o.errors == 0,
                            f"{o.rps:,.0f} vs {s.rps:,.0f} ({o.rps / s.rps:.2f}x), {o.errors} errors"))
    else:
        checks.append(Check(name, None, "needs seed and fnbox-opt"))

    f = get("sleep100@32", "fnbox")
    name = "sleep100@32: fnbox >= 250 calls/s and zero errors"
    if f:
        checks.append(Check(name, f.rps >= 250 and f.errors == 0, f"{f.rps:,.1f} calls/s, {f.errors} errors"))
    else:
        checks.append(Check(name, None, "needs fnbox"))

    m = mem.get("fnbox")
    name = "idle fnbox server total PSS <= 100 MB"
    idle = m.idle_pss_bytes if m else None
    if idle is not None:
        checks.append(Check(name, idle <= 100 * MB, f"{idle / MB:.1f} MB (larger of the two idle readings)"))
    else:
        checks.append(Check(name, None, "needs fnbox"))
    name = "each in-flight fnbox call adds <= 4 MB USS"
    inf = m.inflight if m else None
    if inf is None:
        checks.append(Check(name, None, "needs fnbox"))
    elif inf.ok < inf.calls or inf.new_processes < inf.calls:
        # Fewer sandboxes than calls means some calls were refused or queued: the average would be diluted.
        checks.append(
            Check(
                name,
                False,
                f"only {inf.ok}/{inf.calls} calls ok, {inf.new_processes} new processes "
                f"({inf.per_call_bytes / MB:.2f} MB per call is not trustworthy)",
            )
        )
    else:
        checks.append(
            Check(
                name,
                inf.per_call_bytes <= 4 * MB,
                f"{inf.per_call_bytes / MB:.2f} MB per call ({inf.calls} calls, "
                f"{inf.new_processes} new processes, {inf.uss_bytes / MB:.1f} MB USS in all)",
            )
        )
    return checks


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _wrk_version(wrk: str | None) -> str:
    if not wrk:
        return "not installed"
    try:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def machine_description(settings: dict[str, object], wrk: str | None) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mem_gib = psutil.virtual_memory().total / 1024**3
    lines = [
        f"- Date: {now}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores",
        f"- Memory: {mem_gib:.1f} GiB",
        f"- Kernel: {platform.system()} {platform.release()}",
        f"- Python: {platform.python_version()} ({platform.python_implementation()})",
        f"- Load generator: {_wrk_version(wrk)}, on the same machine, request timeout {WRK_TIMEOUT}",
    ]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines)


def render(
    machine: str,
    rows: dict[tuple[str, str], Row],
    mem: dict[str, MemoryRow],
    checks: Sequence[Check],
    servers: Sequence[str],
    notes: Sequence[str] = (),
) -> str:
    """The whole report body (no top-level heading), used for stdout and for the docs section."""
    parts = [
        machine,
        "",
        "### Throughput and latency",
        "",
        "Scenarios: `hello@1` and `hello@8` GET /function/hello with 1 and 8 connections; `echo64k@8` POSTs",
        "a 64 KB JSON body to a JSON echo function with 8 connections; `sleep100@32` calls a function that",
        "sleeps 100 ms with 32 connections; `webhook@8` calls a function that imports `requests` and `boto3`",
        "at the top and prepares a POST with requests. `fnbox-opt` is fnbox with the two opt-in modes: `hello`",
        "with `reuse_calls = 1000` (warm instances) and `webhook` with `preload = [\"requests\", \"boto3\"]`;",
        "it runs only those scenarios. Medians over rounds; errors are summed over rounds (socket errors,",
        "timeouts, HTTP statuses >= 400). A call slower than the timeout is an error, not a latency.",
        "",
        throughput_table(rows, servers),
        "",
        "### Memory",
        "",
        "Idle PSS sums every process of a server (Gunicorn master, workers and all descendants). USS per",
        "call is the USS of the processes that appeared while the in-flight calls ran (a 2 s sleep),",
        "divided by the number of calls.",
        "",
        memory_table(mem, servers),
        "",
        "### Targets",
        "",
        "```",
        *(c.line() for c in checks),
        "```",
    ]
    if notes:
        parts += ["", "### Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def replace_section(text: str, heading: str, body: str) -> str:
    """Replace the ``heading`` section (up to the next level-2 heading) with body, or append it."""
    lines = text.splitlines(keepends=True)
    block = [heading + "\n", "\n", body if body.endswith("\n") else body + "\n"]
    try:
        start = next(i for i, ln in enumerate(lines) if ln.rstrip() == heading)
    except StopIteration:
        prefix = text if text.endswith("\n") or not text else text + "\n"
        return prefix + ("\n" if prefix else "") + "".join(block)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    if tail:
        block.append("\n")
    return "".join(lines[:start] + block + tail)


def write_doc(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else DOC_INTRO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, SECTION_HEADING, body))
