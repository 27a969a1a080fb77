"""The C heap (glibc malloc) of fnbox's long-lived processes: give freed pages back before forking, and bound
the arenas a multi-threaded worker keeps. Elsewhere than glibc both do nothing."""

from __future__ import annotations

import ctypes

_M_ARENA_MAX = -8  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def trim() -> None:
    """malloc_trim(0): every free page of the C heap back to the kernel (Python's object arenas are not
    affected), so that neither this process nor any child forked from it holds them."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _mallopt(param: int, value: int) -> bool:
    """Whether the C library took mallopt(param, value) (glibc only)."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(param, value))


def limit_arenas(arenas: int) -> bool:
    """mallopt(M_ARENA_MAX, arenas), before any thread exists; whether the C library took it."""
    return _mallopt(_M_ARENA_MAX, arenas)


def mmap_threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes): blocks of this size and more get their own mapping, returned to the
    kernel when freed. glibc's threshold starts at 128 KiB and rises to the largest block freed, after which
    big request and response buffers come from the heap and stay there once freed; whether it took it."""
    return _mallopt(_M_MMAP_THRESHOLD, nbytes)
