"""Starting, watching and stopping the servers under test.

Every server is a Gunicorn master started in its own session, so Ctrl-C in the terminal reaches only the
bench driver, which then stops each server itself. Stopping is by pid only: SIGTERM to the master, a bounded
wait, then SIGKILL to the master's process group and to every descendant ever seen (fnbox's sandboxes may
leave the group). psutil.Process refuses to signal a pid that was reused, so a stale pid is never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests


@dataclass
class Server:
    """One running server: its Gunicorn master and every descendant process seen so far."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    # psutil.Process compares by (pid, create time), so a reused pid is a different member of this set.
    seen: set[psutil.Process] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The master and all its live descendants, remembered for the final kill."""
        try:
            master = psutil.Process(self.proc.pid)
            procs = [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen.update(procs)
        return procs

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A currently free loopback port. Racy in theory; startup fails loudly if another process takes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path, port: int) -> Server:
    """Start a Gunicorn master in a new session, output to log_path."""
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own copy of the descriptor
    return Server(name=name, port=port, proc=proc, log_path=log_path)


def wait_http_ok(server: Server, path: str, timeout_s: float = 30.0) -> None:
    """Poll GET path until it answers 200; raise with the server's log tail if it never does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode} while starting:\n{server.log_tail()}"
            )
        try:
            r = requests.get(server.base_url + path, timeout=2)
            if r.status_code == 200:
                server.processes()
                return
            last = f"HTTP {r.status_code}: {r.text[:200]!r}"
        except requests.RequestException as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise RuntimeError(f"{server.name}: GET {path} not 200 within {timeout_s:.0f} s ({last}):\n{server.log_tail()}")


def _tree_cpu_seconds(server: Server) -> tuple[float, int]:
    total = 0.0
    procs = server.processes()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total, len(procs)


def wait_quiet(server: Server, timeout_s: float = 60.0, window_s: float = 0.5, max_share: float = 0.05) -> bool:
    """Wait until the server's process tree has used < max_share of one core for two windows in a row.

    After wrk stops, a saturated server still drains requests it had already accepted (the spawn baseline
    may have dozens queued); measuring the next server while that runs would charge it for the CPU theft.
    Returns False if the server is still busy at the deadline (the caller warns and goes on).
    """
    deadline = time.monotonic() + timeout_s
    quiet_windows = 0
    prev_cpu, prev_n = _tree_cpu_seconds(server)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        cpu, n = _tree_cpu_seconds(server)
        # A process that exits takes its CPU time with it until reaped, so the sum can drop: treat a drop or a
        # change in process count as activity rather than trusting the delta.
        busy = n != prev_n or cpu < prev_cpu or (cpu - prev_cpu) > max_share * window_s
        quiet_windows = 0 if busy else quiet_windows + 1
        if quiet_windows >= 2:
            return True
        prev_cpu, prev_n = cpu, n
    return False


def _in_group(p: psutil.Process, pgid: int) -> bool:
    try:
        return p.is_running() and os.getpgid(p.pid) == pgid
    except (ProcessLookupError, psutil.Error):
        return False


def stop(server: Server, timeout_s: float = 10.0) -> None:
    """SIGTERM the master, wait bounded, then SIGKILL whatever of the server is left, by pid."""
    server.processes()  # refresh the set of known descendants before the tree starts to come apart
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The master was started with start_new_session, so its pgid is its pid; the group may still hold workers
    # forked after the last refresh. Only signal the group while it provably still exists: the master is
    # unreaped (so its pid cannot have been reused) or a known member of the group is alive.
    group_alive = server.proc.poll() is None or any(
        _in_group(p, server.proc.pid) for p in server.seen if p.pid != server.proc.pid
    )
    if group_alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.proc.pid, signal.SIGKILL)
    for p in server.seen:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if p.is_running():
                p.kill()
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    # Bounded reap of the known descendants so none is left as a zombie holding memory accounting.
    psutil.wait_procs(list(server.seen), timeout=5)
