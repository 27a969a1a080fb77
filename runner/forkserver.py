"""The fork server: a warm, single-threaded parent that forks one sandboxed child per call and supervises it.

One fork server per Gunicorn worker, started by that worker's Supervisor with a scrubbed environment and no
inherited fd but its end of the control socket. It imports Flask/werkzeug and the runner once, never imports
or runs user code itself, and holds no listening socket, client connection or secret.

Process ownership, as in gunicorn's arbiter: this module is the only one that forks call processes (_fork:
calls, spares, janitors) and the only one that reaps them, and it reaps only in its main loop (_reap). Its
single loop (selectors) owns every call's lifecycle:
  spawn message -> claim a slot -> fork (or hand the call to a spare) -> the child enters the sandbox, runs
  SIGCHLD       -> wait4() the child -> its call is "ending": everything left in its slot is SIGKILLed
  each turn     -> an ending call whose slot holds no process any more has ended: report "exit" with the
                   outcome, clean its scratch dir, release the slot (a janitor process does big cleanups, and
                   the slot is released when that janitor is reaped)
  tick          -> wall-clock deadlines and memory checks for every call in flight
A call ends when its process tree ends: its exit report (which frees its admission places in the gateway) and
its slot wait for its last process. EOF on the control socket means the worker is gone: every call is killed
and the fork server exits.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import psutil

from runner import fsview, heap, instances, outcomes, preload, rawfork, wakeup
from runner.config import Settings
from runner.outcomes import ExitCode, Outcome
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
ENDING_POLL = 0.001  # while a call's leftover processes are being killed and reaped
ENDING_MAX = 2.0  # a process that will not die (D state) must not hold the call's report forever
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
    killed: Outcome | None = None  # outcome we forced (timeout, memory_limit), if any
    kill_message: str = ""
    peak_rss: int = 0
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    # Without a memory cgroup: the last PSS measurement, the tree RSS at that moment, and when it was taken.
    pss: tuple[int, int, float] | None = None
    litter: tuple[int, ...] = ()  # the litter folders' mtimes when the call started


@dataclass
class Spare:
    """A child forked ahead of demand: already in its slot's cgroups and namespaces, its cwd and fds set,
    waiting on its socket for a call (the fork and that setup are then off the call's path). It has run no
    call: it becomes exactly one call, then exits."""

    pid: int
    sock: socket.socket
    slot: Slot
    scratch: str
    litter: tuple[int, ...]


@dataclass
class Ending:
    """A slot whose main process is gone (reaped), while whatever else ran in it is killed and reaped. `call`
    is None for a spare that died without a call."""

    slot: Slot
    scratch: str
    litter: tuple[int, ...]
    pid: int
    since: float
    call: Call | None = None
    status: int = 0
    rusage: resource.struct_rusage | None = None


class ForkServer:
    def __init__(self, sock: socket.socket, settings: Settings) -> None:
        self.sock = sock
        self.settings = settings
        self.layers: Layers = probe_layers(settings)
        self.slots = SlotPool(settings, self.layers)
        self.calls: dict[int, Call] = {}  # by pid
        self.by_id: dict[int, int] = {}  # call id -> pid
        self.deadlines: list[tuple[float, int]] = []  # (deadline, pid) heap
        self.janitors: dict[int, Slot | None] = {}  # pid -> the slot it releases when it is reaped
        self.spares: list[Spare] = []
        self.retired: dict[int, Spare] = {}  # spares killed, waiting to be reaped
        self.dropped: set[int] = set()
        self.ending: list[Ending] = []
        self._spare_ids = itertools.count(1)
        self.spare_retry_at = 0.0
        self.spare_target = settings.spares
        self.data_base = 0
        self.running = True
        self.instances = instances.InstancePool(self)  # performance hook: warm instances (reuse_calls > 1)

    # -- setup -------------------------------------------------------------------------------------------
    def serve(self) -> None:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a call (double forks) come back to us to be reaped
        orphans = self.slots.sweep()  # what the calls of a fork server that died (kill -9) left
        # Warm everything a call needs before the first fork, so no child pays for an import. After the sweep:
        # a dead fork server's leftovers (a daemon still writing) are killed first, not after ~0.3-0.5 s of
        # warm-up.
        from runner import child

        child.warm()
        wake_r, _ = wakeup.install()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.data_base = data_usage()
        gc.collect()
        gc.freeze()  # children then never touch (copy) the inherited objects' GC headers
        heap.trim()  # the warm-up's freed memory goes back to the kernel: neither we nor any child holds it
        if orphans:
            self._janitor(None, orphans)
        send_msg(self.sock, {"op": "ready", "pid": os.getpid(), "layers": self.layers.describe()})
        sel = self.sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while self.running:
                events = sel.select(self.instances.timeout(self._timeout()))
                if len(events) > 1:  # warm instances' "done" reports before the calls that may reuse them
                    events.sort(key=lambda e: e[0].data != "instance")
                for key, _ in events:
                    if key.data == "control":
                        self._on_control()
                    elif key.data == "instance":  # performance hook: a warm instance finished its call
                        self.instances.on_message(key.fileobj)
                    else:
                        wakeup.drain(wake_r)
                self._reap()
                self._settle()
                self._check_limits()
                self.instances.check_cpu()  # performance hook: warm calls' cpu_s, and idle_s
                self.instances.expire()
                if (not events and len(self.spares) < self.spare_target and self.running
                        and time.monotonic() >= self.spare_retry_at):
                    # Only when idle: a fork (~2 ms here) must never delay a call that is already waiting.
                    self._make_spare()
        finally:
            self._shutdown()

    def _on_term(self, *_: object) -> None:
        self.running = False

    def _timeout(self) -> float | None:
        if self.ending:
            return ENDING_POLL
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
                    outcome = msg.get("outcome")
                    self._kill(call, Outcome(outcome) if outcome in outcomes.ALL else Outcome.CRASHED,
                               msg.get("message", "killed by the gateway"))
            elif msg.get("op") == "ping":
                self._send({"op": "pong", "id": msg.get("id"), "calls": len(self.calls) + len(self.ending)})
            elif msg.get("op") == "preload":  # performance hook: runner/preload.py
                preload.handle(self, msg)
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
        # Limits only: the gateway never sends a call's [env], request or result here (a clean parent).
        profile = Profile.from_dict(msg["profile"])
        if len(fds) != SPAWN_FDS:
            self._send({"op": "exit", "id": call_id, "outcome": Outcome.UNAVAILABLE, "message": "bad spawn"})
            return
        if instances.usable(profile, self.layers.root):  # performance hook: runner/instances.py
            self.instances.spawn(msg, fds, profile)
            return
        spare = self._take_spare() if not profile.network else None
        while spare is not None:
            _limit_slot(spare.slot, profile)
            try:
                if spare.scratch != self.settings.scratch_dir:  # a folder of its own (no file system view)
                    # It takes the call's name: an idle spare's dir ends in "-s<n>", a call's never does.
                    scratch = os.path.join(self.settings.scratch_dir, f"{spare.slot.key}-{os.getpid()}-{call_id}")
                    os.rename(spare.scratch, scratch)
                    spare.scratch = scratch
                send_msg(spare.sock, {"functions_dir": msg["functions_dir"], "function": msg["function"],
                                      "profile": msg["profile"], "scratch": spare.scratch}, fds)
            except OSError:  # it died idle (reaped below): the call goes to another spare or a fresh fork
                self._drop_spare(spare)
                spare = self._take_spare()
                continue
            spare.sock.close()
            self._track(Call(call_id, spare.pid, spare.slot, profile, spare.scratch, 0.0, 0.0,
                             litter=spare.litter))
            return
        claimed = self.claim_slot(call_id, profile)
        if claimed is None:
            return
        slot, scratch, litter = claimed

        def run_call() -> NoReturn:
            enter(profile, slot, scratch, fds, self.data_base, self.layers, msg["functions_dir"], msg["function"])
            from runner import child

            child.main(msg["functions_dir"], msg["function"], profile)

        pid = self._fork(run_call, "sandbox setup")
        self._track(Call(call_id, pid, slot, profile, scratch, 0.0, 0.0, litter=litter))

    def claim_slot(self, call_id: int, profile: Profile) -> tuple[Slot, str, tuple[int, ...]] | None:
        """A free slot with the profile's cgroup limits, a fresh scratch folder and the litter stamp, for a call
        forked now (fresh, or a warm instance's first); None once the call's exit (busy, unavailable) is sent."""
        slot = self.slots.acquire()
        if slot is None:
            self._send({"op": "exit", "id": call_id, "outcome": Outcome.BUSY,
                        "message": "every sandbox slot of this machine is in use"})
            return None
        _limit_slot(slot, profile)
        try:
            scratch = self._scratch(slot, f"{os.getpid()}-{call_id}")
        except OSError as e:  # the scratch file system is full or broken: this call cannot run, others may
            self.slots.release(slot)
            self._send({"op": "exit", "id": call_id, "outcome": Outcome.UNAVAILABLE,
                        "message": f"cannot create the call's scratch directory: {e.strerror}"})
            return None
        return slot, scratch, self.slots.litter_stamp()

    def _scratch(self, slot: Slot, name: str) -> str:
        """The call's scratch folder on the host (its cwd, HOME and TMPDIR). With a file system view a call never
        sees it (those are its own tmpfs /tmp): the scratch root itself (root's, 0711) is only its cwd until it
        enters the view, and no folder is made, chowned, renamed and removed per call (on ext4 those journaled
        metadata operations were ~20 % of a loaded fork server's samples, docs/performance.md)."""
        if slot.mntns is not None:
            return self.settings.scratch_dir
        return make_scratch(self.settings, slot, name)

    def _track(self, call: Call) -> None:
        call.started = time.monotonic()
        call.deadline = call.started + call.profile.timeout_s
        self.calls[call.pid] = call
        self.by_id[call.id] = call.pid
        heapq.heappush(self.deadlines, (call.deadline, call.pid))

    # -- forking: the only place that makes processes -----------------------------------------------------
    def _fork(self, body: Callable[[], object], what: str) -> int:
        """Forks a child that runs body() and exits: with body's ExitCode if it returns, with SETUP_FAILED
        (and a line on stderr, the server log) if it raises. A call's body never returns (child.main exits)."""
        pid = rawfork.fork()  # os.fork() without the after-fork work a single-threaded parent does not need
        if pid:
            return pid
        code = ExitCode.SETUP_FAILED
        try:
            wakeup.uninstall()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.sock.close()
            ret = body()
            code = ret if isinstance(ret, ExitCode) else ExitCode.OK
        except BaseException as e:
            try:
                os.write(2, f"fnbox: {what} failed: {e!r}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code)

    # -- spares ------------------------------------------------------------------------------------------
    def _make_spare(self) -> None:
        slot = self.slots.acquire()
        if slot is None:
            self.spare_retry_at = time.monotonic() + 1.0  # every slot busy: calls first, spares later
            return
        try:
            scratch = self._scratch(slot, f"{os.getpid()}-s{next(self._spare_ids)}")
        except OSError:  # the scratch file system is full: no spares until it is not
            self.slots.release(slot)
            self.spare_retry_at = time.monotonic() + 1.0
            return
        litter = self.slots.litter_stamp()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cwd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def run_spare() -> ExitCode:
            ours.close()
            prepare(slot, cwd, self.layers, network=False, keep=[theirs.fileno()])
            from runner import child

            # The host-side half of entering the view, exercised once (cheap). Not the Python call path: a
            # spare that ran it held ~2.6 MB more, its call ~1.2 MB more, and calls were no faster for it
            # (docs/performance.md, "Spares without a warm-up").
            if slot.mntns is not None:
                fsview.prewarm(self.settings.functions_dir)
            assignment, fds = recv_msg(theirs, SPAWN_FDS)
            if assignment is None or len(fds) != SPAWN_FDS:
                return ExitCode.OK  # the fork server is shutting down (or gone)
            profile = Profile.from_dict(assignment["profile"])
            assign(profile, slot, assignment["scratch"], fds, data_usage(), assignment["functions_dir"],
                   assignment["function"])
            child.main(assignment["functions_dir"], assignment["function"], profile)
            return ExitCode.RUNNER_FAILED  # child.main never returns

        pid = self._fork(run_spare, "spare sandbox")
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
            # (deadline <= now: a warm instance's pid has one heap entry per call it served)
            if call is not None and call.killed is None and call.deadline <= now:
                self._kill(call, Outcome.TIMEOUT, f"wall-clock limit of {call.profile.timeout_s:g} s exceeded")
        for call in list(self.calls.values()):
            if call.killed is None and now - call.started >= POLL_INTERVAL:
                over = self._memory_exceeded(call, now)
                if over:
                    self._kill(call, Outcome.MEMORY_LIMIT, over)
                elif self._cpu_exceeded(call):
                    self._kill(call, Outcome.TIMEOUT, f"CPU time limit of {call.profile.cpu_s:g} s exceeded "
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

    def _kill(self, call: Call, outcome: Outcome, message: str) -> None:
        call.killed, call.kill_message = outcome, message
        try:
            os.kill(call.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_slot(call.slot, call.pid)

    # -- reaping: only here, only from the main loop ------------------------------------------------------
    def _reap(self) -> None:
        now = time.monotonic()
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.instances.reaped(pid)  # performance hook: an idle instance's slot is cleaned like a spare's
            call = self.calls.pop(pid, None)
            if call is not None:
                self.by_id.pop(call.id, None)
                self.ending.append(Ending(call.slot, call.scratch, call.litter, pid, now, call, status, ru))
                continue
            spare = self.retired.pop(pid, None) or self._idle_spare(pid)
            if spare is not None:  # died without a call: its slot is freed like a finished call's
                if spare.pid not in self.dropped:
                    self.spare_retry_at = now + 1.0  # it died by itself: do not fork in a loop
                self.dropped.discard(spare.pid)
                self.ending.append(Ending(spare.slot, spare.scratch, spare.litter, pid, now))
                continue
            if pid in self.janitors:
                slot = self.janitors.pop(pid)
                if slot is not None:
                    self.slots.release(slot)
            # else: a call's orphan, reparented to us (we are its subreaper): reaped, nothing else to do

    def _idle_spare(self, pid: int) -> Spare | None:
        for i, spare in enumerate(self.spares):
            if spare.pid == pid:
                spare.sock.close()
                return self.spares.pop(i)
        return None

    def _settle(self) -> None:
        """Ends the calls whose slot holds no process any more (threads, grandchildren, daemons are SIGKILLed
        as soon as the main process is reaped; the next turns reap them)."""
        if not self.ending:
            return
        now = time.monotonic()
        still = []
        for e in self.ending:
            if kill_slot(e.slot, e.pid) or now - e.since > ENDING_MAX:
                self._ended(e)
            else:
                still.append(e)
        self.ending = still

    def _ended(self, e: Ending) -> None:
        if e.call is not None:
            self._send(self._report(e.call, e.status, e.rusage))
        # Before the slot (so its uid) can be reused: what the call left is removed or made root's, and a
        # big cleanup goes to a janitor process, which releases the slot when it is done.
        shared = e.scratch == self.settings.scratch_dir  # a call with a view has no folder of its own
        leftovers = [] if shared or remove_scratch(e.scratch) else [e.scratch]
        if self.slots.litter_changed(e.litter):
            if leftovers or not self.slots.litter_small():
                self._janitor(e.slot, leftovers, e.litter)
                return
            leftovers += self.slots.sweep_litter(e.slot, e.litter)
        if leftovers:
            self._janitor(None, leftovers)
        self.slots.release(e.slot)

    def _report(self, call: Call, status: int, ru: resource.struct_rusage | None) -> dict:
        code = os.waitstatus_to_exitcode(status)
        sig = -code if code < 0 else None
        cpu_ms = round((ru.ru_utime + ru.ru_stime) * 1000, 1) if ru else 0.0
        max_rss_kb = max(ru.ru_maxrss if ru else 0, call.peak_rss // 1024)
        cg = call.slot.cgroup
        tree_cpu = cg.cpu_ns() if cg is not None else None
        if tree_cpu is not None:  # every process of the call, not only the main one
            cpu_ms = max(cpu_ms, round(tree_cpu / 1e6, 1))
        if cg is not None:
            max_rss_kb = max(max_rss_kb, cg.peak_bytes() // 1024)
        outcome, message = call.killed, call.kill_message
        if outcome is None:
            if cg is not None and cg.oom_killed():
                outcome, message = Outcome.MEMORY_LIMIT, f"memory limit of {call.profile.memory_mb} MiB exceeded"
            elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_ms >= call.profile.cpu_s * 1000):
                outcome, message = Outcome.TIMEOUT, f"CPU time limit of {call.profile.cpu_s:g} s exceeded"
            elif code == ExitCode.OK:
                outcome, message = Outcome.OK, ""
            else:
                outcome = Outcome.CRASHED
                message = (f"the function's process was killed by signal {signal.Signals(sig).name}"
                           if sig else f"the function's process exited with code {code}")
        return {"op": "exit", "id": call.id, "outcome": outcome, "message": message, "exitcode": code,
                "signal": signal.Signals(sig).name if sig else None, "cpu_ms": cpu_ms,
                "max_rss_kb": max_rss_kb, "wall_ms": round((time.monotonic() - call.started) * 1000, 2)}

    def _janitor(self, slot: Slot | None, paths: list[str], litter: tuple[int, ...] | None = None) -> None:
        """Removing 100 000 files must not stall every other call's supervision: a short-lived process does it
        (forking is safe: this process is single-threaded). With a slot, it first sweeps the files the slot's
        uid left in the litter folders, and the slot is released when it is reaped."""

        def clean() -> ExitCode:
            self.slots.close()  # our copies of the slot locks must not outlive the fork server
            found = list(paths)
            if slot is not None and litter is not None:
                found += self.slots.sweep_litter(slot, litter)
            for path in found:
                remove_tree(path)
            return ExitCode.OK

        self.janitors[self._fork(clean, "cleanup")] = slot

    def _shutdown(self) -> None:
        self.instances.close()
        while self.spares:
            self._drop_spare(self.spares.pop())
        for call in list(self.calls.values()):
            if call.killed is None:
                self._kill(call, Outcome.UNAVAILABLE, "the fork server is shutting down")
        deadline = time.monotonic() + 5
        while (self.calls or self.janitors or self.retired or self.ending) and time.monotonic() < deadline:
            self._reap()
            self._settle()
            time.sleep(0.005)
        self.slots.close()


def _limit_slot(slot: Slot, profile: Profile) -> None:
    """The call's own memory and process limits on its slot's cgroups, with a fresh memory peak."""
    if slot.cgroup is not None:
        slot.cgroup.set_limits(profile.memory_mb * 1024 * 1024, profile.max_processes)
        slot.cgroup.reset_peak()


def main(fd: int | None = None) -> None:
    """Serves the control socket ``fd``: started as `python -m runner.forkserver FD` by a worker, or forked by
    the zygote (runner/zygote.py) with the fd it was handed."""
    sock = socket.socket(fileno=int(sys.argv[1]) if fd is None else fd)
    # The Supervisor passed a minimal PATH/LANG and no secret in the environment; its validated settings come
    # as the first message, so this process never reads FNBOX_* variables itself.
    msg, _ = recv_msg(sock)
    if not msg or msg.get("op") != "settings":
        sys.exit(2)
    settings = Settings.from_dict(msg["settings"])
    rawfork.install(settings.raw_fork)  # before a preloaded module can register an at-fork hook
    server = ForkServer(sock, settings)
    from runner import deps

    deps.SITE_PACKAGES = deps.site_packages(settings.data_dir)  # calls import the functions' packages from here
    server.serve()


if __name__ == "__main__":
    main()
