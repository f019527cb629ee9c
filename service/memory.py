"""Handing freed memory back to the operating system after a large request.

glibc keeps freed heap memory in its per-thread arenas; after a large image decode (tens of MB on a decode
thread) or a multi-megabyte body, RSS stays at the high-water mark although nothing is in use, and with a
few decode threads that reads as growth. `malloc_trim(0)` returns the free pages. Elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

LARGE_BYTES = 4 * 1024 * 1024  # bodies and decoded rasters above this are worth a trim (it takes ~1 ms)


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)
