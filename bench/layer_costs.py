"""`python -m bench.layer_costs [N]` (as root): the per-call cost of each Sandbox v2 layer, measured in forked
children exactly as a call pays it (runner/fsview.py, runner/syscalls.py, the cpuacct cgroup).

Each step is timed in the child with the thread's CPU time (what the step costs, whatever else runs on the
machine) and the wall clock; the table shows medians over N children. The exit row is the parent's wall time
from the child's last step to its reaping, with and without a view (the tmpfs and the namespace copy are
dropped by the exiting process), interleaved so both see the same load.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

from runner import fsview, syscalls
from runner.cgroups import v1_base


def _child(w: int, steps: list[tuple[str, object]]) -> None:
    out = []
    try:
        for name, fn in steps:
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            out.append(f"{name}={time.perf_counter() - t0},{time.thread_time() - c0}")
    finally:
        os.write(w, ("|".join(out) + "\n").encode())
        os._exit(0)


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("run as root: the layers need it", file=sys.stderr)
        return 2
    n = int(argv[0]) if argv else 200
    fdir = tempfile.mkdtemp(prefix="fnbox-bench-fn-", dir="/tmp")
    data = tempfile.mkdtemp(prefix="fnbox-bench-data-", dir="/tmp")
    staging = tempfile.mkdtemp(prefix="fnbox-bench-view-", dir="/run")
    os.chmod(fdir, 0o755)
    for name, text in (("__init__.py", ""), ("hello.py", "def main(r):\n    return 'hi'\n"),
                       ("other.py", "X = 1\n")):
        with open(os.path.join(fdir, name), "w") as f:
            f.write(text)
    cpu_base = v1_base("cpuacct")
    cg = os.path.join(cpu_base, "bench-layer-costs") if cpu_base else None
    if cg:
        os.makedirs(cg, exist_ok=True)
    spec = fsview.ViewSpec(functions_dir=fdir, ro_trees=fsview.runtime_trees(data), uid_base=61999, slots=1,
                           cgroup_dirs=(cg,) if cg else ())
    t0 = time.perf_counter()
    ns = fsview.build(spec, staging)
    build_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    prog = syscalls.compile_program()
    compile_ms = (time.perf_counter() - t0) * 1000
    rows: dict[str, list[tuple[float, float]]] = {}
    exits: dict[str, list[float]] = {"bare": [], "view": []}
    r, w = os.pipe()
    try:
        for i in range(n):
            warm = i % 2 == 1
            for kind in ("bare", "view"):
                steps: list[tuple[str, object]] = []
                if kind == "view":
                    box: dict[str, object] = {}
                    if cg:  # as prepare() does: before the view (which shows only the slot's own cgroups)
                        steps.append(("cpuacct cgroup: attach", lambda: _attach(cg)))
                        steps.append(("view: clone the slot's cgroup folder (prepare)",
                                      lambda box=box: box.update(cgs=fsview.cgroup_trees([cg]))))
                    if warm:  # as a spare does while it waits for its call
                        steps.append(("(spare, untimed on the request path) prewarm", lambda: fsview.prewarm(fdir)))
                    steps += [
                        ("view: list + clone the function's files (host side)",
                         lambda box=box: box.update(src=fsview.clone_sources(fsview.function_sources(fdir, "hello")))),
                        ("view: setns + unshare + tmpfs /tmp + functions tmpfs + binds",
                         lambda box=box: fsview.enter(ns, fdir, box["src"], 64, (), box.get("cgs"))),
                    ]
                    if prog is not None:
                        steps.append(("seccomp: load the compiled filter", prog.load))
                pid = os.fork()
                if pid == 0:
                    _child(w, steps)
                line = [x for x in os.read(r, 4096).decode().strip().split("|") if x]
                t0 = time.perf_counter()
                os.waitpid(pid, 0)
                exits[kind].append(time.perf_counter() - t0)
                for kv in line:
                    name, v = kv.rsplit("=", 1)
                    if warm and name.startswith("view") and "prewarm" not in name:
                        name += " (spare, after prewarm)"
                    wall, cpu = map(float, v.split(","))
                    rows.setdefault(name, []).append((wall, cpu))
    finally:
        os.close(ns)
        shutil.rmtree(fdir, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        os.rmdir(staging)
        if cg:
            try:
                os.rmdir(cg)
            except OSError:
                pass
    print(f"once per fork server: build the view skeleton {build_ms:.1f} ms; compile the filter "
          f"{compile_ms:.1f} ms ({len(prog._buf) // 8 if prog else 0} BPF instructions)")
    print(f"per call, medians of {n} children (load average {os.getloadavg()[0]:.1f}):")
    print("| step | CPU µs | wall µs |")
    print("| --- | ---: | ---: |")
    for name, vals in rows.items():
        print(f"| {name} | {statistics.median(c for _, c in vals) * 1e6:.0f} | "
              f"{statistics.median(x for x, _ in vals) * 1e6:.0f} |")
    for kind, vals in exits.items():
        print(f"| exit + reap, {kind} | - | {statistics.median(vals) * 1e6:.0f} |")
    return 0


def _attach(cg: str) -> None:
    fd = os.open(os.path.join(cg, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
