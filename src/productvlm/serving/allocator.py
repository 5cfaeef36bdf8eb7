"""glibc malloc settings for a server that runs for days.

Requests with photos of different sizes allocate tensors of ever different sizes from several threads
(the event loop, the generation thread, torch's). glibc serves a freed large block's size from the heap
from then on (its mmap threshold follows the largest block freed, up to 32 MB), gives each thread that
contends for the heap an arena of its own (up to 8 per core), and keeps the freed pieces of each: the
resident memory grew by ~0.12 MB a request (issue 24). `bound_malloc`, at server start, fixes the mmap
threshold (blocks above it are mapped and unmapped on their own, so they never fragment the heap) and
caps the arenas, as MALLOC_MMAP_THRESHOLD_ and MALLOC_ARENA_MAX would; `Trim` hands the free pages inside
the heap back to the system (malloc_trim) every few batches. Elsewhere than glibc (musl, macOS) they do
nothing. README, Serve, has the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameter numbers (malloc.h), and the environment variables that set the same
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
SETTINGS = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_ARENA_MAX: "MALLOC_ARENA_MAX"}
MMAP_THRESHOLD = 1024 * 1024  # fixed: glibc starts at 128 KiB and raises it to the largest block freed
ARENAS = 2  # the event loop and the generation thread; glibc's default is 8 per core
TRIM_EVERY = 16  # batches between two malloc_trim(0) calls


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


def bound_malloc(mmap_threshold: int = MMAP_THRESHOLD, arenas: int = ARENAS) -> bool:
    """Fix glibc's mmap threshold and cap its arenas (a value set in the environment stands: the user's
    choice). Call it before the server's threads start. True when the settings are in place."""
    libc = glibc()
    if libc is None:
        return False
    wanted = {M_MMAP_THRESHOLD: mmap_threshold, M_ARENA_MAX: arenas}
    done = [bool(os.environ.get(SETTINGS[p])) or libc.mallopt(p, value) == 1 for p, value in wanted.items()]
    return all(done)


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


__all__ = ["bound_malloc", "Trim", "glibc"]
