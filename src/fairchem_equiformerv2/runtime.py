"""The process-wide choices that make the model fast on this machine, made by one call: :func:`configure`.

Importing, building or running the model (:mod:`.so3`, :mod:`.nn`, :mod:`.model`) changes no process
state: without :func:`configure`, products run on torch's own route, glibc keeps its malloc defaults
and ``torch._dynamo``'s flags are left alone. :func:`configure` makes three choices, once per process:

1. **The CPU float32 matmul route** (:mod:`.nn.ops.dense`): oneDNN or torch's BLAS. ``"auto"`` times
   both on a product of the SO(2) convolutions' size, interleaved, and keeps oneDNN only where it is
   at least :data:`ONEDNN_MARGIN` faster (an AMD EPYC: oneDNN about twice as fast; an Intel Xeon with
   AVX-512: MKL slightly faster).
2. **Keeping freed memory** (glibc's malloc; off glibc nothing): mmap and heap trimming off, so freed
   blocks are reused by the next step and a step page-faults only where the heap grows. A step
   allocates and frees tensors of tens to hundreds of MB many times (edge messages ``[E, K, 2C]``:
   30 MB for two 38-atom slabs at lmax 4, 300 MB for one of 786 atoms), and with glibc's defaults
   every fresh 4 KB page costs a page fault on first touch. Measured here (31M shape, 2 cores): 0.86
   GB of page faults (~0.7 CPU-seconds) per inference step of two 38-atom slabs with the defaults;
   31M, 786 atoms, inference 8.8 -> 6.0 s; training, 402 atoms, 9.5 -> 9.1 s. The price is
   fragmentation: with batches of changing sizes the heap grows a little before it levels off (31M
   training, 50 batches of 2-4 slabs of 26-58 atoms: peak RSS 3.53 -> 4.11 GB, reached after 22
   batches; inference of 30 slabs of 200-800 atoms: 2.89 -> 3.63 GB, after 9), and freed memory
   is not returned to the OS until the process ends.
3. **DDP and compiled blocks**: with ``compile_under_ddp`` (a backbone with ``torch_compile``),
   ``torch._dynamo.config.optimize_ddp`` is turned off: DDP's graph splitter in ``torch.compile``
   refuses the autograd Functions of :mod:`.nn` (higher-order ops in the graph). Off, DDP still
   overlaps its gradient exchange with the backward graph by graph, i.e. block by block.

Who calls it: the fairchem adapters when fairchem builds a model through them (its trainers,
``OCPCalculator``, 2.x predict units), ``fairchem-eqv2``, and the benchmarks. Code that uses the torch
core directly calls it itself, or runs with torch's defaults. Arguments left ``None`` are read from
the environment: ``EQUIFORMERV2_CPU_MATMUL`` (``auto``, ``onednn`` or ``torch``; default ``auto``) and
``EQUIFORMERV2_KEEP_FREED_MEMORY`` (``0`` turns it off, and leaves glibc's own ``MALLOC_*`` variables
in charge: with it, ``MALLOC_MMAP_THRESHOLD_=33554432`` and a large ``MALLOC_TRIM_THRESHOLD_`` give
mmap above 32 MB, with less fragmentation and page faults for large systems).
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from .nn.ops import dense

logger = logging.getLogger(__name__)

CPU_MATMUL_ENV = "EQUIFORMERV2_CPU_MATMUL"
CPU_MATMULS = ("auto", *dense.ROUTES)
ONEDNN_MARGIN = 0.05  # oneDNN is chosen only when its median time is at least 5% below torch's
KEEP_FREED_MEMORY_ENV = "EQUIFORMERV2_KEEP_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@dataclass(frozen=True)
class MatmulRoute:
    """The CPU float32 route chosen for this process: ``"onednn"`` or ``"torch"``, why, and the median
    seconds of each route on the probe product when it was measured."""

    route: str
    reason: str
    onednn_s: float | None = None
    torch_s: float | None = None

    def __str__(self) -> str:
        timing = ""
        if self.onednn_s is not None:
            timing = f" (oneDNN {self.onednn_s * 1e3:.2f} ms, torch {self.torch_s * 1e3:.2f} ms per probe product)"
        return f"{self.route}: {self.reason}{timing}"


@dataclass(frozen=True)
class RuntimeChoices:
    """What :func:`configure` chose for this process."""

    matmul: MatmulRoute
    keeps_freed_memory: bool  # glibc's mmap and heap trimming off
    ddp_optimizer_off: bool  # torch._dynamo.config.optimize_ddp turned off for compiled blocks under DDP


_choices: RuntimeChoices | None = None


def configure(
    *, cpu_matmul: str | None = None, keep_freed_memory: bool | None = None, compile_under_ddp: bool = False
) -> RuntimeChoices:
    """Make this process's choices (see the module docstring) and return them.

    The first call decides the matmul route and the malloc setting; later calls return the same
    choices (they are process-wide and cannot be undone), except that ``compile_under_ddp=True``
    turns the DDP optimizer off if an earlier call had not. ``cpu_matmul``: ``"auto"`` (measure),
    ``"onednn"`` or ``"torch"``; ``None`` reads :data:`CPU_MATMUL_ENV`.
    """
    global _choices
    if _choices is None:
        route = _choose_route(os.environ.get(CPU_MATMUL_ENV, "auto") if cpu_matmul is None else cpu_matmul)
        dense.set_route(route.route)
        if keep_freed_memory is None:
            keep_freed_memory = os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0"
        _choices = RuntimeChoices(route, keep_freed_memory and glibc_keeps_freed_memory(), False)
        logger.info("CPU float32 matmul route: %s; freed memory kept: %s", route, _choices.keeps_freed_memory)
    if compile_under_ddp and not _choices.ddp_optimizer_off:
        torch._dynamo.config.optimize_ddp = False
        _choices = RuntimeChoices(_choices.matmul, _choices.keeps_freed_memory, True)
    return _choices


def choices() -> RuntimeChoices | None:
    """This process's choices, or ``None`` before :func:`configure`."""
    return _choices


