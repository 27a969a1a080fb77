"""Warm instances (opt-in, `reuse_calls = N > 1`): one sandboxed process serves up to N calls of one function,
one at a time, like a warm AWS Lambda or Cloud Functions instance. Lives in the fork server, which owns it.

An instance is keyed by (function, version, profile): the version is what the functions folder holds for that
function (the file's or the deployed package's identity, and the folder's own mtime, which every deploy and
atomic replace changes); the profile is a digest of every key of the call's effective profile, `[env]` included.
A call whose key differs from an instance's never runs in it; when a call of a function comes with a new key
(a deploy, a profile edit), that function's idle instances with the old key are ended at once.

Per call, as for a fresh process: the wall-clock deadline (the fork server's heap), memory (the slot's cgroup,
whose peak and OOM count are reset per call), CPU (RLIMIT_CPU raised per call, by the root fork server, to what
the process has used plus `cpu_s`), `max_processes` (pids cgroup). Any breach kills the instance; the next call
gets a fresh one. After a call, the instance is reused only if its slot holds no other process (a call's
children, threads and daemons end with its call, or the instance ends), no OOM kill happened, and it has calls
left; an idle instance that used CPU while idle is not trusted with another call. `idle_s` without a call ends it.

Only with the uid pool (root): without a uid per slot an instance would share the server's uid, so it could
outlive and signal everything; without root, `reuse_calls` is ignored and every call is fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import select
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, NoReturn

# Imported here, in the fork server: a call's file system view shows no project file to import later.
from runner import child_loop, outcomes
from runner.profiles import Profile
from runner.protocol import recv_msg, send_msg
from runner.sandbox import Slot, enter

CPU_CHECK_INTERVAL = 0.02  # as the fork server's memory polling
IDLE_CPU_SLACK = 0.05  # seconds of CPU an idle instance may show (its exit from the last call) and stay trusted
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_KEY = secrets.token_bytes(32)  # per gateway worker: profile digests cannot be compared across processes


def profile_digest(profile: Profile) -> str:
    """A keyed digest of the whole effective profile, [env] values included, so that a warm instance never
    outlives any profile change. Keyed, so it says nothing about the values to whoever sees it."""
    data = json.dumps(profile.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(_KEY, data, hashlib.sha256).hexdigest()


def version_key(functions_dir: str, name: str) -> tuple:
    """What identifies the code a call of `name` would import now: the folder's mtime (a deploy or atomic replace
    of any module changes it, which also covers shared helper modules), the function's file or the package
    symlink's target, and their inode, size and mtime (an in-place edit). The symlink's own target text comes
    from readlink, not realpath: realpath lstat()s every component of the path, a quarter of the fork server's
    CPU per warm call; the stat()s above already follow the link to what it names now."""
    out: list[Any] = []
    for path in (functions_dir, os.path.join(functions_dir, name + ".py"), os.path.join(functions_dir, name),
                 os.path.join(functions_dir, name, "__init__.py")):
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    try:
        out.append(os.readlink(os.path.join(functions_dir, name)))
    except OSError:
        out.append(None)
    return tuple(out)


def cpu_seconds(pid: int) -> float:
    """CPU seconds of one process, all its threads (/proc/<pid>/stat, in clock ticks of 10 ms), or its main
    thread's run time in ns (/proc/<pid>/schedstat) when that is more: a short call shows up in the latter only."""
    ticks = run_ns = 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            run_ns = int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return max(ticks / _CLK_TCK, run_ns / 1e9)


