"""The gateway worker's side of the runner: owns one fork server and runs calls through it.

Ownership is explicit, as in gunicorn's arbiter: the Supervisor is the only owner of its fork server process.
A reader thread receives every message the fork server sends and hands it to the waiting call; when the fork
server dies, every waiting call fails cleanly and a new fork server is started at once. Every wait is bounded.

The request and response never pass through the fork server: the calling thread creates the child's pipes,
sends their far ends along with the spawn message (SCM_RIGHTS), then talks to the child directly.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from runner import outcomes, zygote
from runner.config import REPO_ROOT, Settings, runner_env
from runner.instances import profile_digest
from runner.preload import PreloadTracker
from runner.profiles import Profile
from runner.protocol import (
    MAX_HEADER,
    BadFrame,
    ErrorFrame,
    ResponseFrame,
    Truncated,
    encode_frame,
    parse_result,
    recv_msg,
    send_msg,
)

START_TIMEOUT = 15.0  # importing Flask on a cold disk can be slow; a healthy start takes ~0.3 s
RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # backoff between attempts to start a fork server that failed to start
GRACE = 2.0  # beyond the function's own timeout, for the fork server to kill, reap and report
# Below glibc's mmap threshold (64 KiB, set by ops/gunicorn.conf.py): os.read() allocates its buffer at full size
# first, and a 128 KiB buffer was an mmap, a munmap and an mremap per read, several reads per call.
READ_CHUNK = 60 * 1024


class Unavailable(Exception):
    """The fork server cannot be started or reached: no function can run right now."""


@dataclass
class Invocation:
    function: str
    functions_dir: str
    profile: Profile
    environ: dict[str, str]
    body: bytes
    request_id: str


@dataclass
class CallResult:
    outcome: str
    message: str = ""
    status: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error_type: str | None = None
    traceback: str | None = None  # from the function's own first frame on
    full_traceback: str | None = None  # with the runner's and Flask's frames, for the server log
    output: bytes = b""
    output_dropped: int = 0
    exitcode: int | None = None
    signal: str | None = None
    cpu_ms: float | None = None
    max_rss_kb: int | None = None
    sandbox_ms: float = 0.0  # from the call's start until the spawn request was sent and acknowledged
    wall_ms: float = 0.0
    answer_outcome: str | None = None  # set when the call ended otherwise than it answered (see _ended)
    _waiter: _Waiter | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """Whether the call's processes are all gone and cpu_ms/max_rss_kb are final."""
        return self._waiter is None or self._waiter.event.is_set()

    def wait_complete(self, timeout: float) -> bool:
        """Blocks (bounded) until the call's processes are gone and cpu_ms/max_rss_kb are final."""
        if self._waiter is None:
            return True
        if not self._waiter.event.wait(timeout):
            return False
        self._ended(self._waiter.msg or {})
        return True

    def _ended(self, msg: dict[str, Any]) -> None:
        """The fork server's report for a call that answered before its processes were gone. A call ends when
        its process tree ends: if it was then killed (its timeout, its memory) or died, that is its outcome,
        whatever it answered (`answer_outcome` keeps what the client got)."""
        _fill_exit(self, msg)
        late = msg.get("outcome")
        if self.outcome == outcomes.OK and late and late != outcomes.OK:
            self.answer_outcome = self.outcome
            self.outcome = late
            self.message = f"{msg.get('message') or late} (after the function had answered)"

    def when_complete(self, fn: Callable[[CallResult], object]) -> None:
        """Runs fn(self) once the call's processes are all gone and its cpu/memory figures are known: at once if
        they are, else when the fork server reports (the response may be answered before that)."""
        if self._waiter is None:
            fn(self)
            return

        def complete(msg: dict[str, Any]) -> None:
            self._ended(msg)
            fn(self)

        self._waiter.then(complete)


