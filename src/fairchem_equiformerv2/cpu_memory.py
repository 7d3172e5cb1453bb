"""Keeping freed CPU memory in the process for reuse (glibc's malloc).

A step of the model allocates and frees tensors of tens of MB many times (edge messages
``[E, (lmax+1)**2, 2C]`` are 39 MB for two 38-atom slabs at lmax 4). glibc serves blocks above its
(adaptive) mmap threshold with fresh pages from the kernel, and returns the top of its heap to the
kernel whenever more than a trim threshold is free; every fresh 4 KB page then costs a page fault on
first touch. Measured here (31M shape, 2 cores): 0.4-0.6 GB of page faults per training step,
0.86 GB (~0.7 CPU-seconds of kernel time) per inference step.

:func:`keep_freed_memory` fixes the mmap threshold at glibc's largest, 32 MB, and turns heap trimming
off: blocks up to 32 MB come from the heap and freed ones are reused by the next step; only larger
ones still get fresh pages (the edge rotations work in blocks to stay below it: ``nn/scatter.py``).
Peak memory stays flat over steps (83M training: 3.35 GB each step, 3.25 GB with the blocked
rotations). Turning mmap off altogether would remove those faults too, but fragments the heap:
the 83M training peak then grew 3.38 -> 3.75 GB over three steps. Freed memory is not returned to
the OS until the process ends.

It is applied once, the first time a backbone runs on the CPU (a process-wide setting, like the
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` environment variables it stands for);
``EQUIFORMERV2_KEEP_FREED_MEMORY=0`` turns it off. It does nothing off glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

ENV_VARIABLE = "EQUIFORMERV2_KEEP_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit systems

_in_effect: bool | None = None


def keep_freed_memory() -> bool:
    """Fixes glibc's mmap threshold at 32 MB and turns its heap trimming off, once per process.

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
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (mallopt(3))
    done = mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if done:
        logging.getLogger(__name__).info("glibc malloc keeps freed memory for reuse (%s=0 turns this off)", ENV_VARIABLE)
    return done