def _choose_route(requested: str) -> MatmulRoute:
    if requested not in CPU_MATMULS:
        raise ValueError(f"{CPU_MATMUL_ENV}={requested!r}: must be one of {CPU_MATMULS}")
    if not dense.onednn_available():
        return MatmulRoute("torch", "this torch has no usable oneDNN linear op")
    if requested != "auto":
        return MatmulRoute(requested, f"{CPU_MATMUL_ENV}={requested}")
    return _measure_route()


def _measure_route(rows: int = 1536, inner: int = 768, cols: int = 512, rounds: int = 9) -> MatmulRoute:
    """Time both routes on ``[rows, inner] x [inner, cols]`` (an SO(2) convolution's size), alternating
    them ``rounds`` times so that both see the same load; the medians decide."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(cols, inner, generator=generator)
    routes = {"onednn": lambda: dense.onednn_linear(a, weight, None), "torch": lambda: torch.nn.functional.linear(a, weight)}
    times = {name: [] for name in routes}
    for name in routes:  # warm-up: first calls allocate and pick kernels
        routes[name]()
    for _ in range(rounds):
        for name, product in routes.items():
            start = time.perf_counter()
            product()
            times[name].append(time.perf_counter() - start)
    onednn_s, torch_s = statistics.median(times["onednn"]), statistics.median(times["torch"])
    faster = onednn_s <= (1 - ONEDNN_MARGIN) * torch_s
    reason = f"measured on {torch.get_num_threads()} thread(s)"
    return MatmulRoute("onednn" if faster else "torch", reason, onednn_s, torch_s)


def glibc_keeps_freed_memory() -> bool:
    """Turn glibc's mmap and heap trimming off; whether that took effect (False off glibc, or when
    ``mallopt`` refuses)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; at most 0 mmapped blocks, and a trim threshold of -1 (the largest
    # size_t) turns trimming off (mallopt(3))
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


class ConfiguredOnBuild:
    """Mix-in, first among an adapter backbone's bases: building the backbone makes this process's
    choices (:func:`configure`), as fairchem's launchers and calculators build models through the
    adapters and call nothing of ours."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        configure(compile_under_ddp=self.compile_options is not None)
