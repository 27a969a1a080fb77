"""The fork server: a warm, single-threaded parent that forks one sandboxed child per call and supervises it.

One fork server per Gunicorn worker, started by that worker's Supervisor with a scrubbed environment and no
inherited fd but its end of the control socket. It imports Flask/werkzeug and the runner once, never imports
or runs user code itself, and holds no listening socket, client connection or secret.

Its single loop (selectors, like gunicorn's arbiter) owns every call's lifecycle:
  spawn message -> claim a slot -> fork -> child enters the sandbox and runs the call
  SIGCHLD       -> wait4() the child -> kill whatever of the call is left -> report "exit" with the outcome
  tick          -> wall-clock deadlines and psutil tree-RSS checks for every call in flight
EOF on the control socket means the worker is gone: every call is killed and the fork server exits.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import psutil

from runner import fsview, outcomes
from runner.config import Settings
from runner.profiles import Profile
from runner.protocol import SPAWN_FDS, recv_msg, send_msg
from runner.sandbox import (
    PR_SET_CHILD_SUBREAPER,
    Layers,
    Slot,
    SlotPool,
    assign,
    data_usage,
    enter,
    kill_slot,
    make_scratch,
    prctl,
    prepare,
    probe_layers,
    remove_scratch,
    remove_tree,
)

POLL_INTERVAL = 0.02  # memory checks; the kernel cgroup catches spikes between two polls
PSS_REFRESH = 0.5  # without a cgroup: longest reuse of a PSS measurement (sharers exiting raise a call's PSS)
MiB = 1024 * 1024


@dataclass
class Call:
    id: int
    pid: int
    slot: Slot
    profile: Profile
    scratch: str
    started: float
    deadline: float
    killed: str | None = None  # outcome we forced (timeout, memory_limit), if any
    kill_message: str = ""
    peak_rss: int = 0
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    # Without a memory cgroup: the last PSS measurement, the tree RSS at that moment, and when it was taken.
    pss: tuple[int, int, float] | None = None
    litter: tuple[int, ...] = ()  # the litter folders' mtimes when the call started


@dataclass
class Spare:
    """A child forked ahead of demand: already in its slot's cgroups, namespaces, uid and scratch dir, its
    request path pre-touched (the copy-on-write faults paid), waiting on its socket for a call. It has run no
    call: it becomes exactly one call, then exits."""

    pid: int
    sock: socket.socket
    slot: Slot
    scratch: str
    litter: tuple[int, ...]


class ForkServer:
    def __init__(self, sock: socket.socket, settings: Settings) -> None:
        self.sock = sock
        self.settings = settings
        self.layers: Layers = probe_layers(settings)
        self.slots = SlotPool(settings, self.layers)
        self.calls: dict[int, Call] = {}  # by pid
        self.by_id: dict[int, int] = {}  # call id -> pid
        self.deadlines: list[tuple[float, int]] = []  # (deadline, pid) heap
        self.janitors: set[int] = set()
        self.spares: list[Spare] = []
        self.retired: dict[int, Spare] = {}  # spares killed, waiting to be reaped
        self.dropped: set[int] = set()
        self._spare_ids = itertools.count(1)
        self.spare_retry_at = 0.0
        self.spare_target = settings.spares
        self.data_base = 0
        self.running = True

    # -- setup -------------------------------------------------------------------------------------------
    def serve(self) -> None:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a call (double forks) come back to us to be reaped
        orphans = self.slots.sweep(self._reap)  # what the calls of a fork server that died (kill -9) left
        # Warm everything a call needs before the first fork, so no child pays for an import. After the sweep:
        # a dead fork server's leftovers (a daemon still writing) are killed first, not after ~0.3-0.5 s of
        # warm-up.
        from runner import child

        child.warm()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.wake_r = wake_r
        self.data_base = data_usage()
        gc.collect()
        gc.freeze()  # children then never touch (copy) the inherited objects' GC headers
        self._cleanup(orphans)
        send_msg(self.sock, {"op": "ready", "pid": os.getpid(), "layers": self.layers.describe()})
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while self.running:
                events = sel.select(self._timeout())
                for key, _ in events:
                    if key.data == "control":
                        self._on_control()
                    else:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                self._reap()
                self._check_limits()
                if (not events and len(self.spares) < self.spare_target and self.running
                        and time.monotonic() >= self.spare_retry_at):
                    # Only when idle: a fork (~2 ms here) must never delay a call that is already waiting.
                    self._make_spare()
        finally:
            self._shutdown()

    def _on_term(self, *_: object) -> None:
        self.running = False

    def _timeout(self) -> float | None:
        if len(self.spares) < self.spare_target and time.monotonic() >= self.spare_retry_at:
            return 0.0
        if not self.calls:
            return None
        t = POLL_INTERVAL
        if self.deadlines:
            t = min(t, max(0.0, self.deadlines[0][0] - time.monotonic()))
        return t

    # -- control messages --------------------------------------------------------------------------------
    def _on_control(self) -> None:
        try:
            msg, fds = recv_msg(self.sock, SPAWN_FDS)
        except OSError:
            msg, fds = None, []
        if msg is None:
            self.running = False
            return
        try:
            if msg.get("op") == "spawn":
                self._spawn(msg, fds)
            elif msg.get("op") == "kill":
                call = self.calls.get(self.by_id.get(msg.get("id"), -1))
                if call is not None and call.killed is None:
                    self._kill(call, msg.get("outcome", outcomes.CRASHED), msg.get("message", "killed by the gateway"))
            elif msg.get("op") == "ping":
                self._send({"op": "pong", "id": msg.get("id"), "calls": len(self.calls)})
        finally:
            for fd in fds:  # the child has its own copies; ours must not keep the pipes open
                os.close(fd)

    def _send(self, msg: dict) -> None:
        try:
            send_msg(self.sock, msg)
        except OSError:
            self.running = False

    def _spawn(self, msg: dict, fds: list[int]) -> None:
        call_id = msg["id"]
        profile = Profile.from_dict(msg["profile"])
        if len(fds) != SPAWN_FDS:
            self._send({"op": "exit", "id": call_id, "outcome": outcomes.UNAVAILABLE, "message": "bad spawn"})
            return
        spare = self._take_spare() if not profile.network else None
        while spare is not None:
            if spare.slot.cgroup is not None:
                spare.slot.cgroup.set_limits(profile.memory_mb * 1024 * 1024, profile.max_processes)
                spare.slot.cgroup.reset_peak()
            # The scratch dir takes the call's name: an idle spare's dir ends in "-s<n>", a call's never does.
            scratch = os.path.join(self.settings.scratch_dir, f"{spare.slot.index}-{os.getpid()}-{call_id}")
            try:
                os.rename(spare.scratch, scratch)
                spare.scratch = scratch
                send_msg(spare.sock, {"functions_dir": msg["functions_dir"], "function": msg["function"],
                                      "profile": msg["profile"], "scratch": scratch}, fds)
            except OSError:  # it died idle (reaped below): the call goes to another spare or a fresh fork
                self._drop_spare(spare)
                spare = self._take_spare()
                continue
            spare.sock.close()
            self._track(Call(call_id, spare.pid, spare.slot, profile, scratch, 0.0, 0.0, litter=spare.litter))
            return
        slot = self.slots.acquire(self._reap)
        if slot is None:
            self._send({"op": "exit", "id": call_id, "outcome": outcomes.BUSY,
                        "message": "every sandbox slot of this machine is in use"})
            return
        if slot.cgroup is not None:
            slot.cgroup.set_limits(profile.memory_mb * 1024 * 1024, profile.max_processes)
            slot.cgroup.reset_peak()
        try:
            scratch = make_scratch(self.settings, slot, f"{os.getpid()}-{call_id}")
        except OSError as e:  # the scratch file system is full or broken: this call cannot run, others may
            self.slots.release(slot)
            self._send({"op": "exit", "id": call_id, "outcome": outcomes.UNAVAILABLE,
                        "message": f"cannot create the call's scratch directory: {e.strerror}"})
            return
        litter = self.slots.litter_stamp()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 71
            try:
                self._child_signals()
                self.sock.close()
                enter(profile, slot, scratch, fds, self.data_base, self.layers, msg["functions_dir"], msg["function"])
                from runner import child

                child.main(msg["functions_dir"], msg["function"], profile.max_response_kb)
            except BaseException as e:
                try:
                    os.write(2, f"fnbox: sandbox setup failed: {e!r}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        self._track(Call(call_id, pid, slot, profile, scratch, 0.0, 0.0, litter=litter))

    def _track(self, call: Call) -> None:
        call.started = time.monotonic()
        call.deadline = call.started + call.profile.timeout_s
        self.calls[call.pid] = call
        self.by_id[call.id] = call.pid
        heapq.heappush(self.deadlines, (call.deadline, call.pid))

    @staticmethod
    def _child_signals() -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # -- spares ------------------------------------------------------------------------------------------
    def _make_spare(self) -> None:
        slot = self.slots.acquire(self._reap)
        if slot is None:
            self.spare_retry_at = time.monotonic() + 1.0  # every slot busy: calls first, spares later
            return
        try:
            scratch = make_scratch(self.settings, slot, f"{os.getpid()}-s{next(self._spare_ids)}")
        except OSError:  # the scratch file system is full: no spares until it is not
            self.slots.release(slot)
            self.spare_retry_at = time.monotonic() + 1.0
            return
        litter = self.slots.litter_stamp()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cwd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the spare: never returns
            code = 71
            try:
                self._child_signals()
                self.sock.close()
                ours.close()
                prepare(slot, cwd, self.layers, network=False, keep=[theirs.fileno()])
                from runner import child

                child.warm(full=False)  # the common path's copy-on-write faults, paid before the call
                if slot.mntns is not None:  # and those of entering the file system view
                    fsview.prewarm(self.settings.functions_dir)
                assignment, fds = recv_msg(theirs, SPAWN_FDS)
                if assignment is None or len(fds) != SPAWN_FDS:
                    code = 0  # the fork server is shutting down (or gone)
                    return
                profile = Profile.from_dict(assignment["profile"])
                assign(profile, slot, assignment["scratch"], fds, data_usage(), assignment["functions_dir"],
                       assignment["function"])
                child.main(assignment["functions_dir"], assignment["function"], profile.max_response_kb)
            except BaseException as e:
                try:
                    os.write(2, f"fnbox: spare sandbox failed: {e!r}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        theirs.close()
        os.close(cwd)
        self.spares.append(Spare(pid, ours, slot, scratch, litter))

    def _take_spare(self) -> Spare | None:
        return self.spares.pop() if self.spares else None

    def _drop_spare(self, spare: Spare) -> None:
        """A spare that will never run a call: killed; its slot is freed when it is reaped."""
        spare.sock.close()
        try:
            os.kill(spare.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.retired[spare.pid] = spare
        self.dropped.add(spare.pid)

    # -- supervision -------------------------------------------------------------------------------------
    def _check_limits(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, pid = heapq.heappop(self.deadlines)
            call = self.calls.get(pid)
            if call is not None and call.killed is None:
                self._kill(call, outcomes.TIMEOUT, f"wall-clock limit of {call.profile.timeout_s:g} s exceeded")
        for call in list(self.calls.values()):
            if call.killed is None and now - call.started >= POLL_INTERVAL:
                over = self._memory_exceeded(call, now)
                if over:
                    self._kill(call, outcomes.MEMORY_LIMIT, over)
                elif self._cpu_exceeded(call):
                    self._kill(call, outcomes.TIMEOUT, f"CPU time limit of {call.profile.cpu_s:g} s exceeded "
                                                       "(all processes of the call)")

    @staticmethod
    def _cpu_exceeded(call: Call) -> bool:
        """cpu_s over the call's whole process tree (its cpuacct cgroup); RLIMIT_CPU still caps each process."""
        cpu = call.slot.cgroup.cpu_ns() if call.slot.cgroup is not None else None
        return cpu is not None and cpu >= call.profile.cpu_s * 1e9

    def _memory_exceeded(self, call: Call, now: float) -> str | None:
        """Why the call is over its memory limit, or None.

        With a memory cgroup the kernel charges every page to exactly one cgroup and enforces the limit
        itself; an OOM kill anywhere in the call (a grandchild, say) ends the whole call at once.

        Without one, the call's processes are measured. The sum of their RSS counts every shared page once per
        process: a call that forks 6 idle children "uses" 7 copies of the warm interpreter that the fork server
        shares with all of them. So RSS is only the cheap first test (RSS >= PSS); over the limit, the
        proportional set size (shared pages divided among their sharers) decides. Reading PSS walks the page
        tables (~0.7 ms per process), so it is reused until RSS has grown by the headroom it left.
        """
        limit = call.profile.memory_mb * MiB
        cg = call.slot.cgroup
        if cg is not None:
            if cg.oom_killed():
                return f"memory limit of {call.profile.memory_mb} MiB exceeded (the kernel OOM-killed a process)"
            return None
        pids = self._tree_pids(call)
        rss = self._tree_sum(call, pids, "rss")
        if rss <= limit:
            call.peak_rss = max(call.peak_rss, rss)
            return None
        if call.pss is not None:
            pss0, rss0, at = call.pss
            if rss - rss0 < limit - pss0 and now - at < PSS_REFRESH:
                call.peak_rss = max(call.peak_rss, pss0 + max(0, rss - rss0))
                return None
        pss = self._tree_sum(call, pids, "pss")
        call.pss = (pss, rss, now)
        call.peak_rss = max(call.peak_rss, pss)
        if pss > limit:
            return f"memory limit of {call.profile.memory_mb} MiB exceeded (tree PSS)"
        return None

    def _tree_pids(self, call: Call) -> list[int]:
        try:
            root = psutil.Process(call.pid)
            return [call.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return []

    def _tree_sum(self, call: Call, pids: list[int], kind: str) -> int:
        total = 0
        for pid in pids:
            proc = call.procs.get(pid)
            if proc is None:
                try:
                    proc = call.procs[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            try:
                total += proc.memory_info().rss if kind == "rss" else proc.memory_full_info().pss
            except psutil.Error:
                call.procs.pop(pid, None)
        return total

    def _kill(self, call: Call, outcome: str, message: str) -> None:
        call.killed, call.kill_message = outcome, message
        try:
            os.kill(call.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_slot(call.slot, call.pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            call = self.calls.pop(pid, None)
            if call is not None:
                self.by_id.pop(call.id, None)
                self._finish(call, status, ru)
            spare = self.retired.pop(pid, None) or self._idle_spare(pid)
            if spare is not None:  # died without a call: free its slot like a finished call's
                if spare.pid not in self.dropped:
                    self.spare_retry_at = time.monotonic() + 1.0  # it died by itself: do not fork in a loop
                self.dropped.discard(spare.pid)
                kill_slot(spare.slot, pid, self._reap)
                self._cleanup([] if remove_scratch(spare.scratch) else [spare.scratch],
                              self.slots.sweep_litter(spare.slot, spare.litter))
                self.slots.release(spare.slot)
            self.janitors.discard(pid)

    def _idle_spare(self, pid: int) -> Spare | None:
        for i, spare in enumerate(self.spares):
            if spare.pid == pid:
                spare.sock.close()
                return self.spares.pop(i)
        return None

    def _finish(self, call: Call, status: int, ru: resource.struct_rusage) -> None:
        kill_slot(call.slot, call.pid, self._reap)  # threads, grandchildren, daemons: the call is over
        code = os.waitstatus_to_exitcode(status)
        sig = -code if code < 0 else None
        cpu_ms = round((ru.ru_utime + ru.ru_stime) * 1000, 1)
        max_rss_kb = max(ru.ru_maxrss, call.peak_rss // 1024)
        cg = call.slot.cgroup
        tree_cpu = cg.cpu_ns() if cg is not None else None
        if tree_cpu is not None:  # every process of the call, not only the main one
            cpu_ms = max(cpu_ms, round(tree_cpu / 1e6, 1))
        if cg is not None:
            max_rss_kb = max(max_rss_kb, cg.peak_bytes() // 1024)
        outcome, message = call.killed, call.kill_message
        if outcome is None:
            if cg is not None and cg.oom_killed():
                outcome, message = outcomes.MEMORY_LIMIT, f"memory limit of {call.profile.memory_mb} MiB exceeded"
            elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_ms >= call.profile.cpu_s * 1000):
                outcome, message = outcomes.TIMEOUT, f"CPU time limit of {call.profile.cpu_s:g} s exceeded"
            elif code == 0:
                outcome, message = outcomes.OK, ""
            else:
                outcome = outcomes.CRASHED
                message = (f"the function's process was killed by signal {signal.Signals(sig).name}"
                           if sig else f"the function's process exited with code {code}")
        self._send({"op": "exit", "id": call.id, "outcome": outcome, "message": message, "exitcode": code,
                    "signal": signal.Signals(sig).name if sig else None, "cpu_ms": cpu_ms,
                    "max_rss_kb": max_rss_kb, "wall_ms": round((time.monotonic() - call.started) * 1000, 2)})
        # Before the slot (so its uid) can be reused: what the call left is removed or made root's.
        self._cleanup([] if remove_scratch(call.scratch) else [call.scratch],
                      self.slots.sweep_litter(call.slot, call.litter))
        self.slots.release(call.slot)

    def _cleanup(self, *folders: list[str]) -> None:
        paths = [p for group in folders for p in group]
        if not paths:
            return
        # Removing 100 000 files must not stall every other call's supervision, so a short-lived janitor
        # process does it (forking is safe: this process is single-threaded).
        pid = os.fork()
        if pid == 0:
            try:
                self.sock.close()
                self.slots.close()  # our copies of the slot locks must not outlive the fork server
                for path in paths:
                    remove_tree(path)
            finally:
                os._exit(0)
        self.janitors.add(pid)

    def _shutdown(self) -> None:
        while self.spares:
            self._drop_spare(self.spares.pop())
        for call in list(self.calls.values()):
            if call.killed is None:
                self._kill(call, outcomes.UNAVAILABLE, "the fork server is shutting down")
        deadline = time.monotonic() + 5
        while (self.calls or self.janitors or self.retired) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.005)
        self.slots.close()


def main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    # The Supervisor passed only FNBOX_* settings and a minimal PATH/LANG: no secret is in this environment.
    view = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}  # the view's settings (runner.supervisor)
    server = ForkServer(sock, Settings.from_env({**os.environ, **view}))
    server.serve()


if __name__ == "__main__":
    main()
