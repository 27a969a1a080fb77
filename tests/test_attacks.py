"""Hostile functions, called through a real server: each attack must end with the right error (or find nothing),
leave the server answering `hello` within a second, and leave nothing behind.

Safety first: these tests must never harm the machine, even if the sandbox regresses. Before a dangerous attack
(fork/thread bomb, memory bomb, disk filler, kill(-1), signalling every pid) `require()` checks that the layer
containing it is active, from three independent sources: the server's /healthz "sandbox" field, `python -m
runner.doctor --json`, and a probe function that reports, from inside a real call with the attacks' profile, its
uid, rlimits and cgroup limits. When a layer is missing the test FAILS without running the attack.

Every function runs with a small profile from functions.toml (ATTACK_LIMITS) so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.conftest import PYTHON, REPO, SHARED, SLOTS, UID_BASE, Server, assert_nothing_left, dedent

TOKEN = "secret-token"
MiB = 1024 * 1024
# The attacks' profile: short, small, so that a contained attack ends fast.
ATTACK_LIMITS = {"timeout_s": 2, "cpu_s": 2, "memory_mb": 128, "max_processes": 16, "max_file_mb": 16,
                 "max_concurrency": 4}

with open(os.path.join(REPO, "functions", "hello.py")) as _f:
    HELLO_SRC = _f.read()

# Reports, from inside a real call, what contains it. Never attacks anything.
PROBE = """
import os, resource, socket

def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

def main(request):
    groups = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\\n").split(":", 2)
            for c in ctrls.split(","):
                groups[c] = path
    status = dict(line.split(":", 1) for line in _read("/proc/self/status").splitlines() if ":" in line)
    lim = {name: list(resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper())))
           for name in ("nproc", "fsize", "data", "cpu", "nofile", "core")}
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "rlimits": lim,
        "cgroup": groups,
        "memory_limit": _read("/sys/fs/cgroup/memory" + groups.get("memory", "/?") + "/memory.limit_in_bytes"),
        "memsw_limit": _read("/sys/fs/cgroup/memory" + groups.get("memory", "/?") + "/memory.memsw.limit_in_bytes"),
        "pids_max": _read("/sys/fs/cgroup/pids" + groups.get("pids", "/?") + "/pids.max"),
        "interfaces": [n for _, n in socket.if_nameindex()],
        "no_new_privs": status.get("NoNewPrivs", "").strip(),
        "cap_eff": status.get("CapEff", "").strip(),
    }
