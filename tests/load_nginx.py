"""Overload through nginx: fnbox (2 workers x 32 threads, the shipped defaults) behind the rendered nginx site, both
on loopback, and `wrk -t2 -c256 -d30s` on `hello`. Not collected by pytest (no test_ prefix); run by hand:

    .venv/bin/python tests/load_nginx.py                      # shipped profiles: hello's max_concurrency is 8
    .venv/bin/python tests/load_nginx.py --max-concurrency 48 --duration 10

Reports total requests, req/s, p50/p99 latency (every answer, 503s included), 2xx, non-2xx split into
`503 busy` (fnbox's own backpressure) and anything else, and socket errors (connect, read, write, timeout).
Exits 1 unless every answer was 2xx or 503 busy with no socket error, and the server is healthy afterwards
(/healthz 200 through nginx and directly, hello answers, nothing left behind but the fork servers' spares).

Reuses tests/test_nginx.py's Nginx (ops/render_nginx.py renders ops/nginx/fnbox.conf), with more
worker_connections: 256 clients plus one upstream connection each. Every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import requests  # noqa: E402

from tests.conftest import Server  # noqa: E402
from tests.faultkit import LOAD_UID_BASE, follow, isolated_env, leftovers, make_scratch_dir  # noqa: E402
from tests.test_nginx import NGINX, Nginx  # noqa: E402

MARKER = "FNBOX_LOAD_RESULT "
LUA = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok, busy, other = 0, 0, 0
  statuses = {}
  sample = ""
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  elseif status == 503 and body ~= nil and string.find(body, '"error": "busy"', 1, true) then
    busy = busy + 1
  else
    other = other + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    if sample == "" and body ~= nil then
      sample = string.sub(body, 1, 300)
    end
  end
end

done = function(summary, latency, requests)
  local t_ok, t_busy, t_other, per, samples = 0, 0, 0, {}, {}
  for _, thread in ipairs(threads) do
    local body = thread:get("sample")
    if body ~= "" then
      table.insert(samples, '"' .. string.gsub(body, '[%c"\\]', ' ') .. '"')  -- plain JSON string
    end
    t_ok = t_ok + thread:get("ok")
    t_busy = t_busy + thread:get("busy")
    t_other = t_other + thread:get("other")
    for k, v in pairs(thread:get("statuses")) do
      per[k] = (per[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(per) do
    table.insert(parts, string.format('"%s": %d', k, v))
  end
  local e = summary.errors
  io.write(string.format(
    'MARKER{"requests": %d, "duration_us": %d, "ok": %d, "busy": %d, "other": %d, "other_statuses": {%s}, ' ..
    '"other_samples": [%s], ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, t_ok, t_busy, t_other, table.concat(parts, ", "),
    table.concat(samples, ", "),
    e.connect, e.read, e.write, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
""".replace("MARKER", MARKER)


