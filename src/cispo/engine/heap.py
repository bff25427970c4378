"""Giving freed heap memory back to the operating system (glibc's `malloc_trim` and `mallopt`).

glibc's malloc serves a freed block's memory to later allocations instead of unmapping it when
the block lies in a heap, i.e. when it was smaller than the mmap threshold at allocation time.
That threshold is dynamic: freeing a mapped block raises it to that block's size (up to 32 MiB
on 64-bit), so after the first few frees a training forward's activations (2-3 MB tensors for
SmolLM2-135M) all land in heaps and stay resident once the backward frees them. Each thread
that allocates gets its own arena (the client's training worker and the sampling caller are two),
and memory freed in one arena is not reused by the other. `man 3 mallopt`, `man 3 malloc_trim`.

- `trim_heap()`: `malloc_trim(0)`. Since glibc 2.8 it frees memory in all arenas and in all
  chunks with whole free pages (`man 3 malloc_trim`), not only the top of the main heap. Cost: a
  walk over the free chunks (a few ms), and each returned page is zero-filled again (a minor
  page fault) when an allocation reuses it: +20-29% faults, ~2% more CPU on the SmolLM2 step.
- `set_mmap_threshold(n)`: `mallopt(M_MMAP_THRESHOLD, n)`, process-wide and fixed (no more
  dynamic raise): every block of n bytes or more gets its own mapping, unmapped on free. Cost:
  zero-filled page faults on every re-allocation of such a block (docs/LOG.md, 2026-11-30 third
  entry: ~7% more CPU on the SmolLM2 step at 131072 during forward_backward only).

Both need glibc; elsewhere (macOS, musl, Windows) they do nothing and return False.

    trim_heap()                     # True on glibc
    set_mmap_threshold(128 * 1024)  # the in-process MALLOC_MMAP_THRESHOLD_=131072
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any, cast

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""

MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""The largest value glibc accepts for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)."""


def _glibc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """The C function `int name(argtypes...)` of the running glibc, or None when the C library
    is not glibc or lacks it."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        function: Any = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return cast(Callable[..., int], function)


def trim_heap() -> bool:
    """Return every whole free page of glibc's heaps to the OS (`malloc_trim(0)`); True when it
    ran (glibc), False where there is no malloc_trim (then nothing happens)."""
    trim = _glibc_function("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


def set_mmap_threshold(nbytes: int) -> bool:
    """Give every allocation of `nbytes` or more its own mapping, returned on free
    (`mallopt(M_MMAP_THRESHOLD, nbytes)`, the whole process, until changed). True when glibc
    accepted it; False where there is no mallopt. ValueError outside 0..MMAP_THRESHOLD_MAX."""
    if not 0 <= nbytes <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap threshold must be in 0..{MMAP_THRESHOLD_MAX} bytes, got {nbytes}")
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))
