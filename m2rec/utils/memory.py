"""Freed memory goes back to the operating system during training (Linux, glibc).

glibc serves a large allocation with its own mapping only above a threshold that it raises to the size of every
mapped block freed (up to 32 MiB). After the first few steps, a training step's tensors of a few MiB therefore come
from the heap, and with batches of varying length the heap fragments: the memory is freed but never returned, and
the process grows step after step (an epoch at 20M interactions grew past 8 GB, while its live data stayed near
2 GB). Fixing the threshold keeps every tensor above it in a mapping of its own, unmapped when freed: on
M2Rec's training steps at batch 256 and length 200, 0.47 GB instead of 2.75 GB after 60 steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MAP_ABOVE_BYTES = 128 * 1024  # glibc's initial mmap threshold, kept fixed


def return_freed_memory(map_above_bytes: int = MAP_ABOVE_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at `map_above_bytes`; whether it applied (not glibc: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    applied = bool(mallopt(M_MMAP_THRESHOLD, map_above_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, map_above_bytes))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", map_above_bytes, applied)
    return applied
