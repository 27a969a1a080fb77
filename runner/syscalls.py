"""The syscall filter: what a call may not ask the kernel, built with libseccomp (through pyseccomp).

Allow by default, deny a list (as Docker's default profile and nsjail do, for what a function never needs):
namespaces and mounts (the sandbox's own walls), tracing and other processes' memory, the kernel keyring,
eBPF, perf, userfaultfd, io_uring (its own syscall path around this filter), kernel modules, kexec, reboot,
swap, accounting, raw I/O ports, file handles (open_by_handle_at walks out of any mount), clock and host name
changes, and the rest of Docker's list. A denied call fails with EPERM: the function gets a PermissionError
and goes on; nothing is killed. clone3() passes its flags in memory, which a filter cannot read, so it fails
with ENOSYS (glibc then falls back to clone(), whose flags are checked: no namespace flag).

libseccomp compiles the filter to BPF once, in the fork server (build()); each call only loads that program
(load(): one prctl, a few microseconds), after no_new_privs, as the last step before user code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import tempfile

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Flags of clone()/unshare() that make a namespace.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                   | CLONE_NEWNET | CLONE_NEWTIME)

DENIED = (
    # the sandbox's own walls: namespaces and mounts
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    # other processes, the kernel's memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # state that outlives the call (the keyring is per uid, and slot uids are reused)
    "keyctl", "add_key", "request_key",
    # kernel attack surface a function never needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff", "acct", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "quotactl", "quotactl_fd", "nfsservctl",
    "uselib", "ustat", "sysfs", "_sysctl", "vhangup", "syslog", "fanotify_init",
    # the host's identity and clocks
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    # NUMA placement (Docker allows it only with CAP_SYS_NICE)
    "mbind", "set_mempolicy", "migrate_pages", "move_pages",
)


class SeccompUnavailable(RuntimeError):
    """libseccomp or its Python binding is missing: the filter layer is DEGRADED."""


def build() -> bytes:
    """The filter as a BPF program (struct sock_filter[]), compiled by libseccomp."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:  # the binding loads libseccomp.so.2 when imported
        raise SeccompUnavailable(f"pyseccomp/libseccomp not available: {e}") from None
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            pass  # not a syscall on this architecture
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # clone(flags, ...) on x86_64: flags is the first argument; one rule per flag (any of them is denied).
    for flag in (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                 CLONE_NEWNET, CLONE_NEWTIME):
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class Program:
    """A compiled filter kept in memory (in the fork server, inherited by every child)."""

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % 8:
            raise ValueError("not a BPF program")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buf))

    def load(self) -> None:
        """Installs the filter on this process (and every process it starts afterwards). Needs no_new_privs
        (or CAP_SYS_ADMIN)."""
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot load the syscall filter: {os.strerror(e)}")


@functools.cache
def compile_program() -> Program | None:
    """The filter, or None when libseccomp is unavailable (the layer is then reported DEGRADED). Compiled once
    per process (the probe and the slot pool share it)."""
    try:
        return Program(build())
    except (SeccompUnavailable, OSError, ValueError, RuntimeError):
        return None
