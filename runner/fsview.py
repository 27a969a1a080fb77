"""A call's own file system view: a mount namespace built for it, not carved out of the host's.

Once per fork server, a helper process builds the *skeleton*: a mount namespace whose root
is a small read-only tmpfs holding

  /usr, /bin, /lib*         the host's, read-only (the interpreter, its shared libraries, /bin/sh)
  <python prefixes>         the interpreter's and the venv's trees, read-only, at their own paths
  <data>/deps               the function dependencies folder, read-only (when FNBOX_DATA_DIR has one)
  /etc                      a minimal one: passwd/group with the sandbox uids, hosts, resolv.conf, nsswitch.conf,
                            and the host's ld.so.cache, localtime and ssl/certs (read-only)
  /dev                      null, zero, full, random, urandom; fd/stdin/stdout/stderr links; shm -> /tmp
  /proc                     a procfs of its own mounted with hidepid=invisible: a call sees its own processes
  /sys/fs/cgroup/...        empty mount points for the slot cgroups (each call binds its own slot's folders)
  /tmp                      an empty mount point; /var/tmp and /run/lock are links to /tmp
  <functions dir>           an empty mount point

The fork server keeps an fd on that namespace (shared by its slots). Per call, the child enters
it with setns(), copies it with unshare(CLONE_NEWNS) (its mounts are then the call's alone and die with the
call's last process), and mounts

  /tmp                      a fresh tmpfs of max_disk_mb (cwd, HOME, TMPDIR; /dev/shm and /var/tmp point here),
                            charged to the call's memory cgroup, dropped by the kernel with the namespace
  <functions dir>           a tiny read-only tmpfs holding bind mounts of exactly this function (its file or its
                            package, a deployed package resolved to its version folder), the package's
                            __init__.py and the private helpers (names starting with "_")

Nothing else of the host is reachable: not the project tree, the profiles, the history, other versions, the
state folder, other functions, /home, /root, /var, /sys, or any socket under /run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
SYS_PIVOT_ROOT = 155  # x86_64
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


_RO_ATTR = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)

SHARED = "/.shared"
DEVICES = ("null", "zero", "full", "random", "urandom")
TMP = "/tmp"


def under_tmp(path: str) -> bool:
    return path == TMP or path.startswith(TMP + "/")


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                   flags, data.encode() if data else None) != 0:
        raise _err(f"mount {target}")


def bind_ro(source: str, target: str, extra: int = 0) -> None:
    """A read-only bind mount: the bind, then its remount (a bind ignores MS_RDONLY on its first call)."""
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | extra)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise _err("setns")


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise _err("unshare")


@dataclass(frozen=True)
class ViewSpec:
    """What the skeleton holds, from the server's settings."""

    functions_dir: str
    ro_trees: tuple[str, ...]  # host folders bound read-only at their own paths (python prefixes, deps)
    uid_base: int  # the server's sandbox uids uid_base .. uid_base + slots - 1 get a name in /etc/passwd
    slots: int
    # Every slot's cgroup folders: the skeleton has an empty mount point for each, and each call binds its own
    # slot's there (cgroup_trees(), enter()).
    cgroup_dirs: tuple[str, ...] = ()
    shared_dirs: tuple[str, ...] = ()  # host folders every call sees read-write (FNBOX_SANDBOX_SHARED_DIRS)
    etc_files: tuple[str, ...] = field(default=("ld.so.cache", "localtime", "ssl/certs", "mime.types",
                                                "protocols", "services", "resolv.conf"))


def runtime_trees(data_dir: str) -> tuple[str, ...]:
    """The interpreter's and the venv's folders (outside /usr they must be bound on their own), and the deps
    folder of FNBOX_DATA_DIR, made if missing so that dependencies installed later appear in running views."""
    trees = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        real = os.path.realpath(p)
        if not real.startswith("/usr/") and real != "/usr":
            trees.append(real)
    deps = os.path.join(data_dir, "deps")
    try:
        os.makedirs(deps, mode=0o755, exist_ok=True)
        trees.append(os.path.realpath(deps))
    except OSError:
        pass
    out: list[str] = []
    for t in sorted(set(trees), key=len):  # a tree inside another one is already there
        if not any(t == o or t.startswith(o + "/") for o in out):
            out.append(t)
    return tuple(out)


def _mkdirs(root: str, path: str, mode: int = 0o755) -> str:
    target = os.path.join(root, path.lstrip("/"))
    os.makedirs(target, mode=mode, exist_ok=True)
    return target


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _bind_at_same_path(root: str, source: str, ro: bool) -> None:
    st = os.stat(source)
    target = os.path.join(root, source.lstrip("/"))
    if stat.S_ISDIR(st.st_mode):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        _touch(target)
    if ro:
        bind_ro(source, target)
    else:
        mount(source, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)


