"""glibc malloc settings for the long-running daemon (peak RSS while streaming big NARs).

A cold NAR passes through ~0.5-1 MiB ``bytes`` buffers allocated in worker threads and freed on
the event loop thread (or the other way round).  With glibc's defaults every thread that
allocates gets an arena of its own (up to 8 per core), a freed buffer goes back to the arena it
came from, and the dynamic mmap threshold soon rises above the buffer size: the buffers then
live in several arenas whose free space stays resident and is not shared (~20 MiB of free heap
while a 1 GiB NAR streamed).  One arena and a fixed mmap threshold above the buffer size keep
the reuse in one heap; a fixed threshold also stops one big buffer (a spooled NAR of tens of
MiB) from raising the threshold and the trim threshold for good.

Only glibc is touched (musl and others: nothing happens); a variable the user set in the
environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
``GLIBC_TUNABLES``) wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

log = logging.getLogger("substituter.memory")

#: mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: One arena: the GIL serialises most allocation anyway, and big buffers freed by another thread
#: are then reusable by every thread.
ARENA_MAX = 1
#: Above the pipeline's buffers (about 1 MiB at most), so they are reused from the heap instead
#: of being mapped and faulted in afresh each time; fixing it also stops glibc's dynamic raise.
MMAP_THRESHOLD = 2 << 20
#: Fixing the mmap threshold also fixes the trim threshold (glibc's default 128 KiB): the heap's
#: top would be returned and faulted in again for every few buffers.  Twice the mmap threshold,
#: as glibc's own dynamic rule would set it (page faults as without the settings).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def tune_malloc(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply the settings above; returns those applied (name -> value), empty when none was."""
    env = os.environ if environ is None else environ
    if not _is_glibc() or "GLIBC_TUNABLES" in env:
        return {}
    mallopt = _mallopt()
    if mallopt is None:
        return {}
    applied: dict[str, int] = {}
    for name, param, value in (
        ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
        ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        if name in env:
            continue
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            applied[name] = value
        else:
            log.debug("mallopt(%d, %d) refused", param, value)
    log.debug("malloc settings: %s", applied or "unchanged")
    return applied


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a GNU libc
        return False


def _mallopt() -> Callable[[int, int], int] | None:
    import ctypes

    try:
        func = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int]
    func.restype = ctypes.c_int
    return func