"""


@dataclass
class Attack:
    name: str
    src: str
    status: int  # expected HTTP status
    error: str | None = None  # expected JSON error code; None: a normal response (the attack found nothing)
    limits: dict[str, Any] = field(default_factory=dict)  # over ATTACK_LIMITS, in functions.toml
    needs: tuple[str, ...] = ()  # layers that must be active before it may run (see require())
    params: Callable[[Ctx], dict[str, Any]] | None = None  # query string, from the test's context
    check: Callable[[Ctx, requests.Response], None] | None = None  # what else must hold afterwards
    nothing_left_timeout: float = 3.0  # bound on the runner's asynchronous cleanup (janitor for big dirs)
    canaries: bool = False  # run it while bystanders live: they must all survive
    # Other (status, error) endings that are as contained as the expected one (a race decides which one comes).
    also: tuple[tuple[int, str], ...] = ()

    def accepts(self, r: requests.Response) -> bool:
        error = r.json().get("error") if r.headers.get("Content-Type", "").startswith("application/json") else None
        if r.status_code == self.status and (self.error is None or error == self.error):
            return True
        return (r.status_code, error) in self.also


@dataclass
class Ctx:
    srv: Server
    world: str  # a world-writable folder the test created, for attacks that leave a trace to watch
    fork_server_pid: int
    listener: socket.socket | None = None
    concurrent: bool = False  # the attacks run together (test_attacks_while_hello_keeps_answering)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return -1


def _stops_growing(path: str) -> None:
    """The file a leftover process was writing every 50-100 ms does not grow any more once the call is over."""
    time.sleep(0.3)
    before = _size(path)
    assert before > 0, f"{path}: the attack never wrote (size {before}): the test proves nothing"
    time.sleep(0.6)
    assert _size(path) == before, f"{path} still grows after the call ended: a process of the call survived"


def _wrote_many(ctx: Ctx, progress: str) -> None:
    with open(progress) as f:
        written = int(f.read() or 0)
    # Alone, thousands in its 3 s; among 8 concurrent attacks (two fork bombs on this machine's CPUs), fewer.
    least = 100 if ctx.concurrent else 2000
    assert written >= least, f"only {written} files written: the test proves nothing"
    os.unlink(progress)
    if os.path.exists(progress + ".tmp"):
        os.unlink(progress + ".tmp")


def _found_nothing(ctx: Ctx, r: requests.Response) -> None:
    doc = r.json()
    assert doc["found"] == [], doc


# With the file system view (runner/fsview.py) most targets are not even there (FileNotFoundError) or sit on a
# read-only mount (OSError: EROFS); without it, the permissions refuse (PermissionError).
DENIED = ("PermissionError", "EPERM", "EACCES", "FileNotFoundError", "OSError")


def _all_denied(ctx: Ctx, r: requests.Response) -> None:
    doc = r.json()
    assert doc and all(v in DENIED for v in doc.values()), doc


ATTACKS: list[Attack] = [
    # -- time ------------------------------------------------------------------------------------------------
    Attack("busy_loop", """
        def main(request):
            while True:
                pass
    """, 504, "timeout"),
    Attack("sleep_forever", """
        import time
        def main(request):
            time.sleep(3600)
    """, 504, "timeout"),
    Attack("ignore_signals", """
        import signal, time
        def main(request):
            for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU,
                      signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGPIPE):
                signal.signal(s, signal.SIG_IGN)
            signal.alarm(1)
            end = time.monotonic() + 3600
            while time.monotonic() < end:
                pass
    """, 504, "timeout", limits={"cpu_s": 5}),
    Attack("sigstop_self", """
        import os, signal
        def main(request):
            os.kill(os.getpid(), signal.SIGSTOP)
            return "resumed"
    """, 504, "timeout"),
    Attack("threads_after_return", """
        import os, threading, time
        def main(request):
            path = os.path.join(request.args["dir"], "threads.log")
            def scribble():
                while True:
                    with open(path, "a") as f:
                        f.write(".")
                    time.sleep(0.05)
            threading.Thread(target=scribble).start()  # non-daemon: would keep a normal interpreter alive
            threading.Thread(target=scribble, daemon=True).start()
            time.sleep(0.2)
            return "returned"
    """, 200, params=lambda c: {"dir": c.world},
        check=lambda c, r: (r.text == "returned" or pytest.fail(r.text),
                            _stops_growing(os.path.join(c.world, "threads.log")))),
    # -- memory ----------------------------------------------------------------------------------------------
    Attack("alloc_4g", """
        def main(request):
            hoard = bytearray(4 << 30)
            return str(len(hoard))
    """, 502, "memory_limit", needs=("memory",)),
    Attack("slow_leak", """
        import time
        def main(request):
            hoard = []
            while True:
                hoard.append(b"x" * (1 << 20))
                time.sleep(0.005)
    """, 502, "memory_limit", needs=("memory",)),
    Attack("grandchild_memory", """
        import os, time
        def main(request):
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:  # the grandchild grows; each process alone stays under RLIMIT_DATA
                    hoard = []
                    for _ in range(110):
                        hoard.append(b"x" * (1 << 20))
                        time.sleep(0.002)
                    time.sleep(3600)
                os._exit(0)
            os.waitpid(pid, 0)
            hoard = b"y" * (40 << 20)
            time.sleep(3600)
    """, 502, "memory_limit", needs=("memory",)),
    Attack("idle_children_share_memory", """
        import os, time
        def main(request):
            kids = []
            for _ in range(12):  # 13 processes share one warm interpreter: not 13 times its memory
                pid = os.fork()
                if pid == 0:
                    time.sleep(0.5)
                    os._exit(0)
                kids.append(pid)
            for pid in kids:
                os.waitpid(pid, 0)
            return "forked 12"
    """, 200, needs=("pids",), check=lambda c, r: r.text == "forked 12" or pytest.fail(r.text)),
    # -- processes -------------------------------------------------------------------------------------------
    Attack("fork_bomb", """
        import os
        def main(request):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """, 504, "timeout", needs=("pids",)),
    Attack("thread_bomb", """
        import threading
        def main(request):
            stop, n, error = threading.Event(), 0, None
            try:
                while n < 100000:
                    threading.Thread(target=stop.wait, daemon=True).start()
                    n += 1
            except RuntimeError as e:
                error = str(e)
            return {"threads": n, "error": error}
    """, 200, needs=("pids",),
        check=lambda c, r: (r.json()["threads"] < ATTACK_LIMITS["max_processes"] or pytest.fail(r.text))),
    Attack("import_time_fork_bomb", """
        import os
        while True:  # at import, before main is even looked up
            try:
                os.fork()
            except OSError:
                pass

        def main(request):
            return "unreachable"
    """, 504, "timeout", needs=("pids",)),
    Attack("setsid_daemon", """
        import os, time
        def main(request):
            path = os.path.join(request.args["dir"], "daemon.log")
            os.umask(0)  # the log stays writable for a later run of this attack under another sandbox uid
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:  # double fork: reparented away from the call, in a session of its own
                    while True:
                        with open(path, "a") as f:
                            f.write(".")
                        time.sleep(0.1)
                os._exit(0)
            time.sleep(0.35)
            return "daemonized"
    """, 200, params=lambda c: {"dir": c.world},
        check=lambda c, r: (r.text == "daemonized" or pytest.fail(r.text),
                            _stops_growing(os.path.join(c.world, "daemon.log")))),
    # -- disk ------------------------------------------------------------------------------------------------
    Attack("file_10g", """
        def main(request):
            chunk = b"x" * (1 << 20)
            with open("big", "wb") as f:
                for _ in range(10 * 1024):
                    f.write(chunk)
            return "wrote 10 GB"
    """, 500, "function_error", needs=("fsize",),
        check=lambda c, r: "File too large" in r.json()["message"] or pytest.fail(r.text)),
    # Up to 100 000 small files, then it sleeps: however fast the disk, the call ends in a timeout with every
    # file it wrote left for the runner's cleanup. Progress goes to the world dir so the test knows it wrote many.
    Attack("files_100k", """
        import os, time
        def main(request):
            progress = os.path.join(request.args["dir"], "files_100k.count")
            os.mkdir("many")
            for i in range(1, 100001):
                # Empty: with the file system view a call writes to a tmpfs of max_disk_mb, where 100 000 data
                # pages would end in ENOSPC before the timeout (tests/test_isolation_layers.py tests that cap).
                os.close(os.open(f"many/{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                if i % 100 == 0:  # atomically: the kill at the timeout may come at any point
                    with open(progress + ".tmp", "w") as f:
                        f.write(str(i))
                    os.replace(progress + ".tmp", progress)
            time.sleep(3600)
    """, 504, "timeout", limits={"timeout_s": 3, "cpu_s": 3, "memory_mb": 256}, params=lambda c: {"dir": c.world},
        check=lambda c, r: _wrote_many(c, os.path.join(c.world, "files_100k.count")), nothing_left_timeout=60),
    # -- output ----------------------------------------------------------------------------------------------
    Attack("stdout_100mb", """
        import sys
        def main(request):
            line = "x" * (1 << 20)
            for _ in range(100):
                sys.stdout.write(line)
            sys.stdout.flush()
            return "printed"
    """, 200, limits={"timeout_s": 10}, check=lambda c, r: r.text == "printed" or pytest.fail(r.text)),
    Attack("body_100mb", """
        def main(request):
            return b"x" * (100 << 20)
    """, 502, "output_limit", limits={"memory_mb": 256, "timeout_s": 10}, needs=("memory",)),
    Attack("json_recursion_bomb", """
        def main(request):
            doc = {}
            for _ in range(200000):
                doc = {"a": doc}
            return doc
    """, 500, "function_error", limits={"timeout_s": 10}),
    Attack("header_10mb", """
        def main(request):
            return "ok", 200, {"X-Big": "x" * (10 << 20)}
    """, 502, "output_limit", limits={"timeout_s": 10}),
    # -- secrets and files -----------------------------------------------------------------------------------
    Attack("environ_hunt", f"""
        import os
        TOKEN = {TOKEN!r}.encode()
        def main(request):
            found, readable = [], []
            if any(TOKEN in f"{{k}}={{v}}".encode() for k, v in os.environ.items()):
                found.append("os.environ")
            pids = [str(os.getppid()), "1", *sorted(p for p in os.listdir("/proc") if p.isdigit())]
            for pid in pids:
                for what in ("environ", "cmdline"):
                    try:
                        with open(f"/proc/{{pid}}/{{what}}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    if what == "environ" and pid != str(os.getpid()):
                        readable.append(pid)
                    if TOKEN in data:
                        found.append(f"/proc/{{pid}}/{{what}}")
            return {{"found": found, "readable_environ": readable, "env": sorted(os.environ)}}
    """, 200, check=lambda c, r: (_found_nothing(c, r),
                                  set(r.json()["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "FNBOX_TEST_VAR"}
                                  or pytest.fail(r.text))),
    Attack("read_profiles", """
        import os
        def main(request):
            out = {}
            d = request.args["dir"]
            for what, op in (("listdir", lambda: os.listdir(d)),
                             ("functions.toml", lambda: open(os.path.join(d, "functions.toml")).read()),
                             ("default.toml", lambda: open(os.path.join(d, "default.toml")).read())):
                try:
                    op()
                    out[what] = "read"
                except OSError as e:
                    out[what] = type(e).__name__
            return out
    """, 200, params=lambda c: {"dir": c.srv.profiles_dir}, check=_all_denied),
    Attack("overwrite_hello", """
        import os
        def main(request):
            d = request.args["dir"]
            hello = os.path.join(d, "hello.py")
            attempts = {
                "write": lambda: open(hello, "w").write("def main(r):\\n    return 'pwned'\\n"),
                "append": lambda: open(hello, "a").write("\\nmain = lambda r: 'pwned'\\n"),
                "unlink": lambda: os.unlink(hello),
                "rename": lambda: os.rename(hello, hello + ".bak"),
                "create": lambda: open(os.path.join(d, "evil.py"), "x").write("x = 1\\n"),
                "chmod": lambda: os.chmod(hello, 0o666),
                "utime": lambda: os.utime(hello, (0, 0)),
            }
            out = {}
            for what, op in attempts.items():
                try:
                    op()
                    out[what] = "done"
                except OSError as e:
                    out[what] = type(e).__name__
            return out
    """, 200, params=lambda c: {"dir": c.srv.functions_dir},
        check=lambda c, r: (_all_denied(c, r), _hello_intact(c))),
    Attack("write_project_root", """
        import os
        def main(request):
            root = request.args["root"]
            found = []
            for dirpath, dirnames, filenames in os.walk(root):
                if os.access(dirpath, os.W_OK):
                    found.append(dirpath)
                found.extend(p for p in (os.path.join(dirpath, n) for n in filenames)
                             if not os.path.islink(p) and os.access(p, os.W_OK))
            for target in ("pwned", "functions/pwned.py", "runner/__init__.py", "sandbox_profiles/default.toml"):
                try:
                    with open(os.path.join(root, target), "a") as f:
                        f.write("# pwned\\n")
                    found.append(target)
                except OSError:
                    pass
            return {"found": found}
    """, 200, params=lambda c: {"root": REPO}, check=_found_nothing, limits={"timeout_s": 10}),
    Attack("symlink_to_hello", """
        import os
        def main(request):
            target = os.path.join(request.args["dir"], "hello.py")
            os.symlink(target, "hello_link.py")  # planted in the scratch dir, which the runner cleans up
            os.symlink(request.args["dir"], "functions_link")
            out = {}
            try:
                with open("hello_link.py", "w") as f:
                    f.write("def main(r):\\n    return 'pwned'\\n")
                out["write"] = "done"
            except OSError as e:
                out["write"] = type(e).__name__
            try:
                os.link(target, "hard_link.py")
                out["hardlink"] = "done"
            except OSError as e:
                out["hardlink"] = type(e).__name__
            return out
    """, 200, params=lambda c: {"dir": c.srv.functions_dir},
        check=lambda c, r: (_all_denied(c, r), _hello_intact(c))),
    # Files in the world-writable temp folders (in /dev/shm: RAM) and SysV/POSIX IPC objects outlive a process:
    # they must not outlive the call (assert_nothing_left checks both).
    Attack("litter_outside_scratch", """
        import ctypes, os, uuid
        def main(request):
            made = []
            for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
                name = os.path.join(d, "fnbox-attack-" + uuid.uuid4().hex)
                with open(name, "wb") as f:
                    f.write(b"x" * (8 << 20) if d == "/dev/shm" else b"x")
                os.mkdir(name + ".d")
                open(os.path.join(name + ".d", "inner"), "w").close()
                os.symlink("/etc/passwd", name + ".link")
                made.append(d)
            libc = ctypes.CDLL(None, use_errno=True)
            ipc = {"shm": libc.shmget(0, 8 << 20, 0o1000 | 0o600),  # IPC_PRIVATE, IPC_CREAT
                   "msg": libc.msgget(0, 0o1000 | 0o600), "sem": libc.semget(0, 1, 0o1000 | 0o600)}
            mq_open = getattr(libc, "mq_open", None) or ctypes.CDLL("librt.so.1", use_errno=True).mq_open
            ipc["mq"] = mq_open(b"/fnbox-attack", os.O_CREAT | os.O_RDWR, 0o600, None)
            return {"made": made, "ipc": ipc}
    """, 200, needs=("uid_pool",),
        check=lambda c, r: (len(r.json()["made"]) == 4 and min(r.json()["ipc"].values()) >= 0) or pytest.fail(r.text)),
    Attack("raise_own_limits", """
        import os, resource
        def main(request):
            groups, out = {}, {}
            with open("/proc/self/cgroup") as f:
                for line in f:
                    _, ctrls, path = line.rstrip("\\n").split(":", 2)
                    for c in ctrls.split(","):
                        groups[c] = path
            mem, pids = "/sys/fs/cgroup/memory" + groups["memory"], "/sys/fs/cgroup/pids" + groups["pids"]

            def write(path, value):
                with open(path, "w") as f:
                    f.write(value)

            attempts = {
                "memory.limit_in_bytes": lambda: write(mem + "/memory.limit_in_bytes", "-1"),
                "memory.memsw.limit_in_bytes": lambda: write(mem + "/memory.memsw.limit_in_bytes", "-1"),
                "pids.max": lambda: write(pids + "/pids.max", "max"),
                "leave the memory cgroup": lambda: write(os.path.dirname(mem) + "/cgroup.procs", str(os.getpid())),
                "leave the pids cgroup": lambda: write("/sys/fs/cgroup/pids/cgroup.procs", str(os.getpid())),
                "setuid(0)": lambda: os.setuid(0),
                "setgroups([0])": lambda: os.setgroups([0]),
                "nice(-5)": lambda: os.nice(-5),
                "prlimit(parent)": lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NPROC, (1, 1)),
            }
            for name in ("NPROC", "FSIZE", "DATA", "CPU", "NOFILE", "CORE"):
                res = getattr(resource, "RLIMIT_" + name)
                inf = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                attempts["rlimit " + name] = lambda res=res, inf=inf: resource.setrlimit(res, inf)
            for name, op in attempts.items():
                try:
                    op()
                    out[name] = "done"
                except (OSError, ValueError) as e:
                    out[name] = type(e).__name__
            return out
    """, 200, needs=("uid_pool",),
        check=lambda c, r: all(v in ("ValueError", *DENIED) for v in r.json().values())
        or pytest.fail(r.text)),
    # -- network ---------------------------------------------------------------------------------------------
    Attack("connect_local", """
        import socket
        def main(request):
            out = {}
            for port in request.args.getlist("port", type=int):
                s = socket.socket()
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", port))
                    out[str(port)] = "connected"
                except OSError as e:
                    out[str(port)] = type(e).__name__
                finally:
                    s.close()
            return out
    """, 200, params=lambda c: {"port": [c.srv.port, c.listener.getsockname()[1]]},
        check=lambda c, r: _not_connected(c, r)),
    # -- signals and tracing ---------------------------------------------------------------------------------
    Attack("kill_parent", """
        import os, signal
        def main(request):
            out = {}
            for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
                try:
                    os.kill(os.getppid(), sig)
                    out[name] = "delivered"
                except OSError as e:
                    out[name] = type(e).__name__
            return out
    """, 200, check=_all_denied),
    # kill(-1) succeeds as soon as one other process exists, even when every signal was refused (EPERM): what
    # it reached shows in the canaries (a root process, an unrelated uid, a concurrent call of another slot).
    Attack("kill_minus_one", """
        import os, signal
        def main(request):
            os.kill(-1, signal.SIGKILL)
            return "sent"
    """, 200, needs=("uid_pool",), check=lambda c, r: r.text == "sent" or pytest.fail(r.text), canaries=True),
    Attack("killpg_self", """
        import os
        def main(request):
            os.killpg(os.getpgid(0), 9)
    """, 502, "crashed", check=lambda c, r: r.json().get("signal") == "SIGKILL" or pytest.fail(r.text)),
    Attack("signal_every_pid", """
        import os, signal
        def main(request):
            me, found = os.getpid(), []
            for name in os.listdir("/proc"):
                if name.isdigit() and int(name) != me:
                    try:
                        os.kill(int(name), signal.SIGKILL)
                        found.append(int(name))
                    except OSError:
                        pass
            return {"found": found}
    """, 200, needs=("uid_pool",), check=_found_nothing, canaries=True),
    Attack("ptrace_parent", """
        import ctypes, os
        def main(request):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
            out = {}
            for name, req in (("PTRACE_ATTACH", 16), ("PTRACE_SEIZE", 0x4206)):
                if libc.ptrace(req, os.getppid(), None, None) == 0:
                    out[name] = "attached"
                    libc.ptrace(17, os.getppid(), None, None)  # PTRACE_DETACH
                else:
                    out[name] = "EPERM" if ctypes.get_errno() == 1 else os.strerror(ctypes.get_errno())
            try:
                open(f"/proc/{os.getppid()}/mem", "rb").close()
                out["mem"] = "opened"
            except OSError as e:
                out["mem"] = type(e).__name__
            return out
    """, 200, check=_all_denied),
    # -- file descriptors ------------------------------------------------------------------------------------
    Attack("inherited_fds", """
        import os, stat
        def main(request):
            found = {}
            for fd in range(3, 1024):
                try:
                    found[fd] = stat.S_IFMT(os.fstat(fd).st_mode)
                except OSError:
                    pass
            for fd in range(4, 1024):  # everything but the call's own result pipe
                for op in (lambda: os.read(fd, 1), lambda: os.write(fd, b"x"), lambda: os.close(fd)):
                    try:
                        op()
                    except OSError:
                        pass
            return {"found": [fd for fd in found if fd != 3], "fd3_is_pipe": found.get(3) == stat.S_IFIFO}
    """, 200, check=lambda c, r: (_found_nothing(c, r), r.json()["fd3_is_pipe"] or pytest.fail(r.text))),
    Attack("clobber_every_fd", """
        import os
        def main(request):
            for fd in range(3, 1024):  # including fd 3, its own result pipe
                for op in (lambda: os.read(fd, 1), lambda: os.write(fd, b"garbage"), lambda: os.close(fd)):
                    try:
                        op()
                    except OSError:
                        pass
            return "clobbered"
    # "garbage" on fd 3 is a malformed result frame (the function's error), unless fd 3 was closed before the
    # runner could write the result at all: then the process ends without an answer (crashed). Both contained.
    """, 500, "function_error", also=((502, "crashed"),)),
]
BY_NAME = {a.name: a for a in ATTACKS}


def _hello_intact(ctx: Ctx) -> None:
    path = os.path.join(ctx.srv.functions_dir, "hello.py")
    with open(path) as f:
        assert f.read() == dedent(HELLO_SRC)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644, st
    left = set(os.listdir(ctx.srv.functions_dir)) & {"evil.py", "hello.py.bak", "hello_link.py", "hard_link.py"}
    assert not left, left


def _not_connected(ctx: Ctx, r: requests.Response) -> None:
    doc = r.json()
    assert len(doc) == 2 and "connected" not in doc.values(), doc
    ctx.listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        ctx.listener.accept()


def functions_toml() -> str:
    def table(name: str, extra: dict[str, Any]) -> str:
        limits = {**ATTACK_LIMITS, **extra}
        lines = [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in limits.items())]
        return "\n".join(lines)

    tables = [table("probe", {}), table("sleeper", {"timeout_s": 10}), *(table(a.name, a.limits) for a in ATTACKS)]
    tables.append('[environ_hunt.env]\nFNBOX_TEST_VAR = "visible"')
    return "\n\n".join(tables) + "\n"


# -- the server, and the safety checks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world() -> Any:
    d = tempfile.mkdtemp(prefix="fnbox-test-world-", dir=SHARED)
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def srv(world: str) -> Any:
    functions = {"hello": HELLO_SRC, "probe": PROBE, "sleeper": SLEEPER, **{a.name: a.src for a in ATTACKS}}
    s = Server(functions=functions, profiles={"functions.toml": functions_toml()},
               env={"FNBOX_ADMIN_TOKEN": TOKEN}, threads=32)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def ctx(srv: Server, world: str) -> Any:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    health = srv.get("/healthz").json()
    try:
        yield Ctx(srv, world, health["fork_server_pid"], listener)
    finally:
        listener.close()


def probe(srv: Server) -> dict[str, Any]:
    r = srv.get("/function/probe", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def doctor(srv: Server) -> dict[str, Any]:
    out = subprocess.run([PYTHON, "-m", "runner.doctor", "--json"], cwd=REPO, env=srv.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def require(srv: Server, doctor: dict[str, Any], *layers: str) -> None:
    """Fails (never skips) unless every layer that contains the coming attack is active, as the server, the
    doctor and a live call with the attacks' own profile all say."""
    sandbox = srv.get("/healthz").json()["sandbox"]
    p = probe(srv)

    def active(name: str) -> bool:
        return sandbox.get(name, "").startswith("active") and doctor.get(name, {}).get("status") == "active"

    problems = []
    for layer in layers:
        if layer == "uid_pool":
            if not (os.geteuid() == 0 and active("uid_pool") and p["uid"] == p["euid"]
                    and UID_BASE <= p["uid"] < UID_BASE + SLOTS and p["groups"] == [] and p["cap_eff"] == "0" * 16):
                problems.append(f"calls do not run as an unprivileged uid of the pool: {p}")
        elif layer == "pids":
            cgroup_ok = active("pids_cgroup") and p["pids_max"] == str(ATTACK_LIMITS["max_processes"])
            nproc_ok = (active("uid_pool") and UID_BASE <= p["uid"] < UID_BASE + SLOTS
                        and p["rlimits"]["nproc"][1] == ATTACK_LIMITS["max_processes"])
            if not (cgroup_ok or nproc_ok):
                problems.append(f"neither a pids cgroup nor RLIMIT_NPROC caps processes: {p}")
        elif layer == "memory":
            want = str(ATTACK_LIMITS["memory_mb"] * MiB)
            if not (active("memory_cgroup") and p["memory_limit"] == want and p["memsw_limit"] in (want, None)):
                problems.append(f"no memory cgroup caps the call at {want} bytes: {p}")
            if p["rlimits"]["data"][1] == -1:
                problems.append(f"RLIMIT_DATA is unlimited: {p}")
        elif layer == "fsize":
            if p["rlimits"]["fsize"] != [ATTACK_LIMITS["max_file_mb"] * MiB] * 2:
                problems.append(f"RLIMIT_FSIZE does not cap files at max_file_mb: {p}")
        else:
            raise AssertionError(f"unknown layer {layer}")
    if problems:
        pytest.fail("refusing to run a dangerous attack: " + "; ".join(problems), pytrace=False)


class Canaries:
    """Bystanders that an attack reaching outside its own call would kill: a root process, a process of an
    unrelated uid (nobody), and a concurrent call (so another sandbox uid) that must still answer normally."""

    NOBODY = 65534

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.procs: list[subprocess.Popen] = []
        self.call: dict[str, Any] = {}
        self.marker = os.path.join(ctx.world, f"sleeper-{uuid.uuid4().hex}")

    def __enter__(self) -> Canaries:
        self.procs.append(subprocess.Popen(["sleep", "60"]))
        self.procs.append(subprocess.Popen(["sleep", "60"], user=self.NOBODY, group=self.NOBODY, extra_groups=[]))
        params = {"s": "1.5", "marker": self.marker}
        self.thread = threading.Thread(target=lambda: self.call.update(
            r=self.ctx.srv.get("/function/sleeper", params=params, timeout=30)))
        self.thread.start()
        deadline = time.monotonic() + 5  # the bystander call is running before the attack starts
        while not os.path.exists(self.marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(self.marker), "the bystander call did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.thread.join(30)
            codes = [p.poll() for p in self.procs]
            assert codes == [None, None], f"a bystander process was killed: {codes}"
            r = self.call.get("r")
            assert r is not None and r.status_code == 200 and r.text == "slept", r is not None and r.text
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait(5)


SLEEPER = """
import time
def main(request):
    open(request.args["marker"], "w").close()
    time.sleep(float(request.args["s"]))
    return "slept"
"""


def hello_within_a_second(srv: Server) -> None:
    t0 = time.monotonic()
    r = srv.get("/function/hello", timeout=1)
    assert r.status_code == 200 and r.text == "Hello World!", r.text
    assert time.monotonic() - t0 < 1


def run_attack(ctx: Ctx, doctor: dict[str, Any], attack: Attack) -> None:
    if attack.needs:
        require(ctx.srv, doctor, *attack.needs)
    params = attack.params(ctx) if attack.params else None
    with Canaries(ctx) if attack.canaries else contextlib.nullcontext():
        r = ctx.srv.get(f"/function/{attack.name}", params=params, timeout=60)
    ended = time.time()
    assert attack.accepts(r), f"{attack.name}: {r.status_code} {r.text[:2000]}"
    if attack.error is not None:
        assert r.json()["function"] == attack.name
    if attack.check:
        attack.check(ctx, r)
    hello_within_a_second(ctx.srv)
    assert_nothing_left(ended, timeout=attack.nothing_left_timeout)
    health = ctx.srv.get("/healthz").json()
    assert health["fork_server_pid"] == ctx.fork_server_pid and health["fork_server_restarts"] == 0, health


# -- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_safety_layers_are_reported(srv, doctor):
    """The guards themselves: on this machine (root, as in CI) every layer the attacks rely on is active."""
    require(srv, doctor, "uid_pool", "pids", "memory", "fsize")
    p = probe(srv)
    assert p["interfaces"] == ["lo"], p  # network = false: an empty network namespace
    assert p["no_new_privs"] == "1", p


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", [a.name for a in ATTACKS])
def test_attack(ctx, doctor, name):
    run_attack(ctx, doctor, BY_NAME[name])


@pytest.mark.timeout(30)
def test_listening_port_is_not_reachable_from_the_host(ctx, doctor):
    ctx.srv.write_function("bind_port", """
        import socket, time
        def main(request):
            port, out = int(request.args["port"]), {}
            for host in ("0.0.0.0", "127.0.0.1"):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                    s.listen(16)
                    out[host] = "listening"
                except OSError as e:
                    out[host] = type(e).__name__
                    s.close()
            time.sleep(1.5)
            return out
    """)
    port = ctx.listener.getsockname()[1]
    ctx.listener.close()  # a port we know is free on the host
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=ctx.srv.get("/function/bind_port", params={"port": port})))
    t.start()
    try:
        time.sleep(0.5)
        for _ in range(10):
            with socket.socket() as c:
                c.settimeout(0.5)
                with pytest.raises(OSError):
                    c.connect(("127.0.0.1", port))
            time.sleep(0.05)
    finally:
        t.join(30)
    r = result["r"]
    ended = time.time()
    assert r.status_code == 200, r.text
    assert r.json()["0.0.0.0"] == "listening", r.text  # it did listen, in its own namespace
    hello_within_a_second(ctx.srv)
    assert_nothing_left(ended)


@pytest.mark.timeout(120)
def test_attacks_while_hello_keeps_answering(ctx, doctor):
    """Every attack at once, while a second thread keeps calling hello: every hello call succeeds."""
    require(ctx.srv, doctor, "uid_pool", "pids", "memory", "fsize")
    ctx.concurrent = True
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = ctx.srv.get("/function/hello", timeout=10)
                results.append((time.monotonic() - t0, r.status_code, r.text))
            except requests.RequestException as e:
                results.append((time.monotonic() - t0, 0, repr(e)))

    batch = list(ATTACKS)
    for trace in ("threads.log", "daemon.log"):  # a fresh trace file for the attacks that watch one
        try:
            os.unlink(os.path.join(ctx.world, trace))
        except FileNotFoundError:
            pass
    hammer_thread = threading.Thread(target=hammer)
    hammer_thread.start()
    failures = []
    try:
        def one(a: Attack) -> None:
            params = a.params(ctx) if a.params else None
            r = ctx.srv.get(f"/function/{a.name}", params=params, timeout=60)
            if not a.accepts(r):
                failures.append(f"{a.name}: {r.status_code} {r.text[:500]}")
            elif a.check:
                try:
                    a.check(ctx, r)
                except AssertionError as e:
                    failures.append(f"{a.name}: {e}")

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, batch))
    finally:
        stop.set()
        hammer_thread.join(30)
    ended = time.time()
    assert not failures, failures
    bad = [x for x in results if x[1] != 200 or x[2] != "Hello World!"]
    assert len(results) >= 10 and not bad, (len(results), bad[:5])
    hello_within_a_second(ctx.srv)
    assert_nothing_left(ended, timeout=max(a.nothing_left_timeout for a in batch))
    health = ctx.srv.get("/healthz").json()
    assert health["fork_server_pid"] == ctx.fork_server_pid and health["fork_server_restarts"] == 0, health



