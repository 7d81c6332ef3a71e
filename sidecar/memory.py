"""Giving memory back to the system after a burst (docs/reference.md#memory).

A thousand streams at once leave their buffers' memory free but still held by the C
allocator, so the process stays as large as at the peak. Once such a burst is over
(`sidecar.inflight`), glibc's `malloc_trim` hands the free pages back. Where there is no
glibc (musl), nothing is done.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The process's own symbols: libc is loaded already, and no `ldconfig -p` is run.
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def give_back() -> bool:
    """Return the allocator's free pages to the system; False where that cannot be done."""
    gc.collect()  # a burst's connections lived long enough to reach the oldest generation
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
