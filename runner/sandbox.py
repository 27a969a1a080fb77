"""The sandbox layers: slots (uid + cgroups + scratch), and what a forked child does before user code runs.

A slot is one concurrent call's identity on this machine: uid/gid `uid_base + i`, the cgroups `slot-i`, and a
lock file that says who holds it. Slots are machine-wide (several workers, several servers share the uid
range), so they are claimed with flock(): the kernel releases a dead holder's claim by itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import itertools
import os
import resource
import shutil
import signal
import sys
from dataclasses import dataclass

import psutil

from runner.cgroups import SlotCgroup, v1_base
from runner.config import Settings
from runner.profiles import Profile

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


MIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Slot:
    index: int
    uid: int | None  # None: the server is not root, calls run as the server's own uid
    gid: int | None
    lock_fd: int
    cgroup: SlotCgroup | None


@dataclass(frozen=True)
class Layers:
    """What this machine and this server's privileges allow; reported by runner.doctor and /healthz."""

    root: bool
    cgroup_memory: bool
    cgroup_pids: bool
    netns: bool
    userns: bool

    def describe(self) -> dict[str, str]:
        def st(ok: bool, good: str, bad: str) -> str:
            return f"active: {good}" if ok else f"DEGRADED: {bad}"

        return {
            "uid_pool": st(self.root, "each call runs as its own unprivileged uid",
                           "not root: calls run as the server's uid (they can signal and read each other "
                           "and the server; RLIMIT_NPROC counts the server's processes too)"),
            "memory_cgroup": st(self.cgroup_memory, "kernel memory limit per call (swap 0), OOM = memory_limit",
                                "no memory cgroup: only the psutil watchdog and RLIMIT_DATA cap memory"),
            "pids_cgroup": st(self.cgroup_pids, "pids.max per call caps fork and thread bombs",
                              "no pids cgroup: only RLIMIT_NPROC caps fork bombs"),
            "network_namespace": st(self.netns or self.userns, "network=false calls get an empty netns",
                                    "cannot unshare a network namespace: network=false is NOT enforced"),
            "rlimits": "active: cpu, data, fsize, nofile, core=0, nproc",
            "psutil_watchdog": "active: wall clock and tree RSS, polled by the fork server",
            "scratch_dir": "active: fresh per call, removed afterwards",
        }


def probe_layers(settings: Settings) -> Layers:
    root = os.geteuid() == 0
    mem = bool(root and v1_base("memory"))
    pids = bool(root and v1_base("pids"))
    netns = userns = False
    if root:
        netns = _can_unshare(CLONE_NEWNET)
    else:
        userns = _can_unshare(CLONE_NEWUSER | CLONE_NEWNET)
    return Layers(root=root, cgroup_memory=mem, cgroup_pids=pids, netns=netns, userns=userns)


def _can_unshare(flags: int) -> bool:
    pid = os.fork()
    if pid == 0:
        try:
            unshare(flags)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


