"""Kernel memory and pids limits and CPU accounting per sandbox slot, with cgroup v1 (memory, pids, cpuacct).

Each slot owns one memory cgroup and one pids cgroup below the server's own cgroup, created once and reused
(attaching a process to an existing cgroup costs ~0.04 ms here, creating one ~0.4 ms). A slot's cgroup also
names every process of the call, so killing "everything in the cgroup" catches double-forked daemons too.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

V1_ROOT = "/sys/fs/cgroup"


def _own_path(controller: str) -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _hid, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller in ctrls.split(","):
                    return path
    except OSError:
        return None
    return None


# Raw syscalls, no io/codecs layers: the fork server touches these files several times per call, and open() in
# text mode costs ~5x more than the read itself (measured with py-spy under load).
def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def v1_base(controller: str, parent: str = "fnbox") -> str | None:
    """The directory under which fnbox creates its slot cgroups for a v1 controller, or None. `parent` is
    Settings.cgroup_parent (FNBOX_CGROUP_PARENT), relative to the server's own cgroup."""
    mount = os.path.join(V1_ROOT, controller)
    own = _own_path(controller)
    if own is None or not os.path.isfile(os.path.join(mount, "cgroup.procs")):
        return None
    base = os.path.join(mount, own.lstrip("/"), parent)
    if not os.path.isdir(os.path.join(mount, own.lstrip("/"))):
        # A container may show its own cgroup as the mount root.
        base = os.path.join(mount, parent)
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return None
    return base if os.access(base, os.W_OK) else None


def slot_dir(base: str, key: int) -> str:
    """The folder of the slot whose uid is `key` below a controller's fnbox base."""
    return os.path.join(base, f"slot-{key}")


class SlotCgroup:
    """The v1 memory + pids cgroups of one sandbox slot."""

    def __init__(self, memory_base: str, pids_base: str | None, key: int, cpuacct_base: str | None = None) -> None:
        # Named by the slot's uid (key), as its lock in the machine-wide registry is: whoever holds the lock
        # owns these cgroups, whatever server it belongs to.
        self.mem = slot_dir(memory_base, key)
        self.pids = slot_dir(pids_base, key) if pids_base else None
        # cpuacct: the CPU time of every process of the call, whatever forked it (RLIMIT_CPU is per process).
        self.cpu = slot_dir(cpuacct_base, key) if cpuacct_base else None
        for d in filter(None, (self.mem, self.pids, self.cpu)):
            os.makedirs(d, exist_ok=True)
        self._limits: tuple[int, int] | None = None
        self._oom_base = self.oom_kills()
        self._cpu_base = 0

    def dirs(self) -> tuple[str, ...]:
        """The slot's cgroup folders (bound into the call's file system view: it may read its own limits)."""
        return tuple(filter(None, (self.mem, self.pids, self.cpu)))

    def cpu_ns(self) -> int | None:
        """CPU time used by the slot's processes since reset_peak(), in ns; None without cpuacct."""
        if self.cpu is None:
            return None
        try:
            return int(_read(os.path.join(self.cpu, "cpuacct.usage"))) - self._cpu_base
        except (OSError, ValueError):
            return None

    def set_limits(self, memory_bytes: int, max_pids: int) -> None:
        if self._limits == (memory_bytes, max_pids):
            return
        limit = os.path.join(self.mem, "memory.limit_in_bytes")
        memsw = os.path.join(self.mem, "memory.memsw.limit_in_bytes")
        # memsw must stay >= limit at every step, so the order of the two writes depends on the direction.
        try:
            _write(limit, str(memory_bytes))
            if os.path.exists(memsw):
                _write(memsw, str(memory_bytes))
        except OSError as e:
            if e.errno != errno.EINVAL or not os.path.exists(memsw):
                raise
            _write(memsw, str(memory_bytes))
            _write(limit, str(memory_bytes))
        if self.pids:
            _write(os.path.join(self.pids, "pids.max"), str(max_pids))
        self._limits = (memory_bytes, max_pids)

    def forget_limits(self) -> None:
        """The slot is shared by every fork server of the machine: what we wrote last may have been changed."""
        self._limits = None

    def reset_peak(self) -> None:
        try:
            _write(os.path.join(self.mem, "memory.max_usage_in_bytes"), "0")
        except OSError:
            pass
        self._oom_base = self.oom_kills()
        if self.cpu is not None:
            self._cpu_base = 0
            try:  # a counter of our own: reset it (root may write 0), else remember where it stands
                _write(os.path.join(self.cpu, "cpuacct.usage"), "0")
            except OSError:
                self._cpu_base = self.cpu_ns() or 0

    def attach_self(self) -> None:
        """Called in the forked child, as root, before it drops privileges."""
        _write(os.path.join(self.mem, "cgroup.procs"), "0")
        if self.pids:
            _write(os.path.join(self.pids, "cgroup.procs"), "0")
        if self.cpu:
            _write(os.path.join(self.cpu, "cgroup.procs"), "0")

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for d in filter(None, (self.mem, self.pids)):
            try:
                pids.update(int(x) for x in _read(os.path.join(d, "cgroup.procs")).split())
            except OSError:
                pass
        return sorted(pids)

    def usage_bytes(self) -> int:
        try:
            return int(_read(os.path.join(self.mem, "memory.usage_in_bytes")))
        except (OSError, ValueError):
            return 0

    def peak_bytes(self) -> int:
        try:
            return int(_read(os.path.join(self.mem, "memory.max_usage_in_bytes")))
        except (OSError, ValueError):
            return 0

    def oom_kills(self) -> int:
        try:
            for line in _read(os.path.join(self.mem, "memory.oom_control")).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def oom_killed(self) -> bool:
        return self.oom_kills() > self._oom_base

    def kill_all(self, reap: Callable[[], object] | None = None, timeout: float = 2.0) -> bool:
        """SIGKILLs every process in the slot until none is left; True when empty. Bounded by timeout.

        A fork bomb can add processes between reading the list and signalling, so it loops; killed processes
        cannot fork, and pids.max bounds the rest, so it converges in a few rounds.
        """
        deadline = time.monotonic() + timeout
        while True:
            pids = self.procs()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if reap:
                reap()  # killed children of the reaper stay listed as zombies until reaped
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