@pytest.mark.timeout(60)
def test_fork_server_killed_mid_call(make_server, world):
    """SIGKILL of the fork server during a call: the call fails cleanly, its main process dies with the fork
    server (PDEATHSIG, set again after the uid change that clears it); its daemon, which no parent-death signal
    reaches, its scratch dir and its litter in /dev/shm are removed by the next fork server's sweep; the server
    answers again at once."""
    srv = make_server(functions={"hello": HELLO_SRC, "victim": """
        import os, time
        def main(request):
            path = os.path.join(request.args["dir"], "victim.log")
            with open("/dev/shm/fnbox-attack-victim-" + str(os.getpid()), "wb") as f:  # litter, in RAM
                f.write(b"x" * (1 << 20))
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    while True:
                        with open(path, "a") as f:
                            f.write(".")
                        time.sleep(0.05)
                os._exit(0)
            time.sleep(3600)
    """}, profiles={"functions.toml": "[victim]\ntimeout_s = 30\ncpu_s = 30\n"}).start()
    trace = os.path.join(world, "victim.log")
    fs_pid = srv.get("/healthz").json()["fork_server_pid"]
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=srv.get("/function/victim", params={"dir": world})))
    t.start()
    deadline = time.monotonic() + 10
    while _size(trace) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _size(trace) >= 3, "the victim's daemon never wrote"
    os.kill(fs_pid, signal.SIGKILL)
    t.join(15)
    r = result["r"]
    ended = time.time()
    assert r.status_code == 502 and r.json()["error"] == "crashed", r.text
    # The daemon is the next fork server's to sweep (it starts swept): wait for that one, then look.
    deadline = time.monotonic() + 10
    while (h := srv.get("/healthz").json())["fork_server_pid"] in (None, fs_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["fork_server_restarts"] == 1 and h["status"] == "ok", h
    _stops_growing(trace)
    hello_within_a_second(srv)
    assert_nothing_left(ended)


@pytest.mark.timeout(30)
def test_planted_scratch_folder_is_refused(tmp_path):
    """If the scratch folder is missing, a call could create it in /var/tmp (world-writable) and own it, then
    swap a new call's scratch dir for a symlink between mkdir() and chown(): the runner refuses such a folder."""
    if os.geteuid() != 0:
        pytest.fail("runs as root, like CI: it needs a sandbox uid to own the planted folder", pytrace=False)
    from runner.config import Settings
    from runner.sandbox import Layers, SlotPool

    planted = tmp_path / "scratch"
    planted.mkdir(mode=0o777)
    os.chown(planted, UID_BASE, UID_BASE)
    settings = Settings.from_env({"FNBOX_SCRATCH_DIR": str(planted), "FNBOX_STATE_DIR": str(tmp_path / "state")})
    layers = Layers(root=True, cgroup_memory=False, cgroup_pids=False, netns=False, userns=False)
    with pytest.raises(RuntimeError, match="not a folder owned by uid 0"):
        SlotPool(settings, layers)
    os.chown(planted, 0, 0)
    pool = SlotPool(settings, layers)  # the same folder, owned by root, is fine
    assert stat.S_IMODE(os.stat(planted).st_mode) == 0o711
    pool.close()


@pytest.mark.timeout(60)
def test_a_slot_in_use_is_never_handed_out_again(make_server, world):
    """A slot (uid + cgroups) belongs to one call. With 3 slots the pool's cycle comes back to a long call's slot
    after 3 calls: flock() on a lock the same fd already holds succeeds, so the pool must know what it holds,
    or the long call is killed by the next call's cleanup of "its" slot and two calls share a uid."""
    srv = make_server(functions={"hello": HELLO_SRC, "sleeper": SLEEPER, "whoami": """
        import os
        def main(request):
            return str(os.getuid())
    """}, env={"FNBOX_SANDBOX_SLOTS": "3"}).start()
    marker = os.path.join(world, f"sleeper-{uuid.uuid4().hex}")

    def get(path: str, **params: str) -> requests.Response:
        # Slots 0-2 are shared with every other fnbox server on this host (the pool is machine-wide): when they
        # are all in use elsewhere, the answer is busy; try again. Each call that runs still moves our cycle on.
        deadline = time.monotonic() + 20
        while True:
            r = srv.get(path, params=params)
            if r.status_code != 503 or r.json()["error"] != "busy" or time.monotonic() > deadline:
                return r
            time.sleep(0.05)

    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=get("/function/sleeper", s="2", marker=marker)))
    t.start()
    deadline = time.monotonic() + 25
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    sleeper_uid = os.stat(marker).st_uid
    uids = []
    for _ in range(8):
        r = get("/function/whoami")
        assert r.status_code == 200, r.text
        uids.append(int(r.text))
    t.join(30)
    ended = time.time()
    assert result["r"].status_code == 200 and result["r"].text == "slept", result["r"].text
    assert sleeper_uid not in uids, (sleeper_uid, uids)
    hello_within_a_second(srv)
    assert_nothing_left(ended)
