"""The sandbox layers: slots (uid + cgroups + scratch), and what a forked child does before user code runs.

A slot is one concurrent call's identity on this machine: uid/gid `uid_base + i` (its key), the cgroups
`slot-<uid>`, and the lock on byte `uid` of `<slot_registry>/slots.lock` that says who holds it. Slots are
machine-wide (several workers, several servers, each with its own FNBOX_STATE_DIR, may share uids), so they are
claimed by uid in one registry per machine (runner.locks): the kernel releases a dead holder's claim by
itself, and a server only ever kills, sweeps or reuses what runs under a uid whose lock it holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass

import psutil

from runner import egress, fsview, syscalls
from runner.cgroups import SlotCgroup, slot_dir, v1_base
from runner.config import Settings
from runner.locks import LockTable
from runner.profiles import Profile

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWIPC = 0x08000000

# World-writable folders where a call could leave files that outlive it (in /dev/shm, RAM): after the call,
# whatever the slot's uid owns at their top level is removed. Those that exist here, deduplicated.
LITTER_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run/lock", "/var/lock", "/dev/mqueue")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# fnbox uses cgroup v1 controllers (cgroup v2 is not supported yet): what to do when one is missing.
V1_HINT = (" (needs root and the cgroup v1 controller mounted under /sys/fs/cgroup; on a cgroup v2-only system boot "
           "with systemd.unified_cgroup_hierarchy=0 on the kernel command line)")

MIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Slot:
    index: int
    uid: int | None  # None: the server is not root, calls run as the server's own uid
    gid: int | None
    lock_fd: int
    cgroup: SlotCgroup | None
    netns: int | None = None  # an fd holding this slot's empty network namespace (root only), reused per call
    key: int = 0  # uid_base + index (also without root): names the slot's lock, cgroups and scratch dirs
    mntns: int | None = None  # an fd holding this slot's file system view skeleton (runner.fsview), if active
    shared_dirs: tuple[str, ...] = ()  # Settings.shared_dirs, bound into the view
    seccomp: syscalls.Program | None = None  # the fork server's compiled filter, loaded by each call


@dataclass(frozen=True)
class Layers:
    """What this machine and this server's privileges allow; reported by runner.doctor and /healthz."""

    root: bool
    cgroup_memory: bool
    cgroup_pids: bool
    netns: bool
    userns: bool
    ipcns: bool = False
    fsview: bool = False  # own mount namespace view + hidepid procfs + tmpfs /tmp of max_disk_mb
    fsview_error: str = ""
    seccomp: bool = False
    cgroup_cpu: bool = False  # cpuacct per slot: cpu_s counts the whole process tree
    egress: bool = False  # nftables: network=true calls reach out, never the host (runner/egress.py)
    egress_error: str = ""
    off: frozenset[str] = frozenset()  # Settings.sandbox_off: layers turned off on purpose (benchmark, debugging)

    def describe(self) -> dict[str, str]:
        def st(ok: bool, good: str, bad: str) -> str:
            return f"active: {good}" if ok else f"DEGRADED: {bad}"

        return {
            "uid_pool": st(self.root, "each call runs as its own unprivileged uid",
                           "not root: calls run as the server's uid (they can signal and read each other "
                           "and the server; RLIMIT_NPROC counts the server's processes too)"),
            "memory_cgroup": st(self.cgroup_memory, "kernel memory limit per call (swap 0), OOM = memory_limit",
                                "no memory cgroup: only the psutil watchdog and RLIMIT_DATA cap memory" + V1_HINT),
            "pids_cgroup": st(self.cgroup_pids, "pids.max per call caps fork and thread bombs",
                              "no pids cgroup: only RLIMIT_NPROC caps fork bombs" + V1_HINT),
            "network_namespace": st(self.netns or self.userns, "network=false calls get an empty netns",
                                    "cannot unshare a network namespace: network=false is NOT enforced"),
            "ipc_namespace": st(self.ipcns, "SysV shared memory, semaphores and message queues and POSIX message "
                                            "queues of a call vanish with it",
                                "a call's shared memory segments and message queues outlive it"),
            "litter_sweep": "active: not needed: a call writes only to its own tmpfs, dropped with it" if self.fsview
            else st(self.root, "files a call's uid leaves in /tmp, /var/tmp, /dev/shm, /run/lock are "
                                          "removed after it",
                               "not root: files a call leaves in /tmp, /dev/shm... stay (they are the server's)"),
            "rlimits": "active: cpu, data, fsize, nofile, core=0" + (", nproc" if self.root else
                                                                      " (no nproc: the uid is shared)"),
            "psutil_watchdog": "active: wall clock, " + (
                "and any OOM kill in the call's memory cgroup ends the call" if self.cgroup_memory else
                "and tree memory (RSS, then PSS), polled by the fork server"),
            "scratch_dir": "active: not needed: a call's cwd, HOME and TMPDIR are its own tmpfs" if self.fsview
            else "active: fresh per call, removed afterwards",
            "file_system_view": st(self.fsview, "a read-only root of its own per call (runtime, venv, its own "
                                                "function; no project, profiles, history, /home, /root, /var, "
                                                "/sys or host socket), a private /tmp of max_disk_mb",
                                   "calls see the host's file system (as their uid may): "
                                   + (self.fsview_error or "needs root and mount namespaces")),
            "own_processes": st(self.fsview, "/proc mounted with hidepid=invisible: a call sees only its own "
                                             "processes",
                                "calls see every process of the machine in /proc"),
            "disk_quota": st(self.fsview, "max_disk_mb caps /tmp (+ /dev/shm, /var/tmp): ENOSPC past it",
                             "no cap on the total a call writes (only max_file_mb per file)"),
            "syscall_filter": st(self.seccomp, "seccomp (libseccomp): namespaces, mounts, ptrace, keyring, bpf, "
                                               "perf, io_uring, modules... fail with EPERM",
                                 "no syscall filter (libseccomp or pyseccomp missing)"),
            "network_egress": st(self.egress, "network=true calls cannot reach the host: loopback and every "
                                              "local address refuse the sandbox uids (nftables)",
                                 "network=true calls can reach every service of the host (127.0.0.1 included): "
                                 + (self.egress_error or "needs root and nft")),
            "cpu_cgroup": st(self.cgroup_cpu, "cpuacct per call: cpu_s counts every process of the call",
                             "no cpuacct cgroup: cpu_s is per process (RLIMIT_CPU); forked children add up" + V1_HINT),
        } | {name: "DEGRADED: turned off by FNBOX_SANDBOX_OFF (for benchmarks and debugging only)"
             for name in self.off}