class SlotPool:
    """Claims and releases machine-wide slots for one fork server."""

    def __init__(self, settings: Settings, layers: Layers) -> None:
        self.settings = settings
        self.layers = layers
        self.lock_dir = os.path.join(settings.state_dir, "slots")
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        self._mem_base = v1_base("memory") if layers.cgroup_memory else None
        self._pids_base = v1_base("pids") if layers.cgroup_pids else None
        self._fds: dict[int, int] = {}
        self._cgroups: dict[int, SlotCgroup] = {}
        self._next = itertools.cycle(range(settings.slots))
        os.makedirs(settings.scratch_dir, mode=0o711, exist_ok=True)
        os.chmod(settings.scratch_dir, 0o711)  # sandbox uids may enter their own dir, never list the others

    def acquire(self, reap=None) -> Slot | None:
        for _ in range(self.settings.slots):
            i = next(self._next)
            fd = self._fds.get(i)
            if fd is None:
                fd = os.open(os.path.join(self.lock_dir, f"{i}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._fds[i] = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            cg = None
            if self._mem_base:
                cg = self._cgroups.get(i)
                if cg is None:
                    cg = self._cgroups[i] = SlotCgroup(self._mem_base, self._pids_base, i)
                # A previous holder that died (kill -9 of a fork server) may have left processes behind.
                cg.kill_all(reap)
            uid = self.settings.uid_base + i if self.layers.root else None
            return Slot(i, uid, uid, fd, cg)
        return None

    def release(self, slot: Slot) -> None:
        fcntl.flock(slot.lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def kill_slot(slot: Slot, main_pid: int, reap=None) -> None:
    """Kills every process of the call: the cgroup's members, else every process of the slot's uid, else the
    main process's session and the psutil tree below it."""
    if slot.cgroup is not None:
        slot.cgroup.kill_all(reap)
        return
    victims: set[int] = set()
    try:
        proc = psutil.Process(main_pid)
        victims.update(p.pid for p in proc.children(recursive=True))
        victims.add(main_pid)
    except psutil.Error:
        pass
    if slot.uid is not None:
        for p in psutil.process_iter(["uids"]):
            try:
                if p.info["uids"] and p.info["uids"].real == slot.uid:
                    victims.add(p.pid)
            except psutil.Error:
                pass
    try:
        os.killpg(main_pid, signal.SIGKILL)  # the child called setsid(): its pid is its group
    except OSError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def make_scratch(settings: Settings, slot: Slot, call_id: str) -> str:
    path = os.path.join(settings.scratch_dir, f"{slot.index}-{call_id}")
    os.mkdir(path, 0o700)
    if slot.uid is not None:
        os.chown(path, slot.uid, slot.gid)
    return path


def remove_scratch(path: str) -> bool:
    """Removes a call's scratch dir; returns False when it is not empty (the caller hands it to a janitor)."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def remove_tree(path: str) -> None:
    # rmtree uses fd-based traversal on Linux: a symlink planted by the function is removed, never followed.
    shutil.rmtree(path, ignore_errors=True)


def enter(profile: Profile, slot: Slot, scratch: str, fds: list[int], data_base: int, layers: Layers) -> None:
    """Runs in the forked child, as the fork server's user, before anything of the call is read.

    Order matters: cgroups and namespaces need privileges, so they come before the identity drop; rlimits
    come last among privileged steps so RLIMIT_NPROC applies to the new uid.
    """
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the fork server is single-threaded: this is safe here
    if slot.cgroup is not None:
        slot.cgroup.attach_self()
    if not profile.network:
        if layers.netns:
            unshare(CLONE_NEWNET)
        elif layers.userns:
            unshare(CLONE_NEWUSER | CLONE_NEWNET)
    stdin_r, out_w, result_w = fds
    os.dup2(stdin_r, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(result_w, 3)
    os.closerange(4, 1 << 20)  # close_range(2): every other fd, whatever it is, is gone
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update(MIN_ENV)
    os.environ.update({"HOME": scratch, "TMPDIR": scratch})
    os.environ.update(profile.env)
    mb = 1024 * 1024
    cpu = max(1, int(-(-profile.cpu_s // 1)))
    data = data_base + profile.memory_mb * mb
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_DATA: (data, data),
        resource.RLIMIT_FSIZE: (profile.max_file_mb * mb, profile.max_file_mb * mb),
        resource.RLIMIT_NOFILE: (1024, 1024),
        resource.RLIMIT_CORE: (0, 0),
    }
    if slot.uid is not None:
        # Counted per real uid, so only meaningful when the call has a uid of its own.
        limits[resource.RLIMIT_NPROC] = (profile.max_processes, profile.max_processes)
    for res, lim in limits.items():
        resource.setrlimit(res, lim)
    if slot.uid is not None:
        os.setgroups([])
        os.setresgid(slot.gid, slot.gid, slot.gid)
        os.setresuid(slot.uid, slot.uid, slot.uid)
        # Changing uid made the process non-dumpable; let it read its own /proc/self again.
        prctl(PR_SET_DUMPABLE, 1)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    sys.dont_write_bytecode = True


def data_usage() -> int:
    """Bytes of the data segment (VmData) of this process: the child's RLIMIT_DATA is this plus memory_mb."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0
