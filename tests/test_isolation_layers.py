"""Sandbox v2's isolation layers (issue 10), through a real server: a call sees only its own world, and nothing
passes between calls. One test per finding of the issue (2-10), each reproducing the attack and asserting that
it now gets nothing.

Each test first checks, from the server's /healthz "sandbox" report, that the layer it exercises is active, and
skips with the reason otherwise (a machine without root, mount namespaces or libseccomp). The attacks are
contained: everything they write goes to the call's own tmpfs, every process they start is in the call's
cgroups and dies with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import pytest

from runner.profiles import ProfileError, load_profiles
from tests.conftest import REPO, SHARED, Server, assert_nothing_left

TOKEN = "isolation-token"
SECRET = "s3cr3t-" + uuid.uuid4().hex

LOOK = """
import os
def main(request):
    out = {"passwd": open("/etc/passwd").read(), "root": sorted(os.listdir("/")), "cwd": os.getcwd(),
           "home": os.environ["HOME"], "tmpdir": os.environ["TMPDIR"]}
    for path in request.args.getlist("path"):
        try:
            if os.path.isdir(path):
                out[path] = sorted(os.listdir(path))
            else:
                with open(path, "rb") as f:
                    out[path] = f.read(200).decode("latin-1")
        except OSError as e:
            out[path] = type(e).__name__
    out["functions"] = sorted(os.listdir(request.args["functions"]))
    return out
"""

OTHER = f"""
API_KEY = {SECRET!r}
def main(request):
    return "other"
"""

PROCS = """
import os, time
def main(request):
    kid = os.fork()
    if kid == 0:
        time.sleep(5)
        os._exit(0)
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        out = {"pids": pids, "me": os.getpid(), "kid": kid, "ppid_visible": os.path.exists(f"/proc/{os.getppid()}")}
        out["host_pid_visible"] = os.path.exists("/proc/" + request.args["host_pid"])
        try:
            with open("/proc/1/cmdline", "rb") as f:
                out["init_cmdline"] = f.read().decode("latin-1")
        except OSError as e:
            out["init_cmdline"] = type(e).__name__
        groups = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\\n").split(":", 2)
                for c in ctrls.split(","):
                    groups[c] = path
        mine = "/sys/fs/cgroup/pids" + groups["pids"]
        out["own_cgroup_procs"] = sorted(int(p) for p in open(mine + "/cgroup.procs").read().split())
        parent = os.path.dirname(mine)  # the other slots' folders: empty mount points at most
        out["slots_with_content"] = sorted(d for d in os.listdir(parent) if os.listdir(os.path.join(parent, d)))
        out["own_slot"] = os.path.basename(mine)
        return out
    finally:
        os.kill(kid, 9)
        os.waitpid(kid, 0)
"""

# Writes its files, says so in the shared folder, and stays until the test says the other call has looked.
WRITER = """
import os, time
def main(request):
    marks = request.args["marks"]
    for path in ("/tmp/report.txt", "/var/tmp/keep.txt", "/dev/shm/segment"):
        with open(path, "w") as f:
            f.write("written by writer")
        os.chmod(path, 0o666)
    open(os.path.join(marks, "writer-ready"), "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(marks, "reader-done")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"tmp": sorted(os.listdir("/tmp"))}
"""

READER = """
import os
def main(request):
    out = {}
    for path in ("/tmp/report.txt", "/var/tmp/keep.txt", "/dev/shm/segment"):
        try:
            with open(path) as f:
                out[path] = f.read()
        except OSError as e:
            out[path] = type(e).__name__
    try:
        with open("/tmp/report.txt", "a") as f:  # a later call's secret would land in a pre-created file
            f.write("my secret")
        out["wrote_report"] = True
    except OSError:
        out["wrote_report"] = False
    out["listing"] = {d: sorted(os.listdir(d)) for d in ("/tmp", "/var/tmp", "/dev/shm")}
    return out
"""

SOCK_SERVER = """
import os, socket, time
def main(request):
    marks = request.args["marks"]
    path_srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path_srv.bind("/tmp/call.sock")
    path_srv.listen(4)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\\0fnbox-isolation-test")
    abstract.listen(4)
    open(os.path.join(marks, "sockets-ready"), "w").close()
    path_srv.settimeout(0.05)
    abstract.settimeout(0.05)
    accepted = 0
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(marks, "client-done")) and time.monotonic() < deadline:
        for s in (path_srv, abstract):
            try:
                s.accept()[0].close()
                accepted += 1
            except OSError:
                pass
    return {"accepted": accepted}
