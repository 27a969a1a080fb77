"""The self-pipe of a single-threaded process loop (the fork server, the zygote): every signal, SIGCHLD above
all, writes a byte to it, so the loop's selector wakes up to reap instead of polling."""

from __future__ import annotations

import os
import signal


def install() -> tuple[int, int]:
    """A non-blocking pipe that Python's signal handling writes to, and a SIGCHLD handler (the default ignores
    the signal, and an ignored signal writes nothing); (read end, write end)."""
    r, w = os.pipe()
    for fd in (r, w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    return r, w


def drain(fd: int) -> None:
    """Empties the read end once the selector reported it (what woke the loop is found by reaping)."""
    try:
        os.read(fd, 4096)
    except BlockingIOError:
        pass


def uninstall() -> None:
    """In a child forked from such a loop: no wake-up writes, SIGCHLD back to its default."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
