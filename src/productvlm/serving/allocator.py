"""glibc malloc settings for a server that runs for days.

Requests with photos of different sizes allocate tensors of ever different sizes from several threads
(the event loop, the generation thread, torch's). glibc gives each thread that contends for the heap
an arena of its own (up to 8 per core) and keeps the freed pieces of each, so the resident memory grew
by ~0.12 MB a request (issue 24). `bound_arenas` caps the arenas (as MALLOC_ARENA_MAX does, through
mallopt, before the server's threads start), and `Trim` hands the free pages inside the heap back to the
system (malloc_trim) every few batches. Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter numbers (malloc.h)
ARENAS = 2  # the event loop and the generation thread; 1 contends, glibc's default is 8 per core
TRIM_EVERY = 16  # batches between two malloc_trim(0) calls (a trim takes ~1 ms per 100 MB of heap)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    needed = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, f) for f in needed) else None


def bound_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX is set: the user's choice wins). Call it before
    threads start allocating. True when the cap is in place."""
    libc = glibc()
    if libc is None:
        return False
    if os.environ.get("MALLOC_ARENA_MAX"):
        return True
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


class Trim:
    """Called after every batch: malloc_trim(0) every `every` calls, on the thread that just generated."""

    def __init__(self, every: int = TRIM_EVERY):
        self.every, self.calls, self.trims = max(1, every), 0, 0

    def __call__(self) -> None:
        self.calls += 1
        libc = glibc()
        if libc is not None and self.calls % self.every == 0:
            libc.malloc_trim(0)
            self.trims += 1


__all__ = ["bound_arenas", "Trim", "glibc"]