"""

SOCK_CLIENT = """
import socket
def main(request):
    out = {}
    for name, addr in (("path", "/tmp/call.sock"), ("abstract", "\\0fnbox-isolation-test"),
                       ("host", request.args["host_sock"])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect(addr)
            out[name] = "connected"
        except OSError as e:
            out[name] = type(e).__name__
        finally:
            s.close()
    import glob
    out["run_sockets"] = glob.glob("/run/**/*.sock", recursive=True) + glob.glob("/var/run/*")
    return out
"""

SYSCALLS = """
import ctypes, errno, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

# x86_64 syscall numbers
ATTEMPTS = {
    "unshare(CLONE_NEWUSER)": (272, 0x10000000),
    "unshare(CLONE_NEWNS)": (272, 0x00020000),
    "unshare(CLONE_NEWPID)": (272, 0x20000000),
    "clone(CLONE_NEWUSER)": (56, 0x10000000 | 17, 0, 0, 0, 0),
    "clone(CLONE_NEWNET)": (56, 0x40000000 | 17, 0, 0, 0, 0),
    "setns": (308, 0, 0),
    "mount": (165, 0, 0, 0, 0, 0),
    "umount2": (166, 0, 0),
    "pivot_root": (155, 0, 0),
    "open_tree": (428, -100, 0, 0),
    "fsopen": (430, 0, 0),
    "ptrace(TRACEME)": (101, 0, 0, 0, 0),
    "process_vm_readv": (310, 1, 0, 0, 0, 0, 0),
    "keyctl": (250, 0, 0, 0, 0, 0),
    "request_key": (249, 0, 0, 0, 0),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "userfaultfd": (323, 0),
    "io_uring_setup": (425, 1, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, 0),
    "finit_module": (313, 0, 0, 0),
    "delete_module": (176, 0, 0),
    "reboot": (169, 0, 0, 0, 0),
    "swapon": (167, 0, 0),
    "acct": (163, 0),
    "iopl": (172, 3),
    "ioperm": (173, 0, 1, 1),
    "open_by_handle_at": (304, 0, 0, 0),
}

def main(request):
    out = {}
    for name, (nr, *args) in ATTEMPTS.items():
        try:
            call(nr, *args)
            out[name] = "allowed"
        except OSError as e:
            out[name] = type(e).__name__
    # The normal ways to start processes and threads still work (clone3 fails with ENOSYS: glibc falls back).
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    box = []
    t = threading.Thread(target=lambda: box.append("ran"))
    t.start()
    t.join()
    out["thread"] = box
    out["subprocess"] = subprocess.run(["/bin/sh", "-c", "echo sh ok"], capture_output=True, text=True).stdout
    return out
"""

KEYRING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
KEY_SPEC_USER_KEYRING = -4

def main(request):
    out = {}
    # add_key("user", "fnbox-secret", data, len, KEY_SPEC_USER_KEYRING): kept per uid, slot uids are reused
    r = libc.syscall(ctypes.c_long(248), b"user", b"fnbox-secret", b"the data", ctypes.c_long(8),
                     ctypes.c_long(KEY_SPEC_USER_KEYRING))
    out["add_key"] = "added" if r >= 0 else type(OSError(ctypes.get_errno(), "")).__name__
    # keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", "fnbox-secret", 0): what an earlier call left
    r = libc.syscall(ctypes.c_long(250), ctypes.c_long(10), ctypes.c_long(KEY_SPEC_USER_KEYRING), b"user",
                     b"fnbox-secret", ctypes.c_long(0))
    out["search"] = "found" if r >= 0 else type(OSError(ctypes.get_errno(), "")).__name__
    return out
"""

SPREAD_CPU = """
import os, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def main(request):
    n, each = int(request.args["n"]), float(request.args["each"])
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            burn(each)  # each child stays under RLIMIT_CPU (per process)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    return {"children": n, "main_cpu": time.process_time()}
"""

DISK = """
import errno, os
def main(request):
    written, error = 0, None
    chunk = b"x" * (1 << 20)
    i = 0
    try:
        while written < (1 << 30):
            target = request.args["where"] + f"/fill-{i}"  # many files, each under max_file_mb
            with open(target, "wb") as f:
                for _ in range(4):
                    f.write(chunk)
                    written += len(chunk)
            i += 1
    except OSError as e:
        error = errno.errorcode.get(e.errno, str(e.errno))
    return {"written_mb": written >> 20, "error": error}
"""

LITTER = """
import os
def main(request):
    depth = 0
    path = "deep"
    os.mkdir(path)
    os.chdir(path)
    for depth in range(1, 3001):
        os.mkdir("d")
        os.chdir("d")
    os.chdir("/tmp")
    os.mkdir("many")
    n = int(request.args["files"])
    for i in range(n):
        os.close(os.open(f"many/{i}", os.O_WRONLY | os.O_CREAT, 0o600))
    return {"depth": depth, "files": len(os.listdir("many"))}
"""

HELLO = "def main(request):\n    return 'Hello World!'\n"

LIMITS = """
[spread_cpu]
cpu_s = 1
timeout_s = 20

[spread_cpu_ok]
cpu_s = 10
timeout_s = 20

[disk]
max_disk_mb = 8
max_file_mb = 16
memory_mb = 128

[litter]
timeout_s = 30
cpu_s = 30
memory_mb = 256

[writer]
timeout_s = 30

[sock_server]
timeout_s = 30

[egress]
network = true
"""


@pytest.fixture(scope="module")
def marks_root() -> Any:
    d = tempfile.mkdtemp(prefix="fnbox-test-isolation-", dir=SHARED)
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def srv(marks_root: str) -> Any:
    functions = {"look": LOOK, "other": OTHER, "procs": PROCS, "writer": WRITER, "reader": READER,
                 "sock_server": SOCK_SERVER, "sock_client": SOCK_CLIENT, "syscalls": SYSCALLS,
                 "keyring": KEYRING, "spread_cpu": SPREAD_CPU, "spread_cpu_ok": SPREAD_CPU, "disk": DISK,
                 "litter": LITTER, "hello": HELLO, "egress": EGRESS}
    s = Server(functions=functions, profiles={"functions.toml": LIMITS}, env={"FNBOX_ADMIN_TOKEN": TOKEN},
               threads=16)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def marks(marks_root: str) -> Any:
    d = tempfile.mkdtemp(dir=marks_root)
    os.chmod(d, 0o777)
    return d


def need(srv: Server, *layers: str) -> None:
    """Skips unless the server reports every layer active (it never claims one it could not set up)."""
    sandbox = srv.get("/healthz").json()["sandbox"]
    missing = [f"{n}: {sandbox.get(n, 'not reported')}" for n in layers if not sandbox.get(n, "").startswith("active")]
    if missing:
        pytest.skip("layer not active on this machine: " + "; ".join(missing))


def wait_for(path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def in_background(fn) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=fn()))
    t.start()
    return t, box


