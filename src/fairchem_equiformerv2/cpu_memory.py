"""Keeping freed CPU memory in the process for reuse (glibc's malloc).

A step of the model allocates and frees tensors of tens to hundreds of MB many times (edge messages
``[E, K, 2C]`` are 30 MB for two 38-atom slabs at lmax 4, 300 MB for one of 786 atoms). glibc serves
blocks above its (adaptive, at most 32 MB) mmap threshold with fresh pages from the kernel, and returns
the top of its heap to the kernel whenever more than a trim threshold is free; every fresh 4 KB page
then costs a page fault on first touch. Measured here (31M shape, 2 cores): 0.86 GB (~0.7 CPU-seconds
of kernel time) per inference step of two 38-atom slabs with glibc's defaults; 11-12 GB (4.4 s of an
8.8 s step) per inference step of a 786-atom slab with the mmap threshold fixed at 32 MB.

:func:`keep_freed_memory` turns mmap off (every block comes from the heap) and heap trimming off:
freed blocks are reused by the next step, and a step page-faults only where the heap grows. 31M,
786 atoms, inference: 8.8 -> 6.0 s; training, 402 atoms: 9.5 -> 9.1 s. The price is fragmentation:
with batches of changing sizes a freed large block is partly reused for smaller ones, and the heap
grows a little before it levels off (31M training, 50 batches of 2-4 slabs of 26-58 atoms: peak RSS
3.53 -> 4.11 GB, reached after 22 batches; inference of 30 slabs of 200-800 atoms: 2.89 -> 3.63 GB,
after 9). Freed memory is not returned to the OS until the process ends.

It is applied once, the first time a backbone runs on the CPU (a process-wide setting, like the
``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` environment variables it stands for);
``EQUIFORMERV2_KEEP_FREED_MEMORY=0`` turns it off and leaves glibc's settings, and those variables
(mallopt(3)), alone: with it, ``MALLOC_MMAP_THRESHOLD_=33554432`` and a large
``MALLOC_TRIM_THRESHOLD_`` give the previous setting (mmap above 32 MB: less fragmentation, page
faults for large systems). It does nothing off glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

ENV_VARIABLE = "EQUIFORMERV2_KEEP_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_in_effect: bool | None = None


def keep_freed_memory() -> bool:
    """Turns glibc's mmap and heap trimming off, once per process.

    Returns whether the setting is in effect: False off glibc, when ``mallopt`` refuses, or when
    ``EQUIFORMERV2_KEEP_FREED_MEMORY=0``.
    """
    global _in_effect
    if _in_effect is None:
        _in_effect = os.environ.get(ENV_VARIABLE, "1") != "0" and _set_glibc_malloc_options()
    return _in_effect


def _set_glibc_malloc_options() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; at most 0 mmapped blocks, and a trim threshold of -1 (the largest
    # size_t) turns trimming off (mallopt(3))
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if done:
        logging.getLogger(__name__).info("glibc malloc keeps freed memory for reuse (%s=0 turns this off)", ENV_VARIABLE)
    return done
