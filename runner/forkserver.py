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
import os
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import psutil

from runner import outcomes
from runner.config import Settings
from runner.profiles import Profile
from runner.protocol import SPAWN_FDS, recv_msg, send_msg
from runner.sandbox import (
    PR_SET_CHILD_SUBREAPER,
    Layers,
    Slot,
    SlotPool,
    data_usage,
    enter,
    kill_slot,
    make_scratch,
    prctl,
    probe_layers,
    remove_scratch,
    remove_tree,
)

POLL_INTERVAL = 0.02  # psutil memory checks; the kernel cgroup catches spikes between two polls


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
        self.data_base = 0
        self.running = True

    # -- setup -------------------------------------------------------------------------------------------
    def serve(self) -> None:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a call (double forks) come back to us to be reaped
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
        send_msg(self.sock, {"op": "ready", "pid": os.getpid(), "layers": self.layers.describe()})
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while self.running:
                for key, _ in sel.select(self._timeout()):
                    if key.data == "control":
                        self._on_control()
                    else:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                self._reap()
                self._check_limits()
        finally:
            self._shutdown()

    def _on_term(self, *_: object) -> None:
        self.running = False

    def _timeout(self) -> float | None:
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
        slot = self.slots.acquire(self._reap)
        if slot is None:
            self._send({"op": "exit", "id": call_id, "outcome": outcomes.BUSY,
                        "message": "every sandbox slot of this machine is in use"})
            return
        if slot.cgroup is not None:
            slot.cgroup.set_limits(profile.memory_mb * 1024 * 1024, profile.max_processes)
            slot.cgroup.reset_peak()
        scratch = make_scratch(self.settings, slot, f"{os.getpid()}-{call_id}")
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 71
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self.sock.close()
                enter(profile, slot, scratch, fds, self.data_base, self.layers)
                from runner import child

                child.main(msg["functions_dir"], msg["function"], profile.max_response_kb)
            except BaseException as e:
                try:
                    os.write(2, f"fnbox: sandbox setup failed: {e!r}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        now = time.monotonic()
        call = Call(call_id, pid, slot, profile, scratch, now, now + profile.timeout_s)
        self.calls[pid] = call
        self.by_id[call_id] = pid
        heapq.heappush(self.deadlines, (call.deadline, pid))

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
                rss = self._tree_rss(call)
                call.peak_rss = max(call.peak_rss, rss)
                if rss > call.profile.memory_mb * 1024 * 1024:
                    self._kill(call, outcomes.MEMORY_LIMIT,
                               f"memory limit of {call.profile.memory_mb} MiB exceeded (tree RSS)")

    def _tree_rss(self, call: Call) -> int:
        if call.slot.cgroup is not None:
            pids = call.slot.cgroup.procs()
        else:
            try:
                root = psutil.Process(call.pid)
                pids = [call.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.Error:
                return 0
        total = 0
        for pid in pids:
            proc = call.procs.get(pid)
            if proc is None:
                try:
                    proc = call.procs[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            try:
                total += proc.memory_info().rss
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
            self.janitors.discard(pid)

    def _finish(self, call: Call, status: int, ru: resource.struct_rusage) -> None:
        kill_slot(call.slot, call.pid, self._reap)  # threads, grandchildren, daemons: the call is over
        code = os.waitstatus_to_exitcode(status)
        sig = -code if code < 0 else None
        cpu_ms = round((ru.ru_utime + ru.ru_stime) * 1000, 1)
        max_rss_kb = max(ru.ru_maxrss, call.peak_rss // 1024)
        cg = call.slot.cgroup
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
        self._cleanup_scratch(call.scratch)
        self.slots.release(call.slot)

    def _cleanup_scratch(self, path: str) -> None:
        if remove_scratch(path):
            return
        # Not empty: removing 100 000 files must not stall every other call's supervision, so a short-lived
        # janitor process does it (forking is safe: this process is single-threaded).
        pid = os.fork()
        if pid == 0:
            try:
                self.sock.close()
                remove_tree(path)
            finally:
                os._exit(0)
        self.janitors.add(pid)

    def _shutdown(self) -> None:
        for call in list(self.calls.values()):
            if call.killed is None:
                self._kill(call, outcomes.UNAVAILABLE, "the fork server is shutting down")
        deadline = time.monotonic() + 5
        while (self.calls or self.janitors) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.005)
        self.slots.close()


def main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    # The Supervisor passed only FNBOX_* settings and a minimal PATH/LANG: no secret is in this environment.
    server = ForkServer(sock, Settings.from_env())
    # Warm everything a call needs before the first fork, so no child pays for an import.
    from runner import child

    child.warm()
    server.serve()


if __name__ == "__main__":
    main()
