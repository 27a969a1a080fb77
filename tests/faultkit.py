"""Helpers shared by tests/test_faults.py, tests/soak.py and tests/load_nginx.py: an isolated sandbox uid range
and scratch folder per server, the server's process tree, and leftover checks that allow the idle spares of live
fork servers.

Isolation: a server started with `isolated_env()` runs its calls as uids uid_base.. (apart from the 61000.. of
the other test files, and per process) with its own scratch folder, and `follow()` points conftest's leftover checks
(`sandbox_processes`, `scratch_entries`, `sandbox_files`, `assert_nothing_left`) at them. Killing processes and
counting leftovers then concerns that server only, even while another test run on the machine has calls in
flight. Slot claims are machine-wide by uid (the runner's one slot registry per machine), so even overlapping
ranges could not collide; the ranges keep the leftover counts apart. Cgroup parent and state folder: the
conftest Server's own (per test process, per server).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil

import tests.conftest as conftest
from runner.config import Settings
from runner.zygote import FORK_SERVER_PREFIX, ZYGOTE_NAME
from tests.conftest import Server


def _uid_base(role: int) -> int:
    """256 uids per role (0 faults, 1 soak, 2 load) and per process: two runs on one machine (a CI clone beside a
    working copy) do not see each other's calls either. 100000 + (pid % 300 * 3 + role) * 256: below 330 000,
    far from the 61000.. of the other tests and from nobody (65534); Linux uids are 32-bit."""
    return 100_000 + ((os.getpid() % 300) * 3 + role) * 256


FAULTS_UID_BASE = _uid_base(0)  # tests/test_faults.py
SOAK_UID_BASE = _uid_base(1)  # tests/soak.py
LOAD_UID_BASE = _uid_base(2)  # tests/load_nginx.py


def make_scratch_dir(prefix: str) -> str:
    """A scratch folder for one server: root's, 0711 (sandbox uids enter their own dir, never list)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o711)
    return d


def isolated_env(uid_base: int, scratch: str) -> dict[str, str]:
    return {"FNBOX_UID_BASE": str(uid_base), "FNBOX_SCRATCH_DIR": scratch}


def follow(uid_base: int, scratch: str) -> None:
    """Points conftest's leftover checks at this uid range and scratch folder (for scripts; tests monkeypatch)."""
    conftest.UID_BASE = uid_base
    conftest.SCRATCH = scratch


def wait_for(cond: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Polls cond() until it is truthy (returned) or the timeout passes (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False




def _master_children(srv: Server) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The master's children: (Gunicorn workers, fork-server zygotes)."""
    try:
        children = psutil.Process(srv.proc.pid).children()
    except psutil.NoSuchProcess:
        return [], []
    workers, zygotes = [], []
    for c in children:
        try:
            (zygotes if c.name() == ZYGOTE_NAME else workers).append(c)
        except psutil.Error:
            pass
    return workers, zygotes


def workers_of(srv: Server) -> list[psutil.Process]:
    """The Gunicorn workers: the master's children but its fork-server zygote(s)."""
    return _master_children(srv)[0]


def zygotes_of(srv: Server) -> list[psutil.Process]:
    return _master_children(srv)[1]


def _root_children(parents: Iterable[psutil.Process]) -> Iterator[tuple[psutil.Process, psutil.Process]]:
    """(parent, child) for each child running as root (real uid 0) of each parent still there."""
    for p in parents:
        try:
            children = p.children()
        except psutil.Error:
            continue
        for c in children:
            try:
                if c.uids().real == 0:
                    yield p, c
            except psutil.Error:
                pass


def fork_servers(srv: Server) -> dict[int, int]:
    """fork server pid -> its worker's pid. A fork server is forked by the server's zygote and named
    FORK_SERVER_PREFIX + the worker's pid (runner/zygote.py), or, without a zygote, it is its worker's own root
    child running runner.forkserver. Their own children, calls and spares, are not fork servers."""
    out = {}
    for _, c in _root_children(zygotes_of(srv)):
        try:
            name = c.name()
            if name.startswith(FORK_SERVER_PREFIX):
                out[c.pid] = int(name.split(":", 1)[1])
        except (psutil.Error, ValueError):
            pass
    for w, c in _root_children(workers_of(srv)):
        try:
            if "runner.forkserver" in " ".join(c.cmdline()):
                out[c.pid] = w.pid
        except psutil.Error:
            pass
    return out


def server_processes(srv: Server) -> list[psutil.Process]:
    """The server's own processes: master, workers, zygote, fork servers (not calls, spares or janitors)."""
    procs = []
    try:
        procs.append(psutil.Process(srv.proc.pid))
    except psutil.NoSuchProcess:
        return []
    procs.extend(workers_of(srv))
    procs.extend(zygotes_of(srv))
    for pid in fork_servers(srv):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def spares_per_fork_server(srv: Server) -> int:
    """Idle children a fork server may keep forked ahead of demand (0 with a runner that has no such thing)."""
    return getattr(Settings.from_env(srv.env), "spares", 0)


def leftovers(srv: Server, since: float) -> dict[str, object]:
    """What conftest.assert_nothing_left would report for a server that still runs, minus the idle spares of
    its live fork servers: sandbox processes and scratch folders from before `since` beyond at most FNBOX_SPARES
    children (each with one scratch folder) per live fork server, and sandbox files. Empty: nothing is left."""
    allowed = spares_per_fork_server(srv)
    live = fork_servers(srv)
    per_fs: Counter[int] = Counter()
    stray = []
    for p in conftest.sandbox_processes(older_than=since):
        try:
            parent = p.ppid()
        except psutil.Error:
            continue
        if parent in live:
            per_fs[parent] += 1
        else:
            stray.append((p.pid, parent))
    problems: dict[str, object] = {}
    if stray:
        problems["processes outside a live fork server (pid, parent)"] = stray
    too_many = {f: n for f, n in per_fs.items() if n > allowed}
    if too_many:
        problems[f"fork servers with more than {allowed} idle children"] = too_many
    dirs = conftest.scratch_entries(older_than=since)
    foreign = [d for d in dirs if not any(f"-{f}-" in os.path.basename(d) for f in live)]
    if foreign:
        problems["scratch folders of no live fork server"] = foreign
    if len(dirs) - len(foreign) > sum(min(n, allowed) for n in per_fs.values()):
        problems["scratch folders beyond the spares'"] = dirs
    files = conftest.sandbox_files(older_than=since) if os.geteuid() == 0 else []
    if files:
        problems["sandbox files"] = files
    return problems


def assert_no_leftovers(srv: Server, since: float, timeout: float = 5.0) -> None:
    """leftovers() is empty, within a bounded wait for the runner's asynchronous cleanup."""
    deadline = time.monotonic() + timeout
    while True:
        problems = leftovers(srv, since)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {problems}")
        time.sleep(0.05)


def everything_gone(pids: set[int], timeout: float = 5.0) -> dict[str, object]:
    """After a server stopped: none of its recorded processes, no sandbox process, scratch folder or file at all.
    Empty when so (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        problems: dict[str, object] = {}
        running = sorted(p for p in pids if alive(p))
        if running:
            problems["server processes"] = running
        procs = [p.pid for p in conftest.sandbox_processes()]
        if procs:
            problems["sandbox processes"] = procs
        dirs = conftest.scratch_entries()
        if dirs:
            problems["scratch folders"] = dirs
        files = conftest.sandbox_files() if os.geteuid() == 0 else []
        if files:
            problems["sandbox files"] = files
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)