def probe_layers(settings: Settings) -> Layers:
    root = os.geteuid() == 0
    mem = bool(root and v1_base("memory", settings.cgroup_parent))
    pids = bool(root and v1_base("pids", settings.cgroup_parent))
    cpu = bool(root and mem and v1_base("cpuacct", settings.cgroup_parent))
    netns = userns = ipcns = False
    if root:
        netns = _can_unshare(CLONE_NEWNET)
        ipcns = _can_unshare(CLONE_NEWIPC)
    else:
        # Unprivileged, the IPC namespace comes with the user namespace, i.e. only for network=false calls.
        userns = _can_unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC)
    off = settings.sandbox_off
    cpu = cpu and "cpu_cgroup" not in off
    view, view_error = _probe_view(settings) if root and "file_system_view" not in off else (False, "")
    seccomp = "syscall_filter" not in off and syscalls.compile_program() is not None
    out, out_error = False, ""
    if root and "network_egress" not in off:
        try:  # nft -c: checked against the kernel, nothing changed (the doctor calls this too)
            egress.check(settings.uid_base, settings.slots)
            out = True
        except egress.EgressError as e:
            out_error = str(e)
    return Layers(root=root, cgroup_memory=mem, cgroup_pids=pids, netns=netns, userns=userns, ipcns=ipcns,
                  fsview=view, fsview_error=view_error, seccomp=seccomp, cgroup_cpu=cpu, egress=out,
                  egress_error=out_error, off=off)


def view_spec(settings: Settings) -> fsview.ViewSpec:
    parent = settings.cgroup_parent
    bases = ([b for b in (v1_base("memory", parent), v1_base("pids", parent), v1_base("cpuacct", parent)) if b]
             if os.geteuid() == 0 else [])
    return fsview.ViewSpec(functions_dir=os.path.realpath(settings.functions_dir),
                           ro_trees=fsview.runtime_trees(settings.data_dir), uid_base=settings.uid_base,
                           slots=settings.slots,
                           cgroup_dirs=tuple(slot_dir(b, settings.uid_base + i) for b in bases
                                             for i in range(settings.slots)),
                           shared_dirs=settings.shared_dirs)