class _Waiter:
    """The fork server's "exit" report for one call, and what to run when it arrives."""

    __slots__ = ("event", "msg", "_lock", "_callbacks")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.msg: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[dict[str, Any]], object]] = []

    def set(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if self.event.is_set():
                return
            self.msg = msg
            self.event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(msg)
            except Exception as e:  # a logging failure must not kill the reader thread
                print(f"fnbox: call completion failed: {e!r}", file=sys.stderr)

    def then(self, fn: Callable[[dict[str, Any]], object]) -> None:
        """Runs fn(report) now if the report is in, else in the reader thread when it comes."""
        with self._lock:
            if not self.event.is_set():
                self._callbacks.append(fn)
                return
        fn(self.msg or {})


class _ForkServerProcess:
    """One incarnation of the fork server: its process, socket, and the calls waiting on it."""

    def __init__(self, settings: Settings) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Forked by the server's zygote (shares its warm image), or, without one, a process of its own.
            self.proc: subprocess.Popen | zygote.ForkedServer = zygote.fork(child.fileno()) or subprocess.Popen(
                [settings.python, "-m", "runner.forkserver", str(child.fileno())],
                pass_fds=(child.fileno(),), env=runner_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=sys.stderr, start_new_session=True, close_fds=True,
            )
        finally:
            child.close()
        self.sock = parent
        self.send_lock = threading.Lock()
        self.pending: dict[int, _Waiter] = {}
        self.pending_lock = threading.Lock()
        self.dead = False
        parent.settimeout(START_TIMEOUT)
        try:
            send_msg(parent, {"op": "settings", "settings": settings.to_dict()})
            msg, _ = recv_msg(parent)
        except OSError:
            msg = None
        if not msg or msg.get("op") != "ready":
            self.kill()
            code = self.proc.returncode
            raise Unavailable("the fork server did not start" + (f" (it exited with {code})" if code else ""))
        parent.settimeout(None)
        self.pid: int = msg["pid"]
        self.layers: dict[str, str] = msg.get("layers", {})

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        with self.send_lock:
            send_msg(self.sock, msg, fds)

    def register(self, call_id: int) -> _Waiter:
        w = _Waiter()
        with self.pending_lock:
            if self.dead:
                raise Unavailable("the fork server died")
            self.pending[call_id] = w
        return w

    def unregister(self, call_id: int) -> None:
        with self.pending_lock:
            self.pending.pop(call_id, None)

    def fail_all(self, message: str) -> None:
        with self.pending_lock:
            self.dead = True
            waiting, self.pending = self.pending, {}
        for w in waiting.values():
            w.set({"op": "exit", "outcome": outcomes.CRASHED, "message": message, "runner_died": True})

    def kill(self) -> None:
        # EOF: the fork server kills its calls and exits by itself. shutdown() first: a bare close() while the
        # reader thread is blocked in recv() on this socket keeps it open, and the fork server never sees EOF.
        for end in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                end()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=6)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class Supervisor:
    def __init__(self, settings: Settings, on_restart: Callable[[], object] | None = None,
                 preload_modules: Callable[[], Iterable[str]] | None = None) -> None:
        self.settings = settings
        self.preload = PreloadTracker(preload_modules)  # performance hook: runner/preload.py
        self._on_restart = on_restart
        self._lock = threading.Lock()
        self._fs: _ForkServerProcess | None = None
        self._ids = itertools.count(1)
        self._closing = False
        self.restarts = 0
        self.last_error: str | None = None
        self._retrying: threading.Thread | None = None
        self.next_attempt = 0.0  # monotonic time of the next start attempt while retrying
        self._wake = threading.Event()  # ends a retry's wait early when the server closes
        self._profile_cache: dict[int, tuple[Profile, dict[str, Any], str | None]] = {}

    # -- fork server lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the fork server now; raises Unavailable if it cannot (`fnbox run`)."""
        with self._lock:
            self._ensure_locked()

    def start_or_retry(self) -> None:
        """Starts the fork server, or, when it cannot start, keeps trying in the background with backoff. Never
        raises: a Gunicorn worker that fails to boot makes the master stop the whole server, whereas a worker
        without a fork server answers 503 unavailable (and /healthz says why) until the cause is gone."""
        try:
            self.start()
        except Unavailable as e:
            print(f"fnbox: {e}; retrying in the background", file=sys.stderr)
            self._retry_in_background()

    def _retry_in_background(self) -> None:
        with self._lock:
            if self._closing or (self._retrying is not None and self._retrying.is_alive()):
                return
            self._retrying = threading.Thread(target=self._retry_loop, name="fnbox-forkserver-retry", daemon=True)
            self._retrying.start()

    def _retry_loop(self) -> None:
        delay = RETRY_FIRST
        while not self._closing:
            self.next_attempt = time.monotonic() + delay
            self._wake.wait(delay)
            if self._closing:
                return
            try:
                self.start()
            except Unavailable as e:
                delay = min(RETRY_MAX, delay * 2)
                print(f"fnbox: {e}; next attempt in {delay:g} s", file=sys.stderr)
                continue
            print(f"fnbox: fork server {self.pid} started", file=sys.stderr)
            return

    @property
    def retrying(self) -> bool:
        t = self._retrying
        return t is not None and t.is_alive()

    def _ensure_locked(self) -> _ForkServerProcess:
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._fs is None or self._fs.dead:
            try:
                fs = _ForkServerProcess(self.settings)
            except (OSError, Unavailable) as e:
                self.last_error = f"cannot start the fork server: {e}"
                raise Unavailable(self.last_error) from None
            self.last_error = None
            self._fs = fs
            threading.Thread(target=self._read_loop, args=(fs,), name="fnbox-forkserver-reader",
                             daemon=True).start()
            self.preload.started(fs, self._ids)  # performance hook: its first job, before any call
        return self._fs

    def _fork_server(self) -> _ForkServerProcess:
        fs = self._fs
        if fs is not None and not fs.dead:
            return fs
        if self.retrying:  # a call never waits for a start: the retry thread owns them until one succeeds
            raise Unavailable(f"{self.last_error or 'the fork server is not running'} (retrying)")
        try:
            with self._lock:
                return self._ensure_locked()
        except Unavailable:
            if not self._closing:
                self._retry_in_background()
            raise

    def _read_loop(self, fs: _ForkServerProcess) -> None:
        while True:
            try:
                msg, _ = recv_msg(fs.sock)
            except OSError:
                msg = None
            if msg is None:
                break
            with fs.pending_lock:
                w = fs.pending.pop(msg.get("id"), None)
            if w is not None:
                w.set(msg)
        fs.fail_all("the sandbox runner died during the call")
        try:
            fs.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fs.proc.kill()
            fs.proc.wait(timeout=5)
        if not self._closing:
            self.restarts += 1
            if self._on_restart:
                self._on_restart()
            print(f"fnbox: fork server {fs.pid} exited ({fs.proc.returncode}); restarting", file=sys.stderr)
            self.start_or_retry()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        with self._lock:
            fs, self._fs = self._fs, None
        if fs is not None:
            fs.kill()

    @property
    def pid(self) -> int | None:
        fs = self._fs
        return fs.pid if fs and not fs.dead else None

    @property
    def layers(self) -> dict[str, str]:
        fs = self._fs
        return fs.layers if fs else {}

    def ping(self, timeout: float = 1.0) -> dict[str, Any] | None:
        try:
            fs = self._fork_server()
            call_id = next(self._ids)
            w = fs.register(call_id)
            fs.send({"op": "ping", "id": call_id})
        except (Unavailable, OSError):
            return None
        if not w.event.wait(timeout):
            fs.unregister(call_id)
            return None
        return None if w.msg and w.msg.get("runner_died") else w.msg

    # -- one call ----------------------------------------------------------------------------------------
    def _limits(self, profile: Profile) -> tuple[dict[str, Any], str | None]:
        """The spawn message's profile (no [env]) and, for warm instances, the profile's digest: computed once
        per Profile object (runner.profiles gives one object per function until the folder changes)."""
        cached = self._profile_cache.get(id(profile))
        if cached is not None and cached[0] is profile:
            return cached[1], cached[2]
        limits = dict(profile.to_dict(), env={})
        key = profile_digest(profile) if profile.reuse_calls > 1 else None
        if len(self._profile_cache) >= 256:
            self._profile_cache.clear()
        self._profile_cache[id(profile)] = (profile, limits, key)  # holds the object: its id is not reused
        return limits, key

    def call(self, inv: Invocation) -> CallResult:
        t0 = time.monotonic()
        fs = self._fork_server()
        self.preload.ensure(fs, inv.profile.preload, self._ids)  # performance hook: a profile edit added some
        call_id = next(self._ids)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            waiter = fs.register(call_id)
            # The fork server gets the limits it enforces and nothing of the call's data: no [env] value (they go
            # to the child over its stdin, below), no request, no result. Every child inherits the fork server's
            # memory, so whatever it ever held could be read by any later call.
            limits, key = self._limits(inv.profile)
            msg = {"op": "spawn", "id": call_id, "function": inv.function, "functions_dir": inv.functions_dir,
                   "profile": limits, "request_id": inv.request_id}
            if key is not None:  # performance hook: warm instances key on the whole profile
                msg["profile_key"] = key
            try:
                fs.send(msg, [stdin_r, out_w, res_w])
            except OSError:
                fs.unregister(call_id)
                raise Unavailable("the fork server is not reachable") from None
        except BaseException:
            for fd in (stdin_w, out_r, res_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, out_w, res_w):
                os.close(fd)
        sandbox_ms = (time.monotonic() - t0) * 1000
        payload = encode_frame({"environ": inv.environ, "request_id": inv.request_id,
                                "env": dict(inv.profile.env)}) + inv.body
        io = _CallIO(stdin_w, out_r, res_r, payload, inv.profile)
        deadline = t0 + inv.profile.timeout_s + GRACE
        drained = io.run(deadline, waiter)
        early = _early_result(io) if drained and not waiter.event.is_set() else None
        if early is not None:
            # The child wrote a complete result and closed its pipes: answer now. Its exit, reaping and the
            # cleanup of its slot (a few ms) go on in the fork server; the report completes the record later.
            early.sandbox_ms = sandbox_ms
            early.wall_ms = (time.monotonic() - t0) * 1000
            early._waiter = waiter
            return early
        if not waiter.event.is_set() and (io.overflow or not drained):
            # Still running: the output overflowed, or the fork server missed the deadline. Ask it to kill.
            try:
                fs.send({"op": "kill", "id": call_id, "outcome": outcomes.OUTPUT_LIMIT if io.overflow
                         else outcomes.TIMEOUT, "message": "killed by the gateway"})
            except OSError:
                pass
        if not waiter.event.wait(max(0.0, deadline - time.monotonic()) + GRACE):
            fs.unregister(call_id)
            exit_msg: dict[str, Any] = {"outcome": outcomes.CRASHED,
                                        "message": "the sandbox runner did not report the call's end"}
        else:
            exit_msg = waiter.msg or {}
        result = _compose(exit_msg, io)
        result.sandbox_ms = sandbox_ms
        result.wall_ms = (time.monotonic() - t0) * 1000
        return result


