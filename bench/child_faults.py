"""`python -m bench.child_faults [N]`: minor page faults and CPU of each phase of a fresh `hello` call, in N
forked children of a process warmed exactly like a fork server (runner.child.warm(), gc.collect + gc.freeze).

No sandbox is entered (bench/layer_costs.py measures the layers), so only the Python work of a call is counted:
each minor fault is a copy-on-write copy (~7-8 us on the benchmark VM). Medians over N children; the "whole
child" row is what wait4() charges to the child, fork and exit included.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from runner import child, rawfork
from runner.profiles import Profile
from runner.protocol import encode_frame


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _environ() -> dict:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/function/hello/Ada", "QUERY_STRING": "",
            "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
            "REMOTE_ADDR": "127.0.0.1", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "localhost"}


def _call(fdir: str, w: int) -> None:
    out = []
    profile = Profile()
    t = [(_faults(), time.thread_time())]

    def mark(name: str) -> None:
        f, c = _faults(), time.thread_time()
        out.append(f"{name}={f - t[-1][0]},{(c - t[-1][1]) * 1e6:.0f}")
        t.append((f, c))

    try:
        import io
        environ = dict(_environ(), **{"wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr})
        mark("request environ")
        module = child.import_function(fdir, "hello", profile)
        mark("import of the function")
        result = child.dispatch(module, fdir, "hello", profile, environ, fresh=True)
        mark("dispatch (Flask request, view, response, serialize)")
        data = encode_frame(result[0]) + result[1]
        assert b"Hello Ada!" in data, data
        mark("encode frame")
    finally:
        os.write(w, ("|".join(out) + "\n").encode())
        os._exit(0)


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 30
    fdir = tempfile.mkdtemp(prefix="fnbox-bench-fn-")
    shutil.copy(os.path.join(os.path.dirname(__file__), "functions", "hello.py"), fdir)
    # A sandboxed call cannot write a .pyc (its functions folder is read-only): neither may these children, or
    # all but the first would import from the cache the first one wrote.
    sys.dont_write_bytecode = True
    rawfork.install()
    child.warm()
    gc.collect()
    gc.freeze()
    forks = {"os.fork()": os.fork, "rawfork.fork()": rawfork.fork}
    rows: dict[str, dict[str, list[tuple[int, float]]]] = {k: {} for k in forks}
    r, w = os.pipe()
    try:
        for _ in range(n):
            for kind, fork in forks.items():  # interleaved: both see the same load
                pid = fork()
                if pid == 0:
                    _call(fdir, w)
                line = os.read(r, 65536).decode().strip()
                _, _, ru = os.wait4(pid, 0)
                for kv in line.split("|"):
                    name, v = kv.rsplit("=", 1)
                    f, c = v.split(",")
                    rows[kind].setdefault(name, []).append((int(f), float(c)))
                rows[kind].setdefault("whole child (fork, the above, exit)", []).append(
                    (ru.ru_minflt, (ru.ru_utime + ru.ru_stime) * 1e6))
    finally:
        shutil.rmtree(fdir, ignore_errors=True)
    print(f"medians of {n} children each (load average {os.getloadavg()[0]:.1f})")
    print("| phase | " + " | ".join(f"{k} faults | {k} CPU µs" for k in forks) + " |")
    print("| --- |" + " ---: | ---: |" * len(forks))
    for name in rows["os.fork()"]:
        cells = []
        for kind in forks:
            vals = rows[kind][name]
            cells += [f"{statistics.median(f for f, _ in vals):.0f}", f"{statistics.median(c for _, c in vals):.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
