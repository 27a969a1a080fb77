"""Test harness: real Gunicorn servers on free loopback ports, with temporary functions and profiles.

Every process a test starts is ended by its pid (the Gunicorn master's process group), never by name.

Tests own their world: the servers of one test process run their calls as sandbox uids of their own
(UID_BASE.., per process, apart from a real server's 61000.. and from other test runs), in a cgroup parent and
a scratch folder of their own, and each server has its own state and data folders. Slot claims are by uid in
the machine-wide registry, so even a server whose uids overlap ours (a `make run` with FNBOX_UID_BASE set, another
helper's test run) cannot take, sweep or kill our calls, nor we theirs; the leftover checks below count only
our uid range and scratch folder.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
GUNICORN = os.path.join(REPO, ".venv", "bin", "gunicorn")
SLOTS = 256
# 256 uids per test process: 400000 + (pid % 8192) * 256, below 2.5 M, apart from the 100000..330000 of
# tests/faultkit.py's roles, from nobody (65534) and from a real server's default 61000..; uids are 32-bit.
UID_BASE = 400_000 + (os.getpid() % 8192) * SLOTS
SCRATCH = f"/tmp/fnbox-test-scratch-{os.getpid()}"
CGROUP_PARENT = f"fnbox-test-{os.getpid()}"
_OWNER = os.getpid()  # a forked helper process must not remove the world of the test process


def cgroup_dirs(parent: str = CGROUP_PARENT) -> list[str]:
    """The folders a server with this FNBOX_CGROUP_PARENT makes under our own cgroup, in every hierarchy."""
    own: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _hid, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(",") if ctrls else ["unified"]:
                    own[c.removeprefix("name=")] = path
    except OSError:
        return []
    out = []
    try:
        mounts = os.listdir("/sys/fs/cgroup")
    except OSError:
        return []
    for mount in mounts:
        ctrls = [c for c in mount.split(",") if c in own]
        if not ctrls:
            continue
        for d in (os.path.join("/sys/fs/cgroup", mount, own[ctrls[0]].lstrip("/"), parent),
                  os.path.join("/sys/fs/cgroup", mount, parent)):
            if os.path.isdir(d) and d not in out:
                out.append(d)
    return out


def remove_cgroups(parent: str = CGROUP_PARENT) -> None:
    """Removes a test cgroup parent (empty cgroups only: a cgroup that still holds a process stays)."""
    for top in cgroup_dirs(parent):
        for root, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(root)
            except OSError:
                pass


def _remove_world() -> None:
    if os.getpid() != _OWNER:
        return
    shutil.rmtree(SCRATCH, ignore_errors=True)
    remove_cgroups()


atexit.register(_remove_world)


# Calls see only their own file system view (runner/fsview.py): folders a test shares with its calls (markers,
# traces) are made under SHARED, which every test server binds into its calls' views (FNBOX_SANDBOX_SHARED_DIRS).
SHARED = tempfile.mkdtemp(prefix="fnbox-test-shared-", dir="/tmp")
os.chmod(SHARED, 0o755)
_SHARED_OWNER = os.getpid()


@atexit.register
def _remove_shared() -> None:
    if os.getpid() == _SHARED_OWNER:
        shutil.rmtree(SHARED, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dedent(src: str) -> str:
    return textwrap.dedent(src).lstrip("\n")


class Server:
    """A real fnbox server: `gunicorn -c ops/gunicorn.conf.py` with its own functions and profiles folders."""

    def __init__(self, functions: dict[str, str] | None = None, profiles: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, workers: int = 1, threads: int = 16) -> None:
        # Sandbox uids must be able to read the functions: a world-readable folder outside pytest's 0700 tmp.
        self.functions_dir = tempfile.mkdtemp(prefix="fnbox-test-fn-", dir="/tmp")
        os.chmod(self.functions_dir, 0o755)
        self.profiles_dir = tempfile.mkdtemp(prefix="fnbox-test-prof-", dir="/tmp")  # 0700: sandbox can't read
        for name in os.listdir(os.path.join(REPO, "sandbox_profiles")):
            shutil.copy(os.path.join(REPO, "sandbox_profiles", name), self.profiles_dir)
        with open(os.path.join(self.functions_dir, "__init__.py"), "w") as f:
            f.write("")
        for name, src in (functions or {}).items():
            self.write_function(name, src)
        for name, text in (profiles or {}).items():
            self.write_profile(name, text)
        # Deployed versions and call history: per server, readable by sandbox uids (packages are symlinks there).
        self.data_dir = tempfile.mkdtemp(prefix="fnbox-test-data-", dir="/tmp")
        os.chmod(self.data_dir, 0o755)
        self.state_dir = tempfile.mkdtemp(prefix="fnbox-test-state-", dir="/tmp")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server gets its own metrics folder (ops/gunicorn.conf.py makes one): a PROMETHEUS_MULTIPROC_DIR left
        # in this process's environment (a test that runs the config file in-process sets it) is another server's.
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        world = {"FNBOX_UID_BASE": str(UID_BASE), "FNBOX_SANDBOX_SLOTS": str(SLOTS), "FNBOX_SCRATCH_DIR": SCRATCH,
                 "FNBOX_CGROUP_PARENT": CGROUP_PARENT, "FNBOX_STATE_DIR": self.state_dir}
        self.env = dict(inherited, FNBOX_BIND=f"127.0.0.1:{self.port}", FNBOX_FUNCTIONS_DIR=self.functions_dir,
                        FNBOX_PROFILES_DIR=self.profiles_dir, FNBOX_DATA_DIR=self.data_dir, FNBOX_WORKERS=str(workers),
                        FNBOX_THREADS=str(threads), FNBOX_SANDBOX_SHARED_DIRS=SHARED, **world)
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="fnbox-test-log-"), "server.log")

    @property
    def db_path(self) -> str:
        """The server's call history database."""
        return os.path.join(self.data_dir, "history.sqlite3")

    def write_function(self, name: str, src: str) -> str:
        path = os.path.join(self.functions_dir, name if name.endswith(".py") or "/" in name else name + ".py")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(dedent(src))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic, as a deploy would be
        return path

    def write_profile(self, name: str, text: str) -> None:
        with open(os.path.join(self.profiles_dir, name), "w") as f:
            f.write(dedent(text))

    def start(self, wait: bool = True) -> Server:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([GUNICORN, "-c", "ops/gunicorn.conf.py"], cwd=REPO, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.get(self.url + path, **kw)

    def request(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.request(method, self.url + path, **kw)

    def pids(self) -> list[int]:
        """The master and every process below it (workers, fork servers, calls)."""
        if not self.proc:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            return [master.pid, *(p.pid for p in master.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 20) -> None:
        if not self.proc or self.proc.poll() is not None:
            self._cleanup_dirs()
            return
        known = self.pids()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        deadline = time.monotonic() + 10
        for pid in known:  # fork servers run in their own session: end any straggler by its pid
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                try:
                    if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.05)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()
        self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        shutil.rmtree(self.functions_dir, ignore_errors=True)
        shutil.rmtree(self.profiles_dir, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


SPARE = re.compile(r"^\d+-\d+-s\d+$")  # an idle spare's scratch dir; a call's is renamed when it starts


def is_spare(path: str) -> bool:
    return bool(SPARE.match(os.path.basename(path)))


def sandbox_processes(older_than: float | None = None, spares: bool = False) -> list[psutil.Process]:
    """Processes running under a sandbox slot uid (root mode), optionally only those created before a time.
    Idle spares (forked ahead of demand, never given a call: their cwd is a spare's scratch dir) are capacity,
    not leftovers, and are left out unless asked for."""
    found = []
    for p in psutil.process_iter(["uids", "create_time", "status"]):
        try:
            uids = p.info["uids"]
            if uids and UID_BASE <= uids.real < UID_BASE + SLOTS and p.info["status"] != psutil.STATUS_ZOMBIE:
                if older_than is None or p.info["create_time"] <= older_than:
                    if spares or not is_spare(p.cwd()):
                        found.append(p)
        except psutil.Error:
            pass
    return found


def scratch_entries(older_than: float | None = None) -> list[str]:
    out = []
    try:
        for e in os.scandir(SCRATCH):
            if is_spare(e.path):
                continue
            try:
                if older_than is None or e.stat(follow_symlinks=False).st_mtime <= older_than:
                    out.append(e.path)
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return out


# World-writable folders where a call could leave files (as root, the runner removes what its uids leave there).
LITTER_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _sandbox_uid(uid: int) -> bool:
    return UID_BASE <= uid < UID_BASE + SLOTS


def sandbox_files(older_than: float | None = None) -> list[str]:
    """Entries a sandbox uid owns at the top level of the world-writable temp folders, and SysV IPC objects
    (shared memory, message queues, semaphores) it owns in the host's IPC namespace."""
    out = []
    for d in LITTER_DIRS:
        try:
            with os.scandir(d) as entries:
                for e in entries:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if _sandbox_uid(st.st_uid) and (older_than is None or st.st_mtime <= older_than):
                        out.append(e.path)
        except FileNotFoundError:
            pass
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = f.read().splitlines()
        except OSError:
            continue
        col = header.split().index("uid")
        out.extend(f"sysvipc {kind} {row.split()[1]}" for row in rows if _sandbox_uid(int(row.split()[col])))
    return out


def assert_nothing_left(since: float, timeout: float = 3.0) -> None:
    """No sandbox process created before `since` (the end of the call under test), no scratch directory from
    before it, and no file or IPC object of a sandbox uid outside it survives; waits a bounded time for the
    runner's cleanup."""
    deadline = time.monotonic() + timeout
    while True:
        procs = sandbox_processes(older_than=since)
        dirs = scratch_entries(older_than=since)
        files = sandbox_files(older_than=since) if os.geteuid() == 0 else []
        if not procs and not dirs and not files:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {[(p.pid, p.info) for p in procs]}, scratch {dirs}, "
                                 f"files {files}")
        time.sleep(0.05)


def server_fixture(name: str = "server", **kw) -> object:
    """A module-scoped fixture named `name` that runs one Server(**kw) for the whole test file:
    `server = server_fixture(functions=FUNCTIONS)` in a test module. The server is stopped (by pid) even when
    its start fails."""

    @pytest.fixture(scope="module", name=name)
    def _server() -> Iterator[Server]:
        s = Server(**kw)
        try:
            s.start()
            yield s
        finally:
            s.stop()

    return _server


@pytest.fixture
def make_server() -> Iterator:
    servers: list[Server] = []

    def factory(**kw) -> Server:
        s = Server(**kw)
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop()


__all__ = ["Server", "assert_nothing_left", "dedent", "free_port", "sandbox_files", "sandbox_processes",
           "scratch_entries", "server_fixture"]
_ = sys
