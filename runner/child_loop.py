"""A warm instance's serve loop: one sandboxed process that runs up to `reuse_calls` calls of one function, one
at a time (runner/instances.py decides which calls it gets and when it ends).

It runs exactly like a fresh call's child (runner/child.py: the same Flask app, request object, return forms and
result frame), except that the function is imported once, by the first call, and its module stays in memory for
the next ones. Between calls the process holds no pipe of any call: fds 0-3 are the call's own, closed when its
answer is written, and a new call's pipes arrive over the instance's control socket with SCM_RIGHTS.

The instance ends itself (exit 0, so the fork server cleans its slot as after any call) after its last allowed
call, after any call that did not answer normally (an import error, an exception, a memory error: the next call
gets a fresh process), after a call that closed or replaced the instance's own fds, or when the control socket
closes. Everything else (limits, idle time, deploys) is decided
and enforced by the fork server, which kills it.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import sys
import tempfile
import types
from typing import Any

from runner import child, outcomes
from runner.profiles import Profile
from runner.protocol import CHILD_RESULT_FD, SPAWN_FDS, recv_msg, send_msg


class _Warm:
    """What survives between the calls of one instance: the function's module."""

    def __init__(self, functions_dir: str, name: str, profile: Profile) -> None:
        self.functions_dir, self.name, self.profile = functions_dir, name, profile
        self.module: types.ModuleType | None = None

    def load(self) -> dict[str, Any] | None:
        """Imports the function on the first call; an error frame if that fails."""
        if self.module is not None:
            return None
        module = child.import_function(self.functions_dir, self.name, self.profile)
        if isinstance(module, dict):
            return module
        self.module = module
        return None


def run_one(warm: _Warm) -> dict[str, Any] | tuple[dict[str, Any], bytes]:
    """One call, as runner.child.run() does it, with the module imported once per instance."""
    environ = child.read_request()
    environ["wsgi.run_once"] = False
    failed = warm.load()
    if failed is not None:
        return failed
    assert warm.module is not None
    return child.dispatch(warm.module, warm.functions_dir, warm.name, warm.profile, environ)


def _take_call(ctl: socket.socket) -> bool:
    """Waits for the next call's pipes and makes them fds 0-3; False when the fork server is done with us."""
    ctl.setblocking(True)
    msg, fds = recv_msg(ctl, SPAWN_FDS)
    # The function can reach this socket (fd 4): non-blocking while it runs, so that reading it cannot hang.
    ctl.setblocking(False)
    if msg is None or len(fds) != SPAWN_FDS:
        return False
    stdin_r, out_w, result_w = fds
    os.dup2(stdin_r, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(result_w, CHILD_RESULT_FD)
    for fd in fds:
        os.close(fd)
    return True


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _release(devnull: int) -> None:
    for fd in range(CHILD_RESULT_FD + 1):
        os.dup2(devnull, fd)


def _cpu_soft_limit(cpu_s: float) -> None:
    """RLIMIT_CPU's soft limit at this call's share (SIGXCPU, reported as a CPU timeout); the fork server's
    watchdog holds the call to it in any case."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(ru.ru_utime + ru.ru_stime + cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def serve(functions_dir: str, name: str, profile: Profile) -> None:
    """Entry point of a warm instance, after the sandbox is entered with the control socket as fds 0-3. Never
    returns."""
    tempfile.tempdir = None
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):
        pass
    ctl = socket.socket(fileno=os.dup(0))  # the lowest free fd (4)
    ctl_id = _identity(ctl.fileno())
    # Between calls fds 0-3 are /dev/null, never closed: received fds then never land on 0-3 themselves.
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    devnull_id = _identity(devnull)
    _release(devnull)
    warm = _Warm(functions_dir, name, profile)
    reuse_calls, cpu_s = profile.reuse_calls, profile.cpu_s
    code = 0
    try:
        for served in range(1, reuse_calls + 1):
            if not _take_call(ctl):
                break
            _cpu_soft_limit(cpu_s)
            ok = child.answer(lambda: run_one(warm))
            if not ok or served >= reuse_calls:
                break  # exit: the fork server reaps us and ends the call as it ends a fresh one
            # The function may have closed or replaced our fds: its answer stands (exit 0 ends the call as a
            # fresh one ends), but an instance whose control socket is not the one it was given serves no more.
            if _identity(ctl.fileno()) != ctl_id or _identity(devnull) != devnull_id:
                break
            # Reported before the pipes close, so the fork server knows before the caller can send another call.
            send_msg(ctl, {"op": "done"})
            _release(devnull)  # the call's pipes are closed: the gateway sees EOF, the answer is complete
    except OSError:
        pass  # the same, found while reporting: the answer was written, the exit reports it
    except BaseException:
        code = outcomes.ExitCode.RUNNER_FAILED
    os._exit(code)
