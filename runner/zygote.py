"""The fork-server zygote: one clean, warm process per server that forks each Gunicorn worker's fork server.

Why: a fork server's image is ~24 MB of Python objects (Flask, werkzeug, the runner) that it imports and warms
before forking calls. Started by each worker on its own, two fork servers shared none of it; forked from one
zygote, they (and every spare and call under them) share it copy-on-write, and a fork server that dies is
replaced in milliseconds instead of a fresh interpreter's ~0.4 s (docs/performance.md, "Idle memory (v5)").

Ownership, as in gunicorn's arbiter: the Gunicorn master starts the zygote (ops/gunicorn.conf.py, `Zygote`)
before it forks any worker, from the venv's interpreter, with the same scrubbed environment and no fd but its
listening socket. It holds no secret, no setting and no client connection; it never imports
or runs user code. It is the parent of the fork servers it forks and the only one that reaps them.

Its protocol, one SOCK_SEQPACKET connection per fork server (runner/protocol.py's JSON messages):
  worker -> zygote: {"op": "fork"} with the fork server's end of the worker's control socketpair (SCM_RIGHTS)
  zygote -> worker: {"op": "forked", "pid": N}, and when it has reaped N: {"op": "exited", "code": C}
The connection is accepted only from a process of the zygote's own uid (SO_PEERCRED); the socket lives in a
0700 directory of that uid. The fork server then reads its settings from the worker, as before.

SIGTERM (the master's, when it stops or reloads: a SIGHUP reload starts a new zygote with the new code; or the
kernel's, when the master dies: PR_SET_PDEATHSIG) ends it: it stops accepting, and exits once the fork servers
it forked have ended (they end with their workers), or after LINGER_S.

A worker that cannot reach the zygote starts a fork server of its own, as before (runner/supervisor.py): the
zygote saves memory and restart time, nothing depends on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from runner import wakeup
from runner.config import REPO_ROOT, runner_env
from runner.protocol import recv_msg, send_msg
from runner.sandbox import PR_SET_PDEATHSIG, prctl

ENV_SOCKET = "FNBOX_ZYGOTE_SOCKET"  # set by the master for its workers; not a setting an operator writes
CONNECT_TIMEOUT = 15.0  # the zygote's warm-up (~0.4 s) happens while the first workers already wait
ACCEPT_TIMEOUT = 2.0  # a connected peer that sends nothing must not stall the zygote
LINGER_S = 120.0
PR_SET_NAME = 15
ZYGOTE_NAME = "fnbox-zygote"  # the process names ps shows (what tests and the benchmark tell roles apart by)
FORK_SERVER_PREFIX = "fnbox-fs:"  # + the worker's pid
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _set_name(name: str) -> None:
    """The process name ps and /proc/<pid>/comm show (15 bytes): the zygote and each worker's fork server are
    told apart by it, since they share one command line. A name is a label: failing to set one changes nothing."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    with contextlib.suppress(OSError):
        prctl(PR_SET_NAME, ctypes.addressof(buf))


def fork_server_name(worker_pid: int) -> str:
    return f"{FORK_SERVER_PREFIX}{worker_pid}"


# -- the master's side -------------------------------------------------------------------------------------
class Zygote:
    """The master's handle: starts the zygote process, and ends it (SIGTERM, wait, bounded)."""

    def __init__(self, python: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="fnbox-zygote-")  # 0700: only this uid reaches the socket
        self.path = os.path.join(self.dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(self.path)
            listener.listen(64)
            self.proc = subprocess.Popen(
                [python, "-m", "runner.zygote", str(listener.fileno()), str(os.getpid())],
                pass_fds=(listener.fileno(),), env=runner_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=sys.stderr, start_new_session=True, close_fds=True,
            )
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            listener.close()  # the workers connect by path; they must not inherit the listener
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Stops new forks at once; the process exits when its fork servers have (they end with their workers,
        so call this after the workers are gone), else it is killed after ``timeout``."""
        if not self._stopped:
            self._stopped = True
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if timeout <= 0:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except ChildProcessError:  # Gunicorn's master reaps every child it has (waitpid(-1)), ours included
            pass


# -- the worker's side -------------------------------------------------------------------------------------
class ForkedServer:
    """A fork server forked by the zygote, as the worker sees it: what subprocess.Popen gave it before (wait,
    kill, returncode), through the zygote's connection (its exit code) and a pidfd (signals that cannot reach
    a reused pid)."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the reader thread and close() may both wait for the exit
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = -1  # already gone: its exit message is on the way

    def wait(self, timeout: float | None = None) -> int:
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired("fork server", timeout or 0)
        try:
            if self.returncode is None:
                self.returncode = self._exit_code(timeout)
                self._close()
            return self.returncode
        finally:
            self._lock.release()

    def _exit_code(self, timeout: float | None) -> int:
        self.conn.settimeout(timeout)
        try:
            msg, _ = recv_msg(self.conn)
        except TimeoutError:
            raise subprocess.TimeoutExpired("fork server", timeout or 0) from None
        except (OSError, ValueError):
            msg = None
        if msg and msg.get("op") == "exited":
            return int(msg.get("code", -1))
        # The zygote itself is gone (it would have reported the exit): wait on the process itself.
        if self._pidfd >= 0:
            import select

            select.select([self._pidfd], [], [], timeout)
        return -1

    def kill(self) -> None:
        if self._pidfd >= 0 and self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.conn.close()


