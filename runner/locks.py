"""Numbered places claimed across processes: one lock file, one byte-range lock per place.

Open file description locks (F_OFD_SETLK) are like flock(): owned by the open file, released by the kernel
when the last fd to it closes (a holder that dies, kill -9 included, never leaks a place), and inherited by
forked children that keep the fd. Unlike flock() they cover a byte range, so one file holds any number of
places (a sandbox slot's lock is the byte at offset uid), and the file never grows: locks past the end of a
file are fine. Both the machine-wide slot registry and the gateway's admission caps use this class.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (64-bit off_t, also with
# F_OFD_* on 32-bit ABIs); native alignment, padded to its C size.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32


def _flock(kind: int, start: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0).ljust(_FLOCK_SIZE, b"\0")


class LockTable:
    """Places 0.. of one lock file. try_claim() never blocks. Thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A lock our own open file already holds is granted again: the places we hold are remembered here.
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def try_claim(self, place: int) -> bool:
        with self._lock:
            if place in self._held:
                return False
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, place))
            except OSError:  # EAGAIN/EACCES: someone else holds it
                return False
            self._held.add(place)
            return True

    def finishing(self, place: int) -> None:
        """Marks a held place as held by a call that has answered and is ending: its write lock becomes a read
        lock. Others still cannot claim it, but waiting_for_end() tells them it is about to be free."""
        with self._lock:
            if place in self._held:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, place))

    def any_finishing(self, places: range) -> bool:
        """Whether some place is held (by another open file) by a call that has answered and is ending."""
        for place in places:
            got = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, place))
            if _FLOCK.unpack(got[:_FLOCK.size])[0] == fcntl.F_RDLCK:
                return True
        return False

    def release(self, place: int) -> None:
        with self._lock:
            if place not in self._held:
                return
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, place))
            self._held.discard(place)

    def held(self, place: int) -> bool:
        return place in self._held

    def close(self) -> None:
        """Releases every place (in this process; a forked child that closes its copy releases nothing)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._held.clear()