def _build(spec: ViewSpec, root: str) -> None:
    """In a fresh mount namespace (of a helper process): builds the skeleton at `root` and pivots into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("fnbox-view", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for top in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + top
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, top))
        elif os.path.isdir(host):
            os.mkdir(os.path.join(root, top), 0o755)
            bind_ro(host, os.path.join(root, top))
    for tree in spec.ro_trees:
        if os.path.isdir(tree):
            _bind_at_same_path(root, tree, ro=True)
    # /etc: a minimal one. The sandbox uids have a name (getpass.getuser(), ~ expansion); no host user is there.
    etc = _mkdirs(root, "/etc")
    users = "".join(f"fnbox-{u}:x:{u}:{u}:fnbox call:/tmp:/usr/sbin/nologin\n"
                    for u in range(spec.uid_base, spec.uid_base + spec.slots))
    groups = "".join(f"fnbox-{u}:x:{u}:\n" for u in range(spec.uid_base, spec.uid_base + spec.slots))
    _write(os.path.join(etc, "passwd"), "root:x:0:0:root:/root:/usr/sbin/nologin\n" + users
           + "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    _write(os.path.join(etc, "group"), "root:x:0:\n" + groups + "nogroup:x:65534:\n")
    _write(os.path.join(etc, "hosts"), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(os.path.join(etc, "nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files dns\n")
    for name in spec.etc_files:
        host = os.path.join("/etc", name)
        try:
            if os.path.islink(host):  # /etc/localtime -> /usr/share/zoneinfo/...: the same link
                os.makedirs(os.path.dirname(os.path.join(etc, name)), mode=0o755, exist_ok=True)
                os.symlink(os.readlink(host), os.path.join(etc, name))
            elif os.path.exists(host):
                _bind_at_same_path(root, host, ro=True)
        except OSError:
            pass
    dev = _mkdirs(root, "/dev")
    for name in DEVICES:
        _touch(os.path.join(dev, name))
        mount(os.path.join("/dev", name), os.path.join(dev, name), None, MS_BIND)
        mount(None, os.path.join(dev, name), None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", TMP)):
        os.symlink(target, os.path.join(dev, name))
    proc = _mkdirs(root, "/proc", 0o555)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    for d in spec.cgroup_dirs:
        _mkdirs(root, d)
    _mkdirs(root, TMP, 0o1777)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    _mkdirs(root, "/var")
    os.symlink(TMP, os.path.join(root, "var", "tmp"))
    _mkdirs(root, "/run")
    os.symlink(TMP, os.path.join(root, "run", "lock"))
    if not under_tmp(spec.functions_dir):
        _mkdirs(root, spec.functions_dir)
    # Shared folders are staged under /.shared/<i>; enter() binds each at its own path (inside the call's
    # fresh /tmp when it is there).
    for i, d in enumerate(spec.shared_dirs):
        if os.path.isdir(d):
            target = _mkdirs(root, f"{SHARED}/{i}")
            mount(d, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)
    # pivot_root(".", "."): the old root ends up stacked on the new one, then is detached; nothing of the host
    # stays reachable from this namespace, not even through "..".
    os.chdir(root)
    if _libc.syscall(SYS_PIVOT_ROOT, b".", b".") != 0:
        raise _err("pivot_root")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        raise _err("umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build(spec: ViewSpec, staging: str) -> int:
    """Builds the skeleton in a helper process; returns an fd that holds its mount namespace."""
    os.makedirs(staging, mode=0o700, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _unshare(CLONE_NEWNS)
            _build(spec, staging)
            os.write(w, b"x")
            code = 0
            time.sleep(5)  # bounded: the parent SIGKILLs it as soon as it holds the namespace
        except BaseException as e:
            try:
                os.write(w, f"e{e}".encode()[:4000])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        answer = os.read(r, 4096)
        if answer != b"x":
            raise OSError(f"cannot build the file system view: {answer[1:].decode(errors='replace') or 'died'}")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class fs_identity:
    """Host-side reads of the function's files with the call's own file system uid/gid (setfsuid/setfsgid, no
    supplementary group): they succeed only where the call's uid could read, as without a view. The process
    keeps its other privileges (CAP_SYS_ADMIN for open_tree) and gets uid 0's file access back afterwards."""

    def __init__(self, uid: int | None, gid: int | None) -> None:
        self.uid, self.gid = uid, gid

    def __enter__(self) -> None:
        if self.uid is not None:
            os.setgroups([])
            _libc.setfsgid(self.gid)
            _libc.setfsuid(self.uid)

    def __exit__(self, *exc: object) -> None:
        if self.uid is not None:
            _libc.setfsuid(0)
            _libc.setfsgid(0)


