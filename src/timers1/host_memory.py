"""Keep freed host memory in the process instead of handing it back to the kernel every step.

A CPU training step allocates and frees hundreds of temporaries of 0.1-2 MiB (activations of
[batch, patches, hidden], expert blocks, the quantile loss's [B, J, N, Q, P] terms). glibc's
malloc serves blocks above its mmap threshold (128 KiB at start, adapting upward only to
blocks it has seen freed) with fresh ``mmap`` calls and returns the heap top past 128 KiB to
the kernel, so every step pays first-touch page faults on memory it used a moment ago: on this
project's 2-core machine ~3,500 faults and ~15% of a ``configs/small_cpu.yaml`` step, with
caches cold after each fault's zero-fill (``timers1 bench train`` measures the step).
Raising the mmap and trim thresholds (and padding heap growth) lets the heap keep what a step
freed for the next step; resident memory then stays at the step's high-water mark, which it
reaches every step anyway.

glibc only (Linux); elsewhere, when ``TIMERS1_KEEP_FREED_MEMORY=0``, when the user tuned malloc
already (``MALLOC_*_`` or ``GLIBC_TUNABLES``) or preloads another allocator (jemalloc, tcmalloc:
``LD_PRELOAD``), nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (malloc.h) and values. The mmap threshold is capped by glibc at 32 MiB
# on 64-bit; blocks above it (whole-model buffers) are rare and may keep their own mappings.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_BYTES = 32 << 20
_TRIM_THRESHOLD_BYTES = 1 << 30
_TOP_PAD_BYTES = 64 << 20

def _malloc_chosen_by_user() -> bool:
    env = os.environ
    return (any(k.startswith("MALLOC_") and k.endswith("_") for k in env) or "malloc" in env.get("GLIBC_TUNABLES", "")
            or any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")))


@functools.cache
def keep_freed_host_memory() -> bool:
    """Tune this process's malloc as the module docstring says (once per process); True if applied."""
    if os.environ.get("TIMERS1_KEEP_FREED_MEMORY", "1") == "0" or _malloc_chosen_by_user():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the platform's malloc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, _TOP_PAD_BYTES),
    ))
