"""Dense float32 matrix products on the CPU through oneDNN.

torch sends a CPU float32 ``mm``/``linear`` to its BLAS, MKL in the PyPI wheels. MKL picks its code by
CPU vendor: on AMD CPUs it runs AVX2 code even where the CPU has AVX-512. oneDNN, which torch bundles
as well (``torch.ops.mkldnn._linear_pointwise``), picks its code by instruction set. On an AMD EPYC
(Zen 5, 2 threads), for the shapes of the SO(2) convolutions (``[1520, 1280] x [1280, 896]`` and the
like, transposed operands included): 210-230 GFLOP/s through MKL, 450-500 through oneDNN, equal to
float32 rounding. On an Intel Xeon with AVX-512, MKL was the faster route (a 31M training step 4.13 s
against 4.40 s through oneDNN).

So the route is measured, not guessed from the vendor: at the first float32 CPU product,
:func:`matmul_route` times both on a product of the SO(2) convolutions' size, interleaved, and keeps
oneDNN only where it is at least :data:`ONEDNN_MARGIN` faster (once per process; the benchmark prints
the choice). ``EQUIFORMERV2_CPU_MATMUL=onednn`` or ``=torch`` forces a route (read at import);
``auto`` (the default) measures.

:func:`mm`, :func:`linear` and :class:`Linear` take the chosen route for float32 CPU tensors outside
autocast and ``torch.compile``, and torch's own ops otherwise (GPU, bf16 autocast, float64, empty
operands), so they are drop-in replacements.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .plain_autograd import is_plain

logger = logging.getLogger(__name__)

CPU_MATMUL_ENV = "EQUIFORMERV2_CPU_MATMUL"
CPU_MATMULS = ("auto", "onednn", "torch")
ONEDNN_MARGIN = 0.05  # oneDNN is chosen only when its median time is at least 5% below torch's


def _onednn_works() -> bool:
    """Whether this torch has oneDNN's linear op and it gives ``a @ b`` (checked on a small product:
    the op is internal to torch and could change)."""
    if not torch.backends.mkldnn.is_available():
        return False
    a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4)
    try:
        return torch.equal(torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], ""), a @ b)
    except (AttributeError, RuntimeError, TypeError):
        return False


def _requested_route() -> str:
    choice = os.environ.get(CPU_MATMUL_ENV, "auto")
    if choice not in CPU_MATMULS:
        raise ValueError(f"{CPU_MATMUL_ENV}={choice!r}: must be one of {CPU_MATMULS}")
    return choice


ONEDNN_AVAILABLE = _onednn_works()
REQUESTED_ROUTE = _requested_route()


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


def _measure_route(rows: int = 1536, inner: int = 768, cols: int = 512, rounds: int = 9) -> MatmulRoute:
    """Time both routes on ``[rows, inner] x [inner, cols]`` (an SO(2) convolution's size), alternating
    them ``rounds`` times so that both see the same load; the medians decide."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(cols, inner, generator=generator)
    routes = {"onednn": lambda: _onednn_linear(a, weight, None), "torch": lambda: nn.functional.linear(a, weight)}
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


_ROUTE: MatmulRoute | None = None


def matmul_route() -> MatmulRoute:
    """The CPU float32 matmul route of this process, measured at the first call unless
    :data:`CPU_MATMUL_ENV` forces one or oneDNN is missing."""
    global _ROUTE
    if _ROUTE is None:
        if not ONEDNN_AVAILABLE:
            _ROUTE = MatmulRoute("torch", "this torch has no usable oneDNN linear op")
        elif REQUESTED_ROUTE != "auto":
            _ROUTE = MatmulRoute(REQUESTED_ROUTE, f"{CPU_MATMUL_ENV}={REQUESTED_ROUTE}")
        else:
            _ROUTE = _measure_route()
        logger.info("CPU float32 matmul route: %s", _ROUTE)
    return _ROUTE


#: Tests set this to True or False to force a route; None: :func:`matmul_route` decides.
ONEDNN: bool | None = None


def onednn_route() -> bool:
    """Whether float32 CPU products go through oneDNN in this process."""
    return ONEDNN if ONEDNN is not None else matmul_route().route == "onednn"


def _linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0]


# For torch's FlopCounterMode, which does not know oneDNN's op:
# ``FlopCounterMode(custom_mapping=FLOP_FORMULAS)`` counts these products as it counts ``mm``.
FLOP_FORMULAS = {torch.ops.mkldnn._linear_pointwise: _linear_flops} if ONEDNN_AVAILABLE else {}


def uses_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of ``tensors`` goes through oneDNN: all float32 on the CPU and not empty (oneDNN
    has no primitive for a product of zero rows: a batch without edges), autocast off and not under
    ``torch.compile`` nor in :func:`.plain_autograd.plain_autograd`."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not is_plain()  # autograd cannot differentiate oneDNN's products
        and onednn_route()
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN, no autograd."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy unless it is contiguous or the transpose of a contiguous matrix.

    oneDNN takes transposed views at full speed, but other strides (a slice such as ``x[:, 0]`` of
    ``x [E, 2, D]``) send it to its reference kernel: measured over 100x slower.
    """
    if t.is_contiguous() or (t.dim() == 2 and t.T.is_contiguous()):
        return t
    return t.contiguous()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [..., K]`` and ``b [K, M]`` -> ``[..., M]``; no autograd through oneDNN (for
    the backward passes of autograd Functions and for inference)."""
    if uses_onednn(a, b):
        return _onednn_linear(a, b.T, None)
    return a @ b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.functional.linear``: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` -> ``[..., out]``,
    with autograd."""
    operands = (x, weight) if bias is None else (x, weight, bias)
    if not uses_onednn(*operands):
        return nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return _Linear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    """``linear`` through oneDNN, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = mm(grad_rows.T, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """``nn.Linear`` whose product goes through :func:`linear` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
