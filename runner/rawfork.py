"""fork() for the fork server's call processes, without the work CPython's os.fork() does in the child that a
single-threaded parent does not need.

os.fork() runs, in every child, the interpreter's after-fork reinitialisation (its locks, thread states) and the
Python hooks registered with os.register_at_fork: threading's (rebuilds its bookkeeping of every thread),
logging's (re-creates every handler's lock), random's (reseeds). In a forked copy of a warm interpreter every
object those touch costs a copy-on-write page fault, ~7-8 us each on the benchmark VM: measured, os.fork() +
os._exit() faults ~260 pages in the child and libc's fork() ~45 (bench/child_faults.py). ~1.5-2 ms of CPU per call.

All of that exists to repair what *other threads* held or changed at the moment of the fork. The fork server
is single-threaded (preload refuses a module that starts a thread, runner/preload.py), so the child's copy is
already consistent: the GIL is held by the forking thread (the call goes through ctypes.PyDLL, which keeps it),
no lock is held by a thread that does not exist in the child, and the main thread's ident is the same.
What a child does need is done here: random's generator is reseeded (otherwise every call would draw the same
numbers as its siblings).

raw fork is used only while it is safe: the process has exactly one thread, and nothing but the standard
library's known hooks (threading, logging, random, concurrent.futures) was registered with
os.register_at_fork (a preloaded library registering its own hook makes every later fork a plain os.fork()).
FNBOX_RAW_FORK=0 turns it off (docs/operators.md).
"""

from __future__ import annotations

import ctypes
import os
import random

# PyDLL: the GIL stays held across the call, so the child's copy of it is consistent.
_libc = ctypes.PyDLL(None, use_errno=True)
_fork = _libc.fork
_fork.restype = ctypes.c_int
_fork.argtypes = []

_foreign_hooks: list[str] = []
_register_at_fork = os.register_at_fork


def _recording_register_at_fork(**hooks: object) -> None:
    """os.register_at_fork, noting that a hook raw fork would not run now exists."""
    _foreign_hooks.append(", ".join(f"{k}={v!r}" for k, v in hooks.items()))
    _register_at_fork(**hooks)


def install(enabled: bool = True) -> None:
    """In the fork server, before anything but the runner is imported: from now on every os.register_at_fork
    is noted (and raw fork then steps aside). enabled=False: fork() is always os.fork()."""
    global _enabled
    _enabled = enabled
    os.register_at_fork = _recording_register_at_fork  # type: ignore[assignment]


_enabled = False


def usable() -> bool:
    """Whether fork() may skip CPython's after-fork work right now."""
    if not _enabled or _foreign_hooks:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork() -> int:
    """os.fork(), without the after-fork work a single-threaded parent does not need when that is safe."""
    if not usable():
        return os.fork()
    pid = _fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    if pid == 0:
        random.seed()  # random's own after-fork hook: siblings must not share a generator state
    return pid
