"""Dense float32 matrix products on the CPU through oneDNN.

torch sends a CPU float32 ``mm``/``linear`` to its BLAS, MKL in the PyPI wheels. MKL picks its code by
CPU vendor: on AMD CPUs it runs AVX2 code even where the CPU has AVX-512. oneDNN, which torch bundles
as well (``torch.ops.mkldnn._linear_pointwise``), picks its code by instruction set. On an AMD EPYC
(Zen 5, 2 threads), for the shapes of the SO(2) convolutions (``[1520, 1280] x [1280, 896]`` and the
like, transposed operands included): 210-230 GFLOP/s through MKL, 450-500 through oneDNN, equal to
float32 rounding. On an Intel Xeon with AVX-512, MKL was the faster route.

This module holds the route (:func:`set_route`; torch's own until something chooses) and the products
that follow it. The choice is a process-wide one, made by :func:`fairchem_equiformerv2.runtime.configure`
(which measures both routes on this machine); importing or running the model chooses nothing.

:func:`mm`, :func:`linear` and :class:`Linear` take oneDNN for float32 CPU tensors outside autocast
and ``torch.compile`` when the route is ``"onednn"``, and torch's own ops otherwise (GPU, bf16 autocast,
float64, empty operands), so they are drop-in replacements.
"""
from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from .autograd_mode import is_plain

ROUTES = ("onednn", "torch")


@cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op and it gives ``a @ b`` (checked once, on a small
    product: the op is internal to torch and could change)."""
    if not torch.backends.mkldnn.is_available():
        return False
    a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4)
    try:
        return torch.equal(torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], ""), a @ b)
    except (AttributeError, RuntimeError, TypeError):
        return False


_route = "torch"  # this process's CPU float32 route; see set_route


def set_route(route: str) -> None:
    """Send float32 CPU products through ``"onednn"`` or ``"torch"`` from now on, in this process
    (:func:`fairchem_equiformerv2.runtime.configure` calls this)."""
    global _route
    if route not in ROUTES:
        raise ValueError(f"CPU matmul route {route!r}: must be one of {ROUTES}")
    if route == "onednn" and not onednn_available():
        raise ValueError("CPU matmul route 'onednn': this torch has no usable oneDNN linear op")
    _route = route


def onednn_route() -> bool:
    """Whether float32 CPU products go through oneDNN in this process."""
    return _route == "onednn"


def _linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0]


# For torch's FlopCounterMode, which does not know oneDNN's op:
# ``FlopCounterMode(custom_mapping=FLOP_FORMULAS)`` counts these products as it counts ``mm``.
FLOP_FORMULAS = {torch.ops.mkldnn._linear_pointwise: _linear_flops} if torch.backends.mkldnn.is_available() else {}


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


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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
        return onednn_linear(a, b.T, None)
    return a @ b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b`` (``nn.functional.linear``): ``x [..., in]``, ``weight W [out, in]``, ``bias b [out]``
    -> ``[..., out]``, with autograd (:class:`_Linear` on the oneDNN route)."""
    operands = (x, weight) if bias is None else (x, weight, bias)
    if not uses_onednn(*operands):
        return nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return _Linear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    """:func:`linear` through oneDNN, forward and backward; differentiates ``x``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

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
