"""The process's heap under glibc: fewer malloc arenas, and freed render buffers given back to the OS.

Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import os
import threading


def _load_malloc_trim():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_malloc_trim = _load_malloc_trim()
_trim_lock = threading.Lock()


def tune_malloc(arenas: int = 2) -> None:
    """Limit glibc to ``arenas`` malloc arenas (unless MALLOC_ARENA_MAX is set).

    A threaded server otherwise gets up to 8 arenas per core, one per busy thread, each keeping
    the frame buffers it once held: the process stays far above its idle size after a burst.
    Called by the entry points (``python app.py``, gunicorn workers), not by ``create_app``."""
    if _malloc_trim is None or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def release_memory(wait: bool = False) -> None:
    """Give the memory freed by a finished render back to the OS.

    A render allocates and frees hundreds of MB of frame buffers; glibc keeps freed memory in its
    heaps (and raises its mmap threshold), so without this the process stays at its peak size
    long after the load is gone. ``malloc_trim(0)`` returns every free page; it takes about a
    millisecond. The server calls it after renders and jobs, the service after avatar decodes;
    a call while another trim runs returns at once, unless ``wait`` (a measurement that needs
    the trim done: it trims again after the other one)."""
    if _malloc_trim is not None and _trim_lock.acquire(blocking=wait):
        try:
            _malloc_trim(0)
        finally:
            _trim_lock.release()