def history(srv: Server, request_id: str) -> dict[str, Any]:
    r = srv.get(f"/admin/calls/{request_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return r.json()


# -- finding 2: the host's files -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_host_files_are_invisible(srv):
    need(srv, "file_system_view")
    versions = os.path.join(srv.data_dir, "versions")
    os.makedirs(os.path.join(versions, "other", "1"), exist_ok=True)
    with open(os.path.join(versions, "other", "1", "__init__.py"), "w") as f:
        f.write(OTHER)
    # The project tree shows only as the path to its venv (the runtime): none of its files.
    paths = ["/home", "/root/.bashrc", os.path.join(REPO, "runner"), os.path.join(REPO, "README.md"),
             os.path.join(REPO, "sandbox_profiles", "default.toml"),
             srv.profiles_dir, os.path.join(srv.profiles_dir, "functions.toml"), srv.data_dir, versions,
             os.path.join(srv.functions_dir, "other.py"), "/var/lib", "/var/log", "/sys/class", "/run/fnbox",
             "/etc/shadow", "/etc/hostname"]
    r = srv.get("/function/look", params={"path": paths, "functions": srv.functions_dir})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert SECRET not in r.text
    users = [line.split(":")[0] for line in doc["passwd"].splitlines()]
    assert users[0] == "root" and users[-1] == "nobody", doc["passwd"]
    assert all(u.startswith("fnbox-") for u in users[1:-1]), doc["passwd"]  # the sandbox uids: no host user
    for p in paths:
        assert doc[p] in ("FileNotFoundError", "PermissionError"), (p, doc[p])
    # Its functions folder holds the package's __init__.py and itself: no other function.
    assert doc["functions"] == ["__init__.py", "look.py"], doc["functions"]
    assert doc["cwd"] == doc["home"] == doc["tmpdir"] == "/tmp", doc
    assert not {"home", "opt", "mnt", "media", "srv", "boot"} & set(doc["root"]), doc["root"]
    assert srv.get("/function/other").text == "other"  # the other function itself still runs


@pytest.mark.timeout(60)
def test_a_deployed_package_sees_only_its_own_version(srv):
    need(srv, "file_system_view")
    versions = os.path.join(srv.data_dir, "versions", "pkgv")
    for v, text in ((1, "old"), (2, "new")):
        os.makedirs(os.path.join(versions, str(v)), exist_ok=True)
        with open(os.path.join(versions, str(v), "__init__.py"), "w") as f:
            f.write(f"import os\ndef main(request):\n    return {{'v': {text!r}, 'file': __file__, "
                    f"'siblings': sorted(os.listdir(os.path.dirname(os.path.dirname(__file__))))}}\n")
    link = os.path.join(srv.functions_dir, "pkgv")
    os.symlink(os.path.join(versions, "2"), link)
    try:
        r = srv.get("/function/pkgv")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["v"] == "new", doc
        assert doc["siblings"] == ["__init__.py", "pkgv"], doc  # neither version 1 nor other functions
        look = srv.get("/function/look", params={"path": [versions, os.path.join(versions, "1", "__init__.py")],
                                                 "functions": srv.functions_dir}).json()
        assert look[versions] == "FileNotFoundError" and look[os.path.join(versions, "1", "__init__.py")] == \
            "FileNotFoundError", look
    finally:
        os.unlink(link)


# -- finding 3: other processes --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_proc_shows_only_the_calls_own_processes(srv):
    need(srv, "own_processes")
    r = srv.get("/function/procs", params={"host_pid": str(os.getpid())})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc["pids"]) == {doc["me"], doc["kid"]}, doc
    assert doc["ppid_visible"] is False and doc["host_pid_visible"] is False, doc
    assert doc["init_cmdline"] == "FileNotFoundError", doc
    assert set(doc["own_cgroup_procs"]) == {doc["me"], doc["kid"]}, doc
    # The slot's own cgroup folder is visible (a function may read its limits); its siblings' are empty.
    assert doc["slots_with_content"] == [doc["own_slot"]], doc


