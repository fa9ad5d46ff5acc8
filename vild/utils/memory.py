"""Giving memory back to the operating system after large short-lived structures (a dataset's json) are freed."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_memory() -> bool:
    """Collect garbage, then return free heap pages to the OS (glibc ``malloc_trim``); False where unavailable.

    Freed objects stay in the process's heap, and glibc hands back only its top: after an LVIS-sized json
    (4 GB of objects) is dropped, about 2 GB stayed resident in a rank without this call, 0.1 GB with it.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
