"""The fork-server zygote (runner/zygote.py) as a real server shows it: the master starts one clean, warm
process that forks every worker's fork server; calls work through it; a fork server killed is forked again by
it; without it (killed, or FNBOX_ZYGOTE=0) every worker starts its own fork server as before; a reload gets a
new zygote for the new code; nothing but the server's own uid may ask it for anything; it ends with the
server, also when the master is killed."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import psutil

from tests.faultkit import alive, fork_servers, wait_for, workers_of, zygotes_of

HELLO = {"hello": "def main(request):\n    return 'Hello World!'\n"}


def _calls_ok(srv, n: int = 6) -> None:
    for _ in range(n):
        r = srv.get("/function/hello")
        assert r.status_code == 200 and r.text == "Hello World!", (r.status_code, r.text)


def _healthz_pids(srv, workers: int) -> dict[int, int]:
    """worker pid -> the fork server pid its /healthz names, once every worker has answered."""
    seen: dict[int, int] = {}

    def poll():
        h = srv.get("/healthz").json()
        if h["status"] == "ok":
            seen[h["worker_pid"]] = h["fork_server_pid"]
        return len(seen) == workers

    assert wait_for(poll, 20), seen
    return seen


def test_fork_servers_are_forked_by_one_zygote_that_holds_nothing_of_the_server(make_server):
    srv = make_server(functions=HELLO, workers=2, env={"FNBOX_ADMIN_TOKEN": "zygote-must-not-see-this"}).start()
    _calls_ok(srv)
    (zygote,) = zygotes_of(srv)
    assert zygote.ppid() == srv.proc.pid and zygote.uids().real == 0
    forks = fork_servers(srv)
    workers = {w.pid for w in workers_of(srv)}
    assert sorted(forks.values()) == sorted(workers), (forks, workers)
    assert all(psutil.Process(fs).ppid() == zygote.pid for fs in forks)
    assert {v: k for k, v in forks.items()} == _healthz_pids(srv, 2)  # each worker talks to its own
    # A clean parent: no FNBOX_* variable or secret in its environment, no fd of the server's (listening
    # socket, log, database): only its stdio, its own listening socket, its wake-up pipe, and one connection
    # per fork server it forked.
    environ = open(f"/proc/{zygote.pid}/environ", "rb").read().decode().split("\0")
    assert not [e for e in environ if e.startswith("FNBOX_") or "zygote-must-not-see-this" in e], environ
    fds = {int(fd): os.readlink(f"/proc/{zygote.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{zygote.pid}/fd")}
    sockets = [t for t in fds.values() if t.startswith("socket:")]
    pipes = [t for t in fds.values() if t.startswith("pipe:")]
    assert len(sockets) == 1 + len(forks), fds  # the listener and one connection per fork server
    polls = [t for t in fds.values() if t == "anon_inode:[eventpoll]"]  # its selector
    assert len(pipes) == 2 and len(polls) == 1 and fds[0] == "/dev/null", fds
    assert len(fds) == 3 + len(sockets) + len(pipes) + len(polls), fds
    port = srv.port
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid == zygote.pid]
    assert not listening


def test_a_killed_fork_server_is_forked_again_by_the_zygote(make_server):
    srv = make_server(functions=HELLO, workers=1).start()
    _calls_ok(srv, 2)
    (zygote,) = zygotes_of(srv)
    (old,) = fork_servers(srv)
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: [fs for fs in fork_servers(srv) if fs != old], 15)
    assert new and psutil.Process(new[0]).ppid() == zygote.pid
    assert wait_for(lambda: srv.get("/healthz").json()["fork_server_pid"] == new[0], 15)
    _calls_ok(srv)
    assert "this worker starts its own" not in srv.read_log()


def test_without_a_zygote_each_worker_starts_its_own_fork_server(make_server):
    """The zygote saves memory; nothing depends on it. Killed: the next fork server a worker needs is its own
    child again. FNBOX_ZYGOTE=0: there is none from the start."""
    srv = make_server(functions=HELLO, workers=1).start()
    (zygote,) = zygotes_of(srv)
    (fs,) = fork_servers(srv)
    os.kill(zygote.pid, signal.SIGKILL)
    _calls_ok(srv, 2)  # the running fork server is not affected
    os.kill(fs, signal.SIGKILL)
    (worker,) = workers_of(srv)
    own = wait_for(lambda: [f for f, w in fork_servers(srv).items() if f != fs], 15)
    assert own and psutil.Process(own[0]).ppid() == worker.pid
    _calls_ok(srv)
    assert "fork-server zygote cannot be reached" in srv.read_log()

    off = make_server(functions=HELLO, workers=2, env={"FNBOX_ZYGOTE": "0"}).start()
    _calls_ok(off)
    assert zygotes_of(off) == []
    forks = fork_servers(off)
    assert len(forks) == 2 and all(psutil.Process(f).ppid() == w for f, w in forks.items())
    assert "fork-server zygote off (FNBOX_ZYGOTE=0)" in off.read_log()


def test_a_reload_starts_a_new_zygote_and_the_old_one_ends(make_server):
    srv = make_server(functions=HELLO, workers=1).start()
    _calls_ok(srv, 2)
    (old,) = zygotes_of(srv)
    old_workers = {w.pid for w in workers_of(srv)}
    os.kill(srv.proc.pid, signal.SIGHUP)

    def reloaded():
        zs = [z for z in zygotes_of(srv) if z.pid != old.pid]
        ws = {w.pid for w in workers_of(srv)}
        return zs and ws and not ws & old_workers and not psutil.pid_exists(old.pid) and zs[0]

    new = wait_for(reloaded, 30)
    assert new, (zygotes_of(srv), workers_of(srv), psutil.pid_exists(old.pid))
    forks = wait_for(lambda: fork_servers(srv), 15)
    assert [psutil.Process(f).ppid() for f in forks] == [new.pid], srv.read_log()[-3000:]
    _calls_ok(srv)
    assert "this worker starts its own" not in srv.read_log()


def test_only_the_servers_own_uid_reaches_the_zygote(make_server):
    srv = make_server(functions=HELLO, workers=1).start()
    (zygote,) = zygotes_of(srv)
    (worker,) = workers_of(srv)
    (path,) = {c.laddr for c in zygote.net_connections("unix") if c.laddr}
    folder = os.stat(os.path.dirname(path))
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.geteuid()
    # Another uid (a sandbox uid) cannot even reach the socket.
    probe = (f"import os, socket; os.setgid(65534); os.setgroups([]); os.setuid(65534)\n"
             f"s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
             f"try:\n    s.connect({path!r})\nexcept PermissionError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "refused", out
    # A connection that is not a fork request (no fd) is refused and changes nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"op": "fork"}')
        assert s.recv(100) == b""
    assert "refused a connection: not a fork request" in srv.read_log()
    assert zygote.is_running() and len(fork_servers(srv)) == 1
    _calls_ok(srv, 2)


def test_the_zygote_ends_with_the_server_even_when_the_master_is_killed(make_server):
    srv = make_server(functions=HELLO, workers=2).start()
    _calls_ok(srv, 2)
    (zygote,) = zygotes_of(srv)
    tree = [zygote.pid, *fork_servers(srv), *(w.pid for w in workers_of(srv))]
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    assert wait_for(lambda: not any(alive(p) for p in tree), 30), [p for p in tree if alive(p)]


def test_a_call_cannot_reach_the_zygote(make_server):
    """A call (root's child, then a sandbox uid) is handed the zygote's socket path and tries to ask it for a fork
    server of its own: the path is not in its file system view, and even where it were, its folder is 0700 root."""
    srv = make_server(functions={"probe": PROBE}, workers=1).start()
    (zygote,) = zygotes_of(srv)
    (path,) = {c.laddr for c in zygote.net_connections("unix") if c.laddr}
    forks = set(fork_servers(srv))
    r = srv.request("POST", "/function/probe", data=path.encode())
    assert r.status_code == 200, r.text
    outcome = r.json()
    assert outcome["connect"] in ("FileNotFoundError", "PermissionError"), outcome
    assert outcome["folder"] in ("FileNotFoundError", "PermissionError"), outcome
    assert set(fork_servers(srv)) == forks and "refused a connection" not in srv.read_log()


PROBE = """
import os, socket

def main(request):
    path = request.get_data(as_text=True)
    out = {}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        out["connect"] = "connected"
    except OSError as e:
        out["connect"] = type(e).__name__
    try:
        os.listdir(os.path.dirname(path))
        out["folder"] = "listed"
    except OSError as e:
        out["folder"] = type(e).__name__
    return out
"""