# -- finding 4: shared temp folders ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_tmp_var_tmp_and_dev_shm_are_per_call(srv, marks):
    need(srv, "file_system_view")
    t, box = in_background(lambda: srv.get("/function/writer", params={"marks": marks}, timeout=40))
    try:
        wait_for(os.path.join(marks, "writer-ready"))
        r = srv.get("/function/reader")  # runs while the writer's files exist
    finally:
        open(os.path.join(marks, "reader-done"), "w").close()
        t.join(40)
    assert r.status_code == 200, r.text
    doc = r.json()
    for path in ("/tmp/report.txt", "/var/tmp/keep.txt", "/dev/shm/segment"):
        assert doc[path] == "FileNotFoundError", doc
    assert doc["listing"] == {"/tmp": ["report.txt"], "/var/tmp": ["report.txt"], "/dev/shm": ["report.txt"]} \
        or all("keep.txt" not in v and "segment" not in v for v in doc["listing"].values()), doc
    writer = box["r"]
    assert writer.status_code == 200 and "report.txt" in writer.json()["tmp"], writer.text
    # A later call (the writer's 0666 file was pre-created for it) starts with an empty /tmp again.
    later = srv.get("/function/reader").json()
    assert later["/tmp/report.txt"] == "FileNotFoundError", later


