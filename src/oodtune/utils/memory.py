"""Keeping freed memory in the process (glibc malloc), so that the CPU loops do not page-fault on every step.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and hands it back with
``munmap`` when it is freed. A segmentation step at 480x360 allocates and frees dozens of such buffers (a batch of
8 x 12-channel logit maps is 66 MB; its gradients, the slices' zero-filled gradients, the softmax ...), so every
step touches fresh pages and the kernel zero-fills them one page fault at a time: with the default policy a
head-only PEBAL step on one core spent more time in page faults (``aten::fill_`` / ``copy_`` on new buffers) than
in arithmetic.

:func:`keep_freed_memory` switches glibc to serve every allocation from its heap (``M_MMAP_MAX = 0``) and to give
freed memory back to the system only when more than ``trim_threshold`` bytes are free at the heap's top
(``M_TRIM_THRESHOLD``), so a step reuses the pages of the step before. The arithmetic is unchanged (the same
operations in the same order: bit-identical results); the process's resident memory stays near its peak instead of
shrinking between steps. ``benchmarks/cpu_allocator.py`` measures the effect (1.57x on a head-only PEBAL step at
480x360 on one core of this project's CPU, 1.26x when the decoder trains).

The command line applies it to every command that computes (with ``--threads``); library users call it once at
start-up. ``OODTUNE_MALLOC=default`` leaves glibc's policy alone. Other C libraries (musl, macOS, Windows) are
left alone too: the function returns False.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["DEFAULT_TRIM_THRESHOLD", "keep_freed_memory", "restore_malloc_defaults"]

#: mallopt parameter numbers (glibc ``malloc.h``)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: glibc's defaults for them (``M_MMAP_MAX`` 65536 mappings; a 128 KiB trim threshold)
GLIBC_MMAP_MAX, GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024
#: Free memory above this many bytes at the heap's top goes back to the system.
DEFAULT_TRIM_THRESHOLD = 1 << 30


def _mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``mallopt``, or None on another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


def keep_freed_memory(trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Serve every allocation from glibc's heap and keep up to ``trim_threshold`` freed bytes there (module
    docstring). Returns whether the policy is now in effect (False under ``OODTUNE_MALLOC=default`` or another C
    library)."""
    if trim_threshold < 0:
        raise ValueError(f"trim_threshold must be >= 0 bytes, got {trim_threshold}")
    if os.environ.get("OODTUNE_MALLOC", "").strip().lower() == "default":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)))


def restore_malloc_defaults() -> bool:
    """Undo :func:`keep_freed_memory`: glibc's default mmap and trim values again (its dynamic adjustment of the
    thresholds stays off). Returns False off glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD))