def fork(control_fd: int) -> ForkedServer | None:
    """Asks this server's zygote for a fork server on ``control_fd`` (its end of the control socketpair);
    None when there is no zygote to ask (not under Gunicorn, or it is gone): the caller starts one itself."""
    path = os.environ.get(ENV_SOCKET)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(path)
        send_msg(conn, {"op": "fork"}, [control_fd])
        msg, _ = recv_msg(conn)
    except OSError as e:
        conn.close()
        print(f"fnbox: the fork-server zygote cannot be reached ({e}); this worker starts its own",
              file=sys.stderr)
        return None
    if not msg or msg.get("op") != "forked" or not isinstance(msg.get("pid"), int):
        conn.close()
        print("fnbox: the fork-server zygote did not fork; this worker starts its own", file=sys.stderr)
        return None
    conn.settimeout(None)
    return ForkedServer(conn, msg["pid"])


# -- the zygote process ------------------------------------------------------------------------------------
class _ZygoteLoop:
    def __init__(self, listener: socket.socket, master: int) -> None:
        self.listener: socket.socket | None = listener
        self.master = master
        self.stopping = False
        self.children: dict[int, socket.socket] = {}  # fork server pid -> its worker's connection
        self.uid = os.geteuid()

    def run(self) -> None:
        wake_r, wake_w = wakeup.install()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in `make run` reaches the master, which ends us
        self.wake = (wake_r, wake_w)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the master is single-threaded: its death is its thread's
        if os.getppid() != self.master:  # it died before that
            self.stopping = True
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        until: float | None = None
        while True:
            if self.stopping:
                if until is None:
                    # The master is gone or replaced: no new fork server; the running ones end with their workers.
                    sel.unregister(self.listener)
                    self.listener.close()
                    self.listener = None
                    until = time.monotonic() + LINGER_S
                if not self.children or time.monotonic() >= until:
                    return
            for key, _ in sel.select(1.0 if until is not None else None):
                if key.data == "accept" and self.listener is not None:
                    self._accept()
                else:
                    wakeup.drain(wake_r)
            self._reap()

    def _on_term(self, *_: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != self.uid:
                raise PermissionError(f"a process of uid {uid} asked for a fork server")
            conn.settimeout(ACCEPT_TIMEOUT)
            msg, fds = recv_msg(conn, maxfds=1)
            if not msg or msg.get("op") != "fork" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ValueError("not a fork request")
        except (OSError, ValueError) as e:
            print(f"fnbox: zygote: refused a connection: {e}", file=sys.stderr)
            conn.close()
            return
        control_fd = fds[0]
        child = os.fork()
        if child == 0:
            self._become_fork_server(conn, control_fd, pid)  # never returns
        os.close(control_fd)
        try:
            send_msg(conn, {"op": "forked", "pid": child})
        except OSError:
            pass  # the worker gave up waiting: its fork server sees EOF on the control socket and exits
        self.children[child] = conn

    def _become_fork_server(self, conn: socket.socket, control_fd: int, worker_pid: int) -> None:
        code = 70
        try:
            wakeup.uninstall()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for fd in self.wake:
                os.close(fd)
            if self.listener is not None:
                self.listener.close()
            conn.close()
            for other in self.children.values():
                other.close()
            os.setsid()  # as Popen(start_new_session=True) did: a signal to the master's group is not ours
            _set_name(fork_server_name(worker_pid))
            from runner import forkserver

            forkserver.main(control_fd)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    conn.settimeout(0)
                    send_msg(conn, {"op": "exited", "code": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()


def main(argv: list[str]) -> None:
    listener = socket.socket(fileno=int(argv[1]))
    master = int(argv[2])
    _set_name(ZYGOTE_NAME)
    # What every fork server would import, warm and compile first, once for all of them (runner/forkserver.py
    # serve(), runner/sandbox.py probe_layers()): done after the fork, each fork server would copy the pages it
    # writes (the syscall filter's compilation alone, libseccomp and its binding, copied ~4 MB per fork server).
    from runner import child, forkserver, syscalls  # noqa: F401
    from runner.heap import trim

    syscalls.compile_program()  # settings-independent, cached per process
    child.warm()
    gc.collect()
    gc.freeze()
    trim()
    _ZygoteLoop(listener, master).run()


if __name__ == "__main__":
    main(sys.argv)