class _CallIO:
    """Writes the request to the child and drains its result and captured output, all in one select loop,
    so that neither side can block the other (a function printing 100 MB while we write its body)."""

    def __init__(self, stdin_w: int, out_r: int, res_r: int, payload: bytes, profile: Profile) -> None:
        self.stdin_w, self.out_r, self.res_r = stdin_w, out_r, res_r
        self.payload = memoryview(payload)
        self.result = bytearray()
        self.result_cap = MAX_HEADER + profile.max_response_kb * 1024 + 4
        self.output = bytearray()
        self.output_cap = profile.max_log_kb * 1024
        self.output_dropped = 0
        self.overflow = False
        self.result_eof = False

    def run(self, deadline: float, waiter: _Waiter) -> bool:
        """Returns False when the deadline passed with the child's pipes still open."""
        # poll(), not a selector: an epoll set per call cost five more syscalls (create, ctl x3, close).
        poller = select.poll()
        self.poller = poller
        for fd in (self.stdin_w, self.out_r, self.res_r):
            os.set_blocking(fd, False)
        poller.register(self.stdin_w, select.POLLOUT)
        poller.register(self.out_r, select.POLLIN)
        poller.register(self.res_r, select.POLLIN)
        self.open = 3
        try:
            while self.open:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                events = poller.poll(min(remaining, 0.05 if waiter.event.is_set() else 0.5) * 1000)
                if not events and waiter.event.is_set():
                    break  # the call is over and its pipes are idle: a leftover holder must not stall us
                for fd, _ in events:
                    if fd == self.stdin_w:
                        self._write()
                    elif fd == self.res_r:
                        self._read_result()
                    elif fd == self.out_r:
                        self._read_output()
            return True
        finally:
            for fd in (self.stdin_w, self.out_r, self.res_r):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _done(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.open -= 1

    def _write(self) -> None:
        try:
            n = os.write(self.stdin_w, self.payload[:65536])
            self.payload = self.payload[n:]
        except BlockingIOError:
            return
        except OSError:  # the child is gone before reading its request
            self.payload = self.payload[:0]
        if not self.payload:
            self._done(self.stdin_w)
            os.close(self.stdin_w)
            self.stdin_w = -1

    def _read_result(self) -> None:
        try:
            chunk = os.read(self.res_r, READ_CHUNK)
        except BlockingIOError:
            return
        if chunk:
            self.result += chunk
            if len(self.result) > self.result_cap:
                self.overflow = True
                self.result.clear()
                chunk = b""
        if not chunk:
            self.result_eof = not self.overflow
            self._done(self.res_r)

    def _read_output(self) -> None:
        try:
            chunk = os.read(self.out_r, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._done(self.out_r)
            return
        room = self.output_cap - len(self.output)
        if room > 0:
            self.output += chunk[:room]
        self.output_dropped += max(0, len(chunk) - max(room, 0))


def _fill_exit(r: CallResult, exit_msg: dict[str, Any]) -> None:
    r.exitcode, r.signal = exit_msg.get("exitcode"), exit_msg.get("signal")
    r.cpu_ms, r.max_rss_kb = exit_msg.get("cpu_ms"), exit_msg.get("max_rss_kb")


def _early_result(io: _CallIO) -> CallResult | None:
    """The call's answer from a complete result frame, before the exit report; None if there is none yet."""
    if not io.result_eof or io.overflow:
        return None
    try:
        frame = parse_result(bytes(io.result))
    except Truncated:
        return None  # wait for the report: a crash, a kill or a limit explains it
    except BadFrame as e:
        return _bad_frame(CallResult(outcome=outcomes.OK, output=bytes(io.output),
                                     output_dropped=io.output_dropped), e)
    r = CallResult(outcome=outcomes.OK, output=bytes(io.output), output_dropped=io.output_dropped)
    _apply_frame(r, frame)
    return r


def _compose(exit_msg: dict[str, Any], io: _CallIO) -> CallResult:
    r = CallResult(outcome=exit_msg.get("outcome", outcomes.CRASHED), message=exit_msg.get("message", ""),
                   output=bytes(io.output), output_dropped=io.output_dropped)
    _fill_exit(r, exit_msg)
    if io.overflow and r.outcome in (outcomes.OK, outcomes.CRASHED):
        r.outcome, r.message = outcomes.OUTPUT_LIMIT, "the response exceeds max_response_kb"
        return r
    if r.outcome != outcomes.OK:
        return r
    try:
        frame = parse_result(bytes(io.result))
    except Truncated as e:
        r.outcome, r.message = outcomes.CRASHED, f"the function's process sent no valid result ({e})"
        return r
    except BadFrame as e:
        return _bad_frame(r, e)
    _apply_frame(r, frame)
    return r


def _bad_frame(r: CallResult, e: BadFrame) -> CallResult:
    """User code wrote its own result on fd 3, and it does not hold: the function's error, not the platform's."""
    r.outcome = outcomes.FUNCTION_ERROR
    r.error_type = "InvalidResult"
    r.message = f"the function's process sent an invalid result: {e}"
    return r


def _apply_frame(r: CallResult, frame: ResponseFrame | ErrorFrame) -> None:
    if isinstance(frame, ResponseFrame):
        r.status, r.headers, r.body = frame.status, frame.headers, frame.body
        return
    r.outcome = frame.outcome
    r.message = frame.message
    r.error_type = frame.type
    r.traceback = frame.traceback
    full = frame.header.get("full_traceback")
    r.full_traceback = full if isinstance(full, str) else None  # for the server log only
