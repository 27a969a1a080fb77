"""Load generation with wrk: the scenarios, the generated Lua scripts, and parsing of wrk's results.

Results come from a Lua ``done()`` hook that prints one JSON line, not from wrk's human-readable text, whose
units change with magnitude (us/ms/s, k/M). Timeouts, socket errors and HTTP statuses >= 400 all count as
errors. wrk drops a response slower than --timeout from the latency histogram and counts it as a timeout, so
a server that answers slower than that shows up in the errors column rather than in p99.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

MARKER = "FNBOX_BENCH_RESULT "
# wrk's default request timeout, made explicit because the errors column depends on it.
WRK_TIMEOUT = "2s"
ECHO_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Scenario:
    key: str
    function: str
    threads: int
    connections: int
    post_json: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("hello@1", "hello", threads=1, connections=1),
    Scenario("hello@8", "hello", threads=2, connections=8),
    Scenario("echo64k@8", "echo", threads=2, connections=8, post_json=True),
    Scenario("sleep100@32", "sleep100", threads=2, connections=32),
    # A function that imports a heavy library (requests) at the top: fresh on fnbox, preloaded on fnbox-opt.
    Scenario("webhook@8", "webhook", threads=2, connections=8),
)
# The scenarios the second fnbox server (fnbox-opt: the opt-in modes) runs: hello with reuse_calls = 1000 (warm
# instances), webhook with preload = ["requests"].
OPT_SCENARIOS = frozenset({"hello@1", "hello@8", "webhook@8"})


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float | None  # None when no response made it into the histogram
    p99_ms: float | None
    socket_errors: int  # connect + read + write + timeout
    status_errors: int  # HTTP status >= 400

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.status_errors


_LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  local p50, p99 = -1, -1
  if latency.max > 0 then
    p50 = latency:percentile(50.0)
    p99 = latency:percentile(99.0)
  end
  io.write(string.format(
    '%s{"requests": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f, "write": %.0f, ' ..
    '"timeout": %.0f, "status": %.0f, "p50_us": %.0f, "p99_us": %.0f}\n',
    MARKER, summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status, p50, p99))
end
"""


def echo_body(size: int = ECHO_BODY_BYTES) -> bytes:
    """A JSON object of exactly ``size`` bytes: {"data": "xxx..."}."""
    overhead = len(b'{"data": ""}')
    return b'{"data": "' + b"x" * (size - overhead) + b'"}'


def write_scripts(workdir: Path) -> dict[str, Path]:
    """One Lua script per scenario in workdir; the POST body is read from a file so nothing needs escaping."""
    body_path = workdir / "echo_body.json"
    body_path.write_bytes(echo_body())
    scripts: dict[str, Path] = {}
    for sc in SCENARIOS:
        lines = [f'local MARKER = "{MARKER}"']
        if sc.post_json:
            # Setting wrk.method/body/headers (rather than a request() function) keeps wrk's pre-built request
            # fast path, so the load generator costs the same in every scenario.
            lines += [
                f'local f = assert(io.open("{body_path}", "rb"))',
                'wrk.method = "POST"',
                'wrk.body = f:read("*a")',
                "f:close()",
                'wrk.headers["Content-Type"] = "application/json"',
            ]
        path = workdir / f"{sc.key.replace('@', '_')}.lua"
        path.write_text("\n".join(lines) + "\n" + _LUA_DONE)
        scripts[sc.key] = path
    return scripts


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, scenario: Scenario, script: Path, duration_s: float, log_path: Path | None = None) -> WrkResult:
    """Run one wrk measurement, bounded at duration + 30 s; raises RuntimeError if wrk fails or hangs."""
    wrk = wrk_binary()
    if wrk is None:
        raise RuntimeError("wrk is not installed; run `bash ops/setup-system.sh`")
    argv = [
        wrk,
        f"-t{scenario.threads}",
        f"-c{scenario.connections}",
        f"-d{duration_s:g}s",
        f"--timeout={WRK_TIMEOUT}",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"wrk did not finish within {duration_s + 30:.0f} s: {' '.join(argv)}") from e
    if log_path is not None:
        log_path.write_text(f"$ {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    result = parse_wrk_output(proc.stdout)
    if result.requests == 0:
        # wrk counts a stuck request as a timeout only when its 2 s check timer fires after the timeout has
        # passed, which a short run may end before: a run in which no response arrived must still count as
        # failed, with at least one error per connection.
        result = replace(result, socket_errors=max(result.socket_errors, scenario.connections))
    return result


def parse_wrk_output(stdout: str) -> WrkResult:
    """Parse the JSON line written by the done() hook."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            d = json.loads(line[len(MARKER) :])
            break
    else:
        raise RuntimeError(f"wrk output has no result line:\n{stdout}")
    return WrkResult(
        requests=int(d["requests"]),
        duration_s=d["duration_us"] / 1e6,
        p50_ms=d["p50_us"] / 1000 if d["p50_us"] >= 0 else None,
        p99_ms=d["p99_us"] / 1000 if d["p99_us"] >= 0 else None,
        socket_errors=int(d["connect"] + d["read"] + d["write"] + d["timeout"]),
        status_errors=int(d["status"]),
    )