def prewarm(functions_dir: str) -> None:
    """Runs the host-side half of entering a view once, harmlessly, in a spare waiting for its call: the
    copy-on-write faults of this code path (a few hundred microseconds in a fresh fork) are then paid off the
    request path."""
    function_sources(functions_dir, "")
    clone_sources([])
    try:
        mount(None, "/nonexistent-fnbox-prewarm", None, MS_BIND)
    except OSError:
        pass
    try:
        _setns(-1, CLONE_NEWNS)
    except OSError:
        pass
    under_tmp(functions_dir)


def function_sources(functions_dir: str, name: str) -> list[tuple[str, str]]:
    """(host path, name in the view) of what a call of `name` sees in its functions folder: the package's
    __init__.py, the function (file and/or package; a deployed package's symlink resolved to its version
    folder) and the private helpers (`_*`). Read on the host side, before entering the view."""
    out = []
    try:
        entries = os.listdir(functions_dir)
    except OSError:
        return out
    for entry in entries:
        if entry == "__init__.py" or entry in (name, name + ".py") or (
                entry.startswith("_") and not entry.startswith("__") and
                (entry.endswith(".py") or entry[1:].isidentifier())):
            out.append((os.path.join(functions_dir, entry), entry))  # clone_sources() follows a symlink
    return out


COPY_MAX = 1 << 20  # a module file up to this size is copied into the view, a bigger one is bound


def clone_sources(sources: Iterable[tuple[str, str]]) -> list[tuple[int | bytes, str, bool]]:
    """What enter() puts in the view's functions folder, taken on the host side: a file's bytes (a module is
    small, and a copy cannot be swapped under the call by a deploy's rename, which would leave a bind mount's
    source deleted), or a detached read-only copy of a folder (open_tree(OPEN_TREE_CLONE): a bind mount's
    source must be in the caller's namespace, a detached mount can be attached in another one after setns())."""
    out: list[tuple[int | bytes, str, bool]] = []
    for path, name in sources:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size <= COPY_MAX:
                chunks = []
                while chunk := os.read(fd, COPY_MAX + 1):
                    chunks.append(chunk)
                out.append((b"".join(chunks), name, False))
                continue
            tree = _libc.syscall(SYS_OPEN_TREE, fd, b"", OPEN_TREE_CLONE | AT_EMPTY_PATH | os.O_CLOEXEC)
            if tree < 0:
                raise _err(f"open_tree {path}")
        finally:
            os.close(fd)
        if _libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(_RO_ATTR),
                         ctypes.sizeof(_RO_ATTR)) != 0:
            os.close(tree)
            raise _err(f"mount_setattr {path}")
        out.append((tree, name, stat.S_ISDIR(st.st_mode)))
    return out


def cgroup_trees(dirs: Iterable[str]) -> list[tuple[int, str]]:
    """Detached copies of the slot's own cgroup folders, taken on the host side (in prepare(), so a spare pays
    it ahead): a call may read its limits and usage there, never its siblings'. Their files stay root's."""
    out = []
    for d in dirs:
        tree = _libc.syscall(SYS_OPEN_TREE, -100, d.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
        if tree < 0:
            raise _err(f"open_tree {d}")
        out.append((tree, d))
    return out


def enter(ns_fd: int, functions_dir: str, sources: list[tuple[int | bytes, str, bool]], disk_mb: int,
          shared_dirs: tuple[str, ...] = (), cgroups: list[tuple[int, str]] | None = None) -> None:
    """Per call, as root, in the forked child: the skeleton, copied for this call, with its own /tmp, exactly
    its own function and its own slot's cgroup folders. Ends in /tmp."""
    _setns(ns_fd, CLONE_NEWNS)
    _unshare(CLONE_NEWNS)
    mount("fnbox-tmp", TMP, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=1777")
    for i, d in enumerate(shared_dirs):
        if under_tmp(d):  # root's folders in a sticky /tmp: the call can neither remove nor rename them
            os.makedirs(d, mode=0o755, exist_ok=True)
            mount(f"{SHARED}/{i}", d, None, MS_BIND | MS_REC)
    if under_tmp(functions_dir):
        os.makedirs(functions_dir, mode=0o755, exist_ok=True)
    mount("fnbox-fn", functions_dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,nr_inodes=1024,mode=0755")
    for src, name, is_dir in sources:
        target = os.path.join(functions_dir, name)
        if isinstance(src, bytes):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, src)
            finally:
                os.close(fd)
            continue
        if is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        # ENOENT: the source was deleted meanwhile (a pruned version): the function is then simply not there.
        if _libc.syscall(SYS_MOVE_MOUNT, src, b"", -100, target.encode(), MOVE_MOUNT_F_EMPTY_PATH) != 0 and \
                ctypes.get_errno() != 2:
            raise _err(f"move_mount {target}")
        os.close(src)
    mount(None, functions_dir, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for tree, path in cgroups or ():
        if _libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, path.encode(), MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise _err(f"move_mount {path}")
        os.close(tree)
    os.chdir(TMP)