# -- finding 5: unix sockets -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_unix_sockets_reach_neither_another_call_nor_the_host(srv, marks):
    need(srv, "file_system_view", "network_namespace")
    host_sock = os.path.join("/tmp", f"fnbox-test-host-{uuid.uuid4().hex[:8]}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(host_sock)
    os.chmod(host_sock, 0o777)  # a world-writable host daemon socket
    listener.listen(4)
    listener.settimeout(0.01)
    t, box = in_background(lambda: srv.get("/function/sock_server", params={"marks": marks}, timeout=40))
    try:
        wait_for(os.path.join(marks, "sockets-ready"))
        r = srv.get("/function/sock_client", params={"host_sock": host_sock})
    finally:
        open(os.path.join(marks, "client-done"), "w").close()
        t.join(40)
        with pytest.raises(OSError):
            listener.accept()  # nobody connected to the host's socket
        listener.close()
        os.unlink(host_sock)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["path"] == "FileNotFoundError", doc  # another call's /tmp is not ours
    assert doc["abstract"] == "ConnectionRefusedError", doc  # another slot, another network namespace
    assert doc["host"] == "FileNotFoundError", doc
    assert doc["run_sockets"] == [], doc
    assert box["r"].status_code == 200 and box["r"].json()["accepted"] == 0, box["r"].text


# -- finding 6: the kernel keyring -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_keyring_is_denied(srv):
    need(srv, "syscall_filter")
    for _ in range(2):  # the second call would find what the first one left
        r = srv.get("/function/keyring")
        assert r.status_code == 200, r.text
        assert r.json() == {"add_key": "PermissionError", "search": "PermissionError"}, r.text


# -- finding 7: namespaces and the rest of the filter ---------------------------------------------------------
@pytest.mark.timeout(60)
def test_namespaces_and_dangerous_syscalls_fail_with_permission_error(srv):
    need(srv, "syscall_filter")
    r = srv.get("/function/syscalls")
    assert r.status_code == 200, r.text
    doc = r.json()
    allowed = {k: v for k, v in doc.items() if k not in ("fork", "thread", "subprocess") and v != "PermissionError"}
    assert not allowed, allowed
    assert doc["fork"] == 7 and doc["thread"] == ["ran"] and doc["subprocess"] == "sh ok\n", doc


# -- finding 8: CPU over forked children ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_cpu_s_counts_every_process_of_the_call(srv):
    need(srv, "cpu_cgroup")
    # 4 children x 0.8 s: each under RLIMIT_CPU (1 s), 3.2 s in all against cpu_s = 1.
    r = srv.get("/function/spread_cpu", params={"n": "4", "each": "0.8"})
    assert r.status_code == 504, r.text
    doc = r.json()
    assert doc["error"] == "timeout" and "CPU time limit" in doc["message"], doc
    rec = history(srv, r.headers["X-Request-Id"])
    assert rec["outcome"] == "timeout" and rec["cpu_ms"] >= 1000, rec


@pytest.mark.timeout(60)
def test_history_cpu_ms_is_the_trees(srv):
    need(srv, "cpu_cgroup")
    r = srv.get("/function/spread_cpu_ok", params={"n": "2", "each": "0.3"})
    assert r.status_code == 200, r.text
    assert r.json()["main_cpu"] < 0.3, r.text  # the main process itself used little
    rec = history(srv, r.headers["X-Request-Id"])
    assert rec["cpu_ms"] >= 600, rec


# -- finding 9: disk -------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", "/var/tmp"])
def test_max_disk_mb_caps_what_a_call_writes(srv, where):
    need(srv, "disk_quota")
    r = srv.get("/function/disk", params={"where": where})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["error"] == "ENOSPC", doc
    assert 4 <= doc["written_mb"] <= 8, doc  # max_disk_mb = 8
    assert srv.get("/function/hello").text == "Hello World!"


def test_max_disk_mb_is_validated(tmp_path):
    (tmp_path / "default.toml").write_text("max_disk_mb = 0\n")
    with pytest.raises(ProfileError) as e:
        load_profiles(str(tmp_path))
    assert e.value.key == "max_disk_mb" and "at least 1" in e.value.reason
    (tmp_path / "default.toml").write_text("max_disk_mb = 32\n")
    assert load_profiles(str(tmp_path)).profiles["default"].max_disk_mb == 32


# -- finding 10: what a call leaves behind ---------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_deep_trees_and_many_files_vanish_with_the_call(srv):
    need(srv, "file_system_view")
    r = srv.get("/function/litter", params={"files": "100000"}, timeout=60)
    ended = time.time()
    assert r.status_code == 200, r.text
    assert r.json() == {"depth": 3000, "files": 100000}, r.text
    assert srv.get("/function/hello", timeout=10).text == "Hello World!"
    assert_nothing_left(ended)


# -- network = true is egress, not the host --------------------------------------------------------------------
EGRESS = """
import socket
def main(request):
    out = {}
    for name in ("server", "host_side", "outside"):
        host, port = request.args[name].rsplit(":", 1)
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect((host, int(port)))
            out[name] = s.recv(100).decode() or "connected"
        except OSError as e:
            out[name] = type(e).__name__
        finally:
            s.close()
    return out
"""

OUTSIDE_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(4)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from outside")
    c.close()
"""


class Outside:
    """A stand-in for "the internet": a network namespace this test creates, joined to the host by a veth pair
    (10.231.N.1 on the host, 10.231.N.2 inside), with a tiny TCP server inside. Removed afterwards."""

    def __init__(self) -> None:
        n = os.getpid() % 250
        self.ns = f"fnbox-test-{os.getpid()}"
        self.host_if, self.ns_if = f"fnbt{n}h", f"fnbt{n}n"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Outside:
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                    ["ip", "link", "set", self.ns_if, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
                    ["ip", "link", "set", self.host_if, "up"],
                    ["ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
                    ["ip", "-n", self.ns, "link", "set", self.ns_if, "up"],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", OUTSIDE_SERVER,
                                      self.ns_ip], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


@pytest.mark.timeout(60)
def test_network_true_reaches_out_but_never_the_host(srv):
    need(srv, "network_egress")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is needed to make the test's own outside network")
    with Outside() as out:
        host_side = socket.socket()  # a host service on an address of this host (the test's veth end)
        host_side.bind((out.host_ip, 0))
        host_side.listen(4)
        host_side.settimeout(0.01)
        try:
            r = srv.get("/function/egress", params={"server": f"127.0.0.1:{srv.port}",
                                                    "host_side": f"{out.host_ip}:{host_side.getsockname()[1]}",
                                                    "outside": f"{out.ns_ip}:{out.port}"})
            with pytest.raises(OSError):
                host_side.accept()  # the refused connection never arrived
        finally:
            host_side.close()
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["outside"] == "hello from outside", doc  # egress works
    assert doc["server"] == "ConnectionRefusedError", doc  # Gunicorn's own port on 127.0.0.1
    assert doc["host_side"] == "ConnectionRefusedError", doc  # any other address of the host


def test_sandbox_off_turns_the_second_sandbox_off_and_says_so():
    """FNBOX_SANDBOX_OFF (the benchmark's with/without comparison) never leaves a layer reported active: the
    layers named are DEGRADED in /healthz, and a call then sees the host's files again."""
    off = "file_system_view,syscall_filter,cpu_cgroup,network_egress"
    srv = Server(functions={"look": "def main(request):\n    return open('/etc/hostname').read()\n"},
                 env={"FNBOX_SANDBOX_OFF": off}).start()
    try:
        sandbox = srv.get("/healthz").json()["sandbox"]
        for name in (*off.split(","), "own_processes", "disk_quota"):
            assert sandbox[name].startswith("DEGRADED"), (name, sandbox[name])
        assert sandbox["uid_pool"].startswith("active") or os.geteuid() != 0
        r = srv.get("/function/look")
        with open("/etc/hostname") as f:
            assert (r.status_code, r.text) == (200, f.read()), r.text
    finally:
        srv.stop()


def test_sandbox_off_names_only_optional_layers():
    from runner.config import ConfigError, Settings

    assert Settings.from_env({"FNBOX_SANDBOX_OFF": " syscall_filter , cpu_cgroup"}).sandbox_off == {
        "syscall_filter", "cpu_cgroup"}
    with pytest.raises(ConfigError, match="memory_cgroup"):
        Settings.from_env({"FNBOX_SANDBOX_OFF": "memory_cgroup"})