@dataclass
class Instance:
    pid: int
    sock: socket.socket
    key: tuple
    function: str
    slot: Slot
    scratch: str
    litter: tuple[int, ...]
    profile: Profile
    served: int = 0
    idle_since: float = 0.0
    cpu_at_call: float = 0.0  # the process's CPU when its call began (only read without a cpuacct cgroup)
    cpu_at_idle: float = 0.0  # call_cpu() when its last call ended: more later means it ran while idle
    cpu_used: float = 0.0  # what its calls and idle time have used of its lifetime RLIMIT_CPU (an upper bound)
    busy: bool = True

    def call_cpu(self) -> float:
        """CPU seconds since the current (or last) call was handed over. The slot's cpuacct counter, reset at each
        hand-over, is one cheap read and counts the call's children too; without it, the process's own CPU
        from /proc (two reads, a quarter of the fork server's per-call CPU when it was read twice per call)."""
        cg = self.slot.cgroup
        ns = cg.cpu_ns() if cg is not None else None
        if ns is not None:
            return ns / 1e9
        return cpu_seconds(self.pid) - self.cpu_at_call

    def begin_call(self, since_last: float) -> None:
        """At a hand-over, with call_cpu() just read (an idle instance does not run, so it still holds): the
        memory peak, the OOM count and the slot's CPU counter start again; without that counter, the process's
        CPU now is derived from the reading instead of read again."""
        cg = self.slot.cgroup
        if cg is not None:
            cg.reset_peak()
        if cg is None or cg.cpu is None:
            self.cpu_at_call += since_last