def _probe_view(settings: Settings) -> tuple[bool, str]:
    """Builds one real skeleton (a few ms, once per fork server): the layer is active only if that works."""
    try:
        fd = fsview.build(view_spec(settings), os.path.join(settings.state_dir, "view"))
    except OSError as e:
        return False, str(e)
    os.close(fd)
    return True, ""


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
        os.makedirs(settings.slot_registry, mode=0o700, exist_ok=True)
        self.registry = LockTable(os.path.join(settings.slot_registry, "slots.lock"))
        self._mem_base = v1_base("memory", settings.cgroup_parent) if layers.cgroup_memory else None
        self._pids_base = v1_base("pids", settings.cgroup_parent) if layers.cgroup_pids else None
        self._held: set[int] = set()  # slot indexes held by this fork server
        self._cpu_base = v1_base("cpuacct", settings.cgroup_parent) if layers.cgroup_cpu else None
        self._cgroups: dict[int, SlotCgroup] = {}
        self._netns_fds: dict[int, int] = {}
        os.makedirs(settings.scratch_dir, mode=0o711, exist_ok=True)
        st = os.lstat(settings.scratch_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            # Someone else's folder (a sandbox uid can create one in /var/tmp if it is ever missing) would let
            # its owner swap a call's scratch dir for a symlink between our mkdir() and chown().
            raise RuntimeError(f"{settings.scratch_dir} is not a folder owned by uid {os.geteuid()}: refusing to "
                               "use it as the scratch folder")
        os.chmod(settings.scratch_dir, 0o711)  # sandbox uids may enter their own dir, never list the others
        # With a file system view, a call writes only to its own tmpfs: there is no host folder to sweep.
        self.litter_dirs = _litter_dirs() if layers.root and not layers.fsview else []
        self._mntns_fd: int | None = None
        self.seccomp = syscalls.compile_program() if layers.seccomp else None  # compiled once, loaded per call
        if layers.egress:
            egress.install_or_warn(settings.uid_base, settings.slots)

    def sweep(self) -> list[str]:
        """Ends what calls of a dead fork server left in the slots nobody holds: a call's main process dies with
        its fork server (PDEATHSIG), its grandchildren and daemons do not, and its scratch dir stays. Runs once,
        when a fork server starts. One slot at a time is locked (never all: other servers keep starting calls),
        so no call starts in a slot while it is swept. Files its uid left in the litter folders are removed too.
        Returns the orphaned folders, already made root's, for a janitor to remove."""
        by_slot: dict[int, list[str]] = {}
        first = self.settings.uid_base
        with os.scandir(self.settings.scratch_dir) as entries:  # named "<slot uid>-<fork server pid>-<call>"
            for e in entries:
                head = e.name.split("-", 1)[0]
                # Another server's uids (a scratch folder may be shared) are not ours to sweep.
                if (head.isdigit() and first <= int(head) < first + self.settings.slots
                        and e.is_dir(follow_symlinks=False)):
                    by_slot.setdefault(int(head) - first, []).append(e.path)
        litter: dict[int, list[tuple[str, str, bool]]] = {}  # uid -> (folder, name, is a dir)
        for d in self.litter_dirs:
            try:
                with os.scandir(d) as entries:
                    for e in entries:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if self.settings.uid_base <= st.st_uid < self.settings.uid_base + self.settings.slots:
                            litter.setdefault(st.st_uid, []).append((d, e.name, stat.S_ISDIR(st.st_mode)))
            except OSError:
                pass
        uid_pids: dict[int, list[int]] = {}
        # Also with cgroups: a server with another FNBOX_CGROUP_PARENT may have left processes under our uids.
        if self.layers.root:
            last = self.settings.uid_base + self.settings.slots
            for p in psutil.process_iter(["uids"]):
                uids = p.info["uids"]
                if uids and self.settings.uid_base <= uids.real < last:
                    uid_pids.setdefault(uids.real, []).append(p.pid)
        orphans: list[str] = []
        for i in range(self.settings.slots):
            uid = self.settings.uid_base + i
            if i in self._held or not (by_slot.get(i) or uid_pids.get(uid) or litter.get(uid)
                                       or self._cgroup_busy(i)):
                continue
            if not self.registry.try_claim(uid):
                continue  # in use by a live fork server
            try:
                if self._mem_base:
                    self._cgroup(i).kill_all()  # a dead fork server's calls: not our children
                if uid in uid_pids:
                    kill_uids({uid})
                for path in by_slot.get(i, []):
                    try:
                        _disown(path)
                        orphans.append(path)
                    except OSError:
                        pass
                for d, name, is_dir in litter.get(uid, []):
                    path = os.path.join(d, name)
                    try:
                        if is_dir:
                            _disown(path)
                            orphans.append(path)
                        else:
                            os.unlink(path)
                    except OSError:
                        pass
            finally:
                self.registry.release(uid)
        return orphans

    def _cgroup_busy(self, i: int) -> bool:
        """Whether slot i's cgroups hold any process (read without the slot's lock: only a hint). Every process
        of a call is in both, so one is enough."""
        base = self._pids_base or self._mem_base
        if base is None:
            return False
        try:
            with open(os.path.join(slot_dir(base, self.settings.uid_base + i), "cgroup.procs")) as f:
                return bool(f.read(1))
        except OSError:
            return False

    def _cgroup(self, i: int) -> SlotCgroup:
        cg = self._cgroups.get(i)
        if cg is None:
            assert self._mem_base is not None
            cg = self._cgroups[i] = SlotCgroup(self._mem_base, self._pids_base, self.settings.uid_base + i,
                                               cpuacct_base=self._cpu_base)
        return cg

    def litter_changed(self, stamp: tuple[int, ...]) -> bool:
        """Whether some litter folder got an entry since the stamp (a few stat() calls: O(1) per call)."""
        return self.litter_stamp() != stamp

    def litter_small(self, limit: int = 64 * 1024) -> bool:
        """Whether every litter folder is small enough to sweep at once (a directory's st_size grows with its
        entries: 20 bytes each on tmpfs); a folder of 100 000 files is swept by a janitor process instead."""
        for d in self.litter_dirs:
            try:
                if os.stat(d).st_size > limit:
                    return False
            except OSError:
                pass
        return True

    def litter_stamp(self) -> tuple[int, ...]:
        """The litter folders' mtimes: a folder whose mtime did not change got no new entry."""
        out = []
        for d in self.litter_dirs:
            try:
                out.append(os.stat(d).st_mtime_ns)
            except OSError:
                out.append(0)
        return tuple(out)

    def sweep_litter(self, slot: Slot, stamp: tuple[int, ...]) -> list[str]:
        """After a call (its processes are all dead): removes the files its uid left at the top level of the
        litter folders, and returns the folders it left, already made root's (so the next call of this uid
        cannot enter them) for a janitor to remove."""
        if slot.uid is None:
            return []
        later = []
        for d, before in zip(self.litter_dirs, stamp, strict=True):
            try:
                if os.stat(d).st_mtime_ns == before:
                    continue
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                with os.scandir(dfd) as entries:
                    for e in entries:
                        try:
                            st = e.stat(follow_symlinks=False)
                            if st.st_uid != slot.uid:
                                continue
                            if stat.S_ISDIR(st.st_mode):
                                _disown(e.name, dfd)
                                later.append(os.path.join(d, e.name))
                            else:
                                os.unlink(e.name, dir_fd=dfd)
                        except OSError:
                            pass
            finally:
                os.close(dfd)
        return later

    def acquire(self) -> Slot | None:
        # Lowest free slot first: the slots in use (and the lock fds and namespaces cached for them) stay as few
        # as the calls ever in flight at once.
        for i in range(self.settings.slots):
            if i in self._held or not self.registry.try_claim(self.settings.uid_base + i):
                continue
            self._held.add(i)
            cg = None
            if self._mem_base:
                cg = self._cgroup(i)
                cg.forget_limits()  # another fork server may have used this slot since we last set them
                # A previous holder that died (kill -9 of a fork server) may have left processes behind (never
                # ours: we release a slot only once its processes are gone, so there is nothing for us to reap).
                cg.kill_all()
            uid = self.settings.uid_base + i if self.layers.root else None
            return Slot(i, uid, uid, self.registry.fd, cg, self._netns(i), key=self.settings.uid_base + i,
                        mntns=self._mntns(i, cg), shared_dirs=self.settings.shared_dirs, seccomp=self.seccomp)
        return None

    def _netns(self, i: int) -> int | None:
        """The slot's empty network namespace, made once and entered by each of its calls with setns().

        A namespace per call is cheap to create (~0.6 ms) but not to destroy: the kernel tears network
        namespaces down in one workqueue, behind RCU grace periods, and under a few hundred calls a second it
        fell minutes behind (a kworker in D state, load average 12+, memory held by dying namespaces). An
        empty namespace keeps nothing of a call: its sockets die with its processes, and without
        CAP_NET_ADMIN it cannot configure anything (not even bring lo up). A slot serves one call at a time.
        """
        if not self.layers.netns:
            return None
        fd = self._netns_fds.get(i)
        if fd is None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # holds the new namespace just long enough for the parent to open it
                try:
                    os.close(r)
                    unshare(CLONE_NEWNET)
                    os.write(w, b"x")
                    time.sleep(5)  # bounded: the parent SIGKILLs it as soon as it holds the namespace
                finally:
                    os._exit(0)
            os.close(w)
            try:
                if os.read(r, 1) == b"x":
                    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                    self._netns_fds[i] = fd
            finally:
                os.close(r)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        return fd

    def _mntns(self, i: int, cg: SlotCgroup | None) -> int | None:
        """The file system view skeleton (runner.fsview): built once per fork server, when a slot is first
        claimed, and entered by every call."""
        if not self.layers.fsview or not self.layers.root:
            return None
        if self._mntns_fd is None:
            self._mntns_fd = fsview.build(view_spec(self.settings), os.path.join(self.settings.state_dir, "view"))
        return self._mntns_fd

    def release(self, slot: Slot) -> None:
        self.registry.release(slot.key)
        self._held.discard(slot.index)

    def close(self) -> None:
        self.registry.close()
        for fd in (*self._netns_fds.values(), *filter(None, [self._mntns_fd])):
            os.close(fd)
        self._netns_fds.clear()
        self._mntns_fd = None


def _litter_dirs() -> list[str]:
    out, seen = [], set()
    for d in LITTER_DIRS:
        try:
            st = os.stat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(d)
    return out


def _disown(name: str, dir_fd: int | None = None) -> None:
    """Makes a folder a call left root's and 0700: the next call of the same uid cannot enter it any more."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchown(fd, os.geteuid(), os.getegid())
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def kill_uids(uids: set[int], rounds: int = 5) -> None:
    """SIGKILLs every process whose real uid is in `uids` (a few rounds: a fork bomb adds some meanwhile)."""
    for _ in range(rounds):
        found = False
        for p in psutil.process_iter(["uids"]):
            try:
                if p.info["uids"] and p.info["uids"].real in uids:
                    os.kill(p.pid, signal.SIGKILL)
                    found = True
            except (psutil.Error, OSError):
                pass
        if not found:
            return


def kill_slot(slot: Slot, main_pid: int) -> bool:
    """One pass over the call's processes, SIGKILLing each: the cgroup's members, else every process of the
    slot's uid, else the main process's session and the psutil tree below it. Never waits: True when the call
    has no process left. The fork server calls it again from its main loop, after reaping, until it is so (a
    killed child of ours stays listed until it is reaped; a fork bomb adds processes meanwhile)."""
    if slot.cgroup is not None:
        pids = slot.cgroup.procs()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not pids
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
    return True  # best effort: without a cgroup nothing names the call's processes reliably


def make_scratch(settings: Settings, slot: Slot, call_id: str) -> str:
    path = os.path.join(settings.scratch_dir, f"{slot.key}-{call_id}")
    os.mkdir(path, 0o700)
    if slot.uid is not None:
        os.chown(path, slot.uid, slot.gid)
    return path


def remove_scratch(path: str) -> bool:
    """Removes a call's scratch dir; returns False when it is not empty: then it is made root's first (the slot,
    so its uid, is reused as soon as the call is over) and the caller hands it to a janitor."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        _disown(path)
    except OSError:
        pass
    return False


def remove_tree(path: str) -> None:
    # rmtree uses fd-based traversal on Linux: a symlink planted by the function is removed, never followed.
    shutil.rmtree(path, ignore_errors=True)


def _close_fds_except(keep: list[int]) -> None:
    """close_range(2) over the gaps: every fd >= 3 but `keep` is gone, whatever it is."""
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


_parent = 0  # the fork server's pid, seen by prepare(): assign() checks that it still lives
_cgroup_trees: list[tuple[int, str]] = []  # the slot's cgroup folders, cloned by prepare() for assign()


def prepare(slot: Slot, scratch_fd: int, layers: Layers, network: bool, keep: list[int]) -> None:
    """The part of entering the sandbox that does not depend on the call: session, cgroups, network and IPC
    namespaces, cwd, fds. A spare child does it ahead of demand (off the request path); an on-demand child right
    after fork. The process stays root: the file system view needs the call's function and max_disk_mb, so it
    is entered by assign(), which then drops the identity.

    Order matters: cgroups and namespaces need privileges, so they come before the identity drop.
    """
    global _parent
    _parent = os.getppid()
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the fork server is single-threaded: this is safe here
    if slot.cgroup is not None:
        slot.cgroup.attach_self()
    flags = CLONE_NEWIPC if layers.ipcns else 0
    if not network:
        if slot.netns is not None:
            setns(slot.netns, CLONE_NEWNET)
        elif layers.netns:
            flags |= CLONE_NEWNET
        elif layers.userns:
            flags |= CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC
    if flags:
        unshare(flags)
    # By fd: the fork server renames a spare's scratch dir when it hands it a call, maybe before we get here.
    os.fchdir(scratch_fd)
    global _cgroup_trees
    if slot.mntns is not None and slot.cgroup is not None:  # bound into the view by assign()
        _cgroup_trees = fsview.cgroup_trees(slot.cgroup.dirs())
    _close_fds_except([*keep, *([slot.mntns] if slot.mntns is not None else []), *(t for t, _ in _cgroup_trees)])
    sys.dont_write_bytecode = True


def _drop_identity(slot: Slot) -> None:
    if slot.uid is not None:
        os.setgroups([])
        os.setresgid(slot.gid, slot.gid, slot.gid)
        os.setresuid(slot.uid, slot.uid, slot.uid)
        # Changing uid made the process non-dumpable; let it read its own /proc/self again.
        prctl(PR_SET_DUMPABLE, 1)
    # Changing credentials also cleared the parent-death signal: without this, a call would outlive a killed
    # fork server with no one left to enforce its limits. If the parent already died, stop here.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent:
        os._exit(71)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def assign(profile: Profile, slot: Slot, scratch: str, fds: list[int], data_base: int,
           functions_dir: str = "", function: str = "") -> None:
    """The call's own part: its file system view (its function, its /tmp of max_disk_mb), then its identity,
    its pipes as fds 0-3 (nothing else stays open), its environment, its rlimits, and last the syscall filter.

    An unprivileged process may always lower its own limits, and RLIMIT_NPROC then counts exactly this uid's
    processes (the call's own).
    """
    if slot.mntns is not None:
        # Detached copies of exactly this function's files, taken on the host side, then the view.
        with fsview.fs_identity(slot.uid, slot.gid):  # only what the call's uid may read
            sources = fsview.clone_sources(fsview.function_sources(functions_dir, function))
        fsview.enter(slot.mntns, os.path.realpath(functions_dir), sources, profile.max_disk_mb,
                     slot.shared_dirs, _cgroup_trees)
        os.close(slot.mntns)
        scratch = fsview.TMP
    _drop_identity(slot)
    stdin_r, out_w, result_w = fds
    os.dup2(stdin_r, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(result_w, 3)
    os.closerange(4, 1 << 20)
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
    if slot.seccomp is not None:
        slot.seccomp.load()


def enter(profile: Profile, slot: Slot, scratch: str, fds: list[int], data_base: int, layers: Layers,
          functions_dir: str = "", function: str = "") -> None:
    """Both halves at once, for a child forked on demand (no spare, or a call that wants the network)."""
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    prepare(slot, fd, layers, profile.network, keep=list(fds))
    assign(profile, slot, scratch, fds, data_base, functions_dir, function)


def data_usage() -> int:
    """Bytes of the data segment (VmData) of this process: the child's RLIMIT_DATA is this plus memory_mb."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0