def run_wrk(url: str, threads: int, connections: int, duration: int, timeout_s: int, workdir: str) -> dict:
    script = os.path.join(workdir, "count.lua")
    with open(script, "w") as f:
        f.write(LUA)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", f"--timeout={timeout_s}s", "--latency",
            "-s", script, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr or out.stdout}")
    for line in out.stdout.splitlines():
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
            result["argv"] = " ".join(["wrk", *argv[1:-3], "-s", "count.lua", url])
            return result
    raise RuntimeError(f"no result line in wrk's output:\n{out.stdout}\n{out.stderr}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=30, help="seconds of load (default 30)")
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32, help="Gunicorn threads per worker (default 32)")
    ap.add_argument("--max-concurrency", type=int, help="hello's max_concurrency (default: the shipped 8)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if NGINX is None or shutil.which("wrk") is None:
        print("load_nginx: nginx and wrk are needed: run `bash ops/setup-system.sh`", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="fnbox-load-")
    scratch = make_scratch_dir("fnbox-load-scratch-")
    follow(LOAD_UID_BASE, scratch)
    with open(os.path.join(REPO, "functions", "hello.py")) as f:
        hello = f.read()
    profiles = {"functions.toml": f"[hello]\nmax_concurrency = {args.max_concurrency}\n"} if args.max_concurrency \
        else None
    srv = Server(functions={"hello": hello}, profiles=profiles, env=isolated_env(LOAD_UID_BASE, scratch),
                 workers=args.workers, threads=args.threads)
    proxy: Nginx | None = None
    failures: list[str] = []
    try:
        srv.start()
        proxy = Nginx(f"127.0.0.1:{srv.port}", srv.profiles_dir)
        with open(proxy.conf) as f:
            conf = f.read()
        conf = conf.replace("worker_connections 256;", "worker_connections 4096;")
        conf = conf.replace("worker_processes 1;", "worker_processes 1;\n            worker_rlimit_nofile 16384;")
        with open(proxy.conf, "w") as f:
            f.write(conf)
        proxy.start()
        base = f"http://127.0.0.1:{proxy.port}"
        r = requests.get(base + "/function/hello?name=nginx", timeout=10)
        if (r.status_code, r.text) != (200, "Hello nginx!"):
            raise RuntimeError(f"hello through nginx: {r.status_code} {r.text[:200]}")
        max_calls = requests.get(srv.url + "/healthz", timeout=10).json().get("max_calls")

        res = run_wrk(base + "/function/hello", args.wrk_threads, args.connections, args.duration, 10, workdir)

        since = time.time()
        socket_errors = res["connect"] + res["read"] + res["write"] + res["timeout"]
        if res["other"]:
            failures.append(f"{res['other']} answers neither 2xx nor 503 busy: {res['other_statuses']}, e.g. "
                            f"{res['other_samples'][:2]}")
        if socket_errors:
            failures.append(f"{socket_errors} socket errors (connect {res['connect']}, read {res['read']}, "
                            f"write {res['write']}, timeout {res['timeout']})")
        if not res["ok"]:
            failures.append("no call was served")
        time.sleep(1)
        for url in (base + "/healthz", srv.url + "/healthz"):
            h = requests.get(url, timeout=10)
            if h.status_code != 200 or h.json().get("status") != "ok":
                failures.append(f"{url}: {h.status_code} {h.text[:200]}")
        r = requests.get(base + "/function/hello?name=after", timeout=10)
        if (r.status_code, r.text) != (200, "Hello after!"):
            failures.append(f"hello after the load: {r.status_code} {r.text[:200]}")
        deadline = time.monotonic() + 10
        left = leftovers(srv, since)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = leftovers(srv, since)
        if left:
            failures.append(f"left behind: {left}")
        nginx_errors = [line for line in proxy.read_log().splitlines() if "[error]" in line or "[crit]" in line
                        or "[alert]" in line]
    finally:
        if proxy is not None:
            proxy.stop()
        srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

    if res["other"]:  # fnbox's own account of those answers
        odd = [line for line in srv.read_log().splitlines() if line.startswith("{") and '"status": 200' not in line
               and '"status": 503' not in line]
        print("fnbox log lines of the other answers (first 3):\n" + "\n".join(odd[:3]) + "\n")
    seconds = res["duration_us"] / 1e6
    non2xx = res["busy"] + res["other"]
    rows = [
        ("command", res["argv"]),
        ("server", f"{args.workers} workers x {args.threads} threads, FNBOX_MAX_CALLS {max_calls} (derived), "
                   f"hello max_concurrency {args.max_concurrency or 8}"),
        ("requests", f"{res['requests']} in {seconds:.1f} s"),
        ("requests/s", f"{res['requests'] / seconds:.0f}"),
        ("2xx (served)", f"{res['ok']} ({res['ok'] / seconds:.0f}/s)"),
        ("latency p50 / p99 / max", f"{res['p50_us'] / 1000:.1f} / {res['p99_us'] / 1000:.1f} / "
                                    f"{res['max_us'] / 1000:.1f} ms (all answers)"),
        ("non-2xx", f"{non2xx}"),
        ("  503 busy", f"{res['busy']}"),
        ("  other", f"{res['other']} {res['other_statuses'] or ''}".strip()),
        ("socket errors", f"connect {res['connect']}, read {res['read']}, write {res['write']}, "
                          f"timeout {res['timeout']}"),
        ("nginx error log lines", f"{len(nginx_errors)}"),
        ("healthy afterwards", "yes" if not failures else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    if nginx_errors:
        print("\nnginx errors (first 5):\n" + "\n".join(nginx_errors[:5]))
    print("\nFAIL: " + "; ".join(failures) if failures else "\nPASS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "failures": failures, "max_calls": max_calls}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