class InstancePool:
    """The fork server's warm instances. Every process it starts is the fork server's child, tracked as a call
    (ForkServer.calls) while it serves one and handed back to the fork server's reaping when it ends."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.by_pid: dict[int, Instance] = {}
        self.idle: dict[tuple, list[Instance]] = {}
        self._cpu_checked = 0.0

    # -- a call ------------------------------------------------------------------------------------------------
    def spawn(self, msg: dict[str, Any], fds: list[int], profile: Profile) -> None:
        """Runs the spawn message's call in an idle instance of its key, or in a new one."""
        name, fdir = msg["function"], msg["functions_dir"]
        key = (name, version_key(fdir, name), msg.get("profile_key") or json.dumps(msg["profile"], sort_keys=True))
        if not self.idle.get(key):
            self._collect(name)
        self._retire_stale(name, key)
        while self.idle.get(key):
            inst = self.idle[key].pop()
            if not self.idle[key]:
                del self.idle[key]
            since_last = inst.call_cpu()
            idle_cpu = since_last - inst.cpu_at_idle
            if idle_cpu > IDLE_CPU_SLACK:
                self.retire(inst)  # it ran while it should have waited: a thread, or a forged "done"
                continue
            inst.cpu_used += max(0.0, idle_cpu)
            if self._assign(inst, msg["id"], fds, since_last):
                return
        self._start(key, msg, fds, profile)

    def _collect(self, name: str) -> None:
        """Handles the "done" reports of this function's busy instances that are already in their sockets. An
        instance reports before it closes the call's pipes, so a caller's next call never finds it still busy.
        Only needed when no instance of the key is idle: the fork server's loop handles instances' reports before
        control messages of the same wake-up, and a report is always in its socket before the next spawn
        message can be (a select() over every busy socket per call was ~8 % of the fork server's CPU)."""
        socks = [i.sock for i in self.by_pid.values() if i.busy and i.function == name and i.sock.fileno() >= 0]
        if socks:
            for sock in select.select(socks, [], [], 0)[0]:
                self.on_message(sock)

    def _assign(self, inst: Instance, call_id: int, fds: list[int], since_last: float) -> bool:
        srv = self.server
        if inst.cpu_used + inst.profile.cpu_s > lifetime_cpu(inst.profile):
            self.retire(inst)  # its RLIMIT_CPU could not cover a whole call any more
            return False
        inst.begin_call(since_last)
        try:
            send_msg(inst.sock, {"op": "call", "id": call_id}, fds)
        except OSError:  # it died while idle: reaped later
            self.retire(inst)
            return False
        inst.busy = True
        srv._track(_call(srv, call_id, inst))
        return True

    def _start(self, key: tuple, msg: dict[str, Any], fds: list[int], profile: Profile) -> None:
        srv = self.server
        call_id = msg["id"]
        claimed = srv.claim_slot(call_id, profile)
        if claimed is None:
            return
        slot, scratch, litter = claimed
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        def run_instance() -> NoReturn:
            ours.close()
            # The control socket stands in for the call's pipes while the sandbox is entered; the serve loop
            # moves it to fd 4 and takes each call's pipes from it (the first call's too).
            ctl = theirs.fileno()
            lifetime = dataclasses.replace(profile, cpu_s=lifetime_cpu(profile))
            enter(lifetime, slot, scratch, [ctl, ctl, ctl], srv.data_base, srv.layers, msg["functions_dir"],
                  msg["function"])
            child_loop.serve(msg["functions_dir"], msg["function"], profile)

        pid = srv._fork(run_instance, "warm instance sandbox")
        theirs.close()
        ours.setblocking(False)  # the fork server never waits on an instance
        inst = Instance(pid, ours, key, msg["function"], slot, scratch, litter, profile)
        self.by_pid[pid] = inst
        srv.sel.register(ours, selectors.EVENT_READ, "instance")
        try:
            send_msg(ours, {"op": "call", "id": call_id}, fds)
        except OSError:
            pass  # it died at once: reaped as a call, reported as crashed
        srv._track(_call(srv, call_id, inst))

    # -- the instance's report ---------------------------------------------------------------------------------
    def on_message(self, sock: socket.socket) -> None:
        """An instance finished its call ("done") or closed its socket (it is exiting; reaped as usual)."""
        inst = next((i for i in self.by_pid.values() if i.sock is sock), None)
        try:
            msg, fds = recv_msg(sock, 1)
        except BlockingIOError:  # a stale event: _collect() already took this report
            return
        except OSError:
            msg, fds = None, []
        except ValueError:  # not JSON: the function wrote to the instance's socket. Never trusted again.
            msg, fds = {"op": "garbage"}, []
        if not isinstance(msg, dict) and msg is not None:
            msg = {"op": "garbage"}
        for fd in fds:
            os.close(fd)
        if inst is None:
            return
        if msg is None:
            self._unregister(inst)
            return
        srv = self.server
        call = srv.calls.get(inst.pid)
        if msg.get("op") != "done" or call is None or not inst.busy or call.killed is not None:
            # Anything but a "done" for the call in flight was forged by the function: the call goes on under its
            # limits, but the instance serves no other call.
            inst.profile = dataclasses.replace(inst.profile, reuse_calls=0)
            return
        srv.calls.pop(inst.pid, None)
        srv.by_id.pop(call.id, None)
        inst.busy = False
        inst.served += 1
        now = time.monotonic()
        cpu = inst.call_cpu()
        inst.cpu_used += cpu
        cg = inst.slot.cgroup
        max_rss_kb = cg.peak_bytes() // 1024 if cg is not None else call.peak_rss // 1024
        srv._send({"op": "exit", "id": call.id, "outcome": outcomes.OK, "message": "", "exitcode": None,
                   "signal": None, "cpu_ms": round(cpu * 1000, 1), "max_rss_kb": max_rss_kb,
                   "wall_ms": round((now - call.started) * 1000, 2), "warm": inst.served > 1})
        if inst.served >= inst.profile.reuse_calls or not self._alone(inst) or (cg is not None and cg.oom_killed()):
            self.retire(inst)
            return
        inst.idle_since, inst.cpu_at_idle = now, cpu
        self.idle.setdefault(inst.key, []).append(inst)

    def _alone(self, inst: Instance) -> bool:
        """Whether the instance's slot holds just its one single-threaded process: a call's helpers (children,
        threads, daemons) end with that call."""
        cg = inst.slot.cgroup
        if cg is not None and cg.pids:
            try:  # one read: the pids controller counts every task (thread) of the slot
                with open(os.path.join(cg.pids, "pids.current"), "rb") as f:
                    return int(f.read()) == 1
            except (OSError, ValueError):
                return False
        try:
            threads = len(os.listdir(f"/proc/{inst.pid}/task"))
        except OSError:
            return False
        if threads != 1:
            return False
        if cg is not None:
            return cg.procs() == [inst.pid]
        try:
            with open(f"/proc/{inst.pid}/task/{inst.pid}/children") as f:
                return not f.read().split()
        except OSError:
            return False

    # -- ending instances --------------------------------------------------------------------------------------
    def retire(self, inst: Instance) -> None:
        """Kills an instance that is not in a call; the fork server's reaping frees its slot like an idle spare's."""
        from runner.forkserver import Spare

        for lst in self.idle.values():
            if inst in lst:
                lst.remove(inst)
        self.idle = {k: v for k, v in self.idle.items() if v}
        self._unregister(inst)
        self.by_pid.pop(inst.pid, None)
        try:
            os.kill(inst.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.server.retired[inst.pid] = Spare(inst.pid, inst.sock, inst.slot, inst.scratch, inst.litter)
        self.server.dropped.add(inst.pid)

    def _retire_stale(self, name: str, key: tuple) -> None:
        for k in [k for k in self.idle if k[0] == name and k != key]:
            for inst in list(self.idle.get(k, [])):
                self.retire(inst)

    def _unregister(self, inst: Instance) -> None:
        try:
            self.server.sel.unregister(inst.sock)
        except (KeyError, ValueError):
            pass
        inst.sock.close()

    def reaped(self, pid: int) -> None:
        """A child of the fork server was reaped: if it was an instance, forget it (a call in flight is finished
        by the fork server; an idle one is handed to its spare cleanup)."""
        inst = self.by_pid.pop(pid, None)
        if inst is None:
            return
        self._unregister(inst)
        if inst.busy:
            return
        for lst in self.idle.values():
            if inst in lst:
                lst.remove(inst)
        self.idle = {k: v for k, v in self.idle.items() if v}
        from runner.forkserver import Spare

        self.server.retired[pid] = Spare(pid, inst.sock, inst.slot, inst.scratch, inst.litter)
        self.server.dropped.add(pid)

    def check_cpu(self) -> None:
        """Each warm call's own CPU (the instance's RLIMIT_CPU covers its whole life; the soft limit it sets per
        call is only a courtesy, since the function could raise it): over `cpu_s` ends the call and the instance."""
        now = time.monotonic()
        if now - self._cpu_checked < CPU_CHECK_INTERVAL:
            return
        self._cpu_checked = now
        srv = self.server
        for inst in list(self.by_pid.values()):
            call = srv.calls.get(inst.pid) if inst.busy else None
            if call is not None and call.killed is None:
                if inst.call_cpu() > inst.profile.cpu_s:
                    srv._kill(call, outcomes.TIMEOUT, f"CPU time limit of {inst.profile.cpu_s:g} s exceeded")

    def expire(self) -> None:
        now = time.monotonic()
        for lst in list(self.idle.values()):
            for inst in list(lst):
                if now - inst.idle_since >= inst.profile.idle_s:
                    self.retire(inst)

    def timeout(self, t: float | None) -> float | None:
        """The fork server's select timeout, shortened to the next idle expiry."""
        idle = [inst.idle_since + inst.profile.idle_s for lst in self.idle.values() for inst in lst]
        if not idle:
            return t
        left = max(0.0, min(idle) - time.monotonic())
        return left if t is None else min(t, left)

    def close(self) -> None:
        for lst in list(self.idle.values()):
            for inst in list(lst):
                self.retire(inst)

    def describe(self) -> dict[str, int]:
        return {"idle": sum(len(v) for v in self.idle.values()), "busy": sum(i.busy for i in self.by_pid.values())}


def _call(srv: Any, call_id: int, inst: Instance) -> Any:
    from runner.forkserver import Call

    return Call(call_id, inst.pid, inst.slot, inst.profile, inst.scratch, 0.0, 0.0, litter=inst.litter)


def lifetime_cpu(profile: Profile) -> float:
    """The CPU seconds a warm instance may use over its whole life: its RLIMIT_CPU hard limit, which nobody can
    raise later (here even root lacks CAP_SYS_RESOURCE). Each call is held to cpu_s by check_cpu()."""
    return profile.cpu_s * profile.reuse_calls


def usable(profile: Profile, root: bool) -> bool:
    """Whether a call of this profile runs in a warm instance (see the module docstring)."""
    return profile.reuse_calls > 1 and root
