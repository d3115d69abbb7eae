"""Giving freed memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

logger = logging.getLogger("llmprod")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None  # glibc only


def release_freed_memory() -> bool:
    """Collect garbage, then ask glibc to return free heap pages to the OS
    (``malloc_trim``): a closed engine's weights and KV cache otherwise stay in
    the process's resident memory. Returns False where there is no glibc."""
    gc.collect()
    return trim_heap()


def trim_heap() -> bool:
    """``malloc_trim`` alone (no garbage collection): cheap enough to call after
    each layer a loader swaps, whose freed temporaries glibc's heap would
    otherwise keep. Returns False where there is no glibc."""
    lib = _libc()
    if lib is None:
        return False
    try:
        lib.malloc_trim(0)
    except OSError as exc:  # pragma: no cover - libc refused
        logger.debug("malloc_trim failed: %r", exc)
        return False
    return True
