"""The two maps of the SO(2) convolution (eSCN, Passaro & Zitnick 2023, Eq. 8-9; EquiformerV2 Sec. 3.1),
each scaled per edge by radial weights:

* :func:`radial_linear`, order ``m = 0``: ``y = (x * w) W^T + b``;
* :func:`complex_linear`, each order ``m > 0``: ``y_{+m} + i y_{-m} = (W_r + i W_i)(x_{+m} w + i x_{-m} w)``.

The radial weights enter as ``radial = (h, rw, rb)``: the radial MLP's last hidden features
``h [E, H]`` and its last layer's rows for one order, ``w = h rw^T + rb  [E, D]``. In training the
maps are memory-lean autograd Functions that keep ``x`` and ``h`` (as that layer would, for its own
backward) and recompute ``w`` in backward, keeping neither ``w`` nor ``x * w``: one small matmul per
order buys 19 MB per layer for two 38-atom slabs at lmax 4 (28 MB at lmax 6). Elsewhere (no gradients,
:func:`.autograd_mode.plain_autograd`) they are the same operations in plain torch. The products,
forward and backward, go through :mod:`.dense` (oneDNN on the CPU).
"""
from __future__ import annotations

import torch

from .autograd_mode import lean_autograd
from .dense import linear, mm
from ..precision import autocast_off

Radial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h [E, H], rw [D, H], rb [D])


def radial_weights(h: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """``w = h rw^T + rb``: ``[E, H]`` -> ``[E, D]``, in ``h``'s dtype (float32 under autocast, as the
    radial MLP)."""
    with autocast_off(h):
        return linear(h, rw, rb)


def radial_linear(
    x: torch.Tensor, radial: Radial | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y = (x * w) W^T + b``: ``x [E, D]``, the radial weights ``w [E, D]`` of ``radial``
    (``y = x W^T + b`` when None), ``weight W [O, D]``, ``bias b [O]`` -> ``[E, O]``."""
    if radial is None:
        return linear(x, weight, bias)
    if lean_autograd():
        return _RadialLinear.apply(x, *radial, weight, bias)
    return linear(x * radial_weights(*radial), weight, bias)  # [E, O]


def complex_linear(x: torch.Tensor, radial: Radial | None, weight: torch.Tensor) -> torch.Tensor:
    """The complex product ``y_{+m} + i y_{-m} = (W_r + i W_i)(a + i b)`` with ``a = x_{+m} w``,
    ``b = x_{-m} w`` (``w = 1`` when ``radial`` is None), in three real matmuls instead of four (Gauss):
    ``k1 = W_r (a + b)``, ``k2 = (W_i - W_r) a``, ``k3 = (W_r + W_i) b``; ``y_{+m} = k1 - k3``,
    ``y_{-m} = k1 + k2``.

    ``x [E, 2, D]`` (rows ``+m``, ``-m``), ``radial`` for ``w [E, D]`` or None, ``weight [2 O, D]``
    (``W_r`` above ``W_i``) -> ``[E, 2, O]``.
    """
    if lean_autograd():
        return _ComplexLinear.apply(x, *(radial or (None,) * 3), weight)
    return _complex_product(x, None if radial is None else radial_weights(*radial), weight)


def _complex_product(x: torch.Tensor, w: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """:func:`complex_linear` with the radial weights ``w [E, D]`` (or None) given: ``[E, 2, O]``."""
    a, b = _scaled_pair(x, w)
    w_r, w_i = weight.chunk(2)
    k1 = mm(a + b, w_r.T)
    k2 = mm(a, (w_i - w_r).T)
    k3 = mm(b, (w_r + w_i).T)
    return torch.stack((k1 - k3, k1 + k2), dim=1)  # [E, 2, O]


def _scaled_pair(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_{+m} w, x_{-m} w``, each ``[E, D]``."""
    if w is None:
        return x[:, 0], x[:, 1]
    return x[:, 0] * w, x[:, 1] * w


def _radial_backward(needs_grad, grad_w: torch.Tensor, h: torch.Tensor, rw: torch.Tensor):
    """Gradients of ``(h, rw, rb)`` from that of ``w [E, D]``; ``needs_grad`` flags the three."""
    return (
        mm(grad_w, rw.to(grad_w.dtype)) if needs_grad[0] else None,
        mm(grad_w.T, h.to(grad_w.dtype)) if needs_grad[1] else None,
        grad_w.sum(0) if needs_grad[2] else None,
    )


class _RadialLinear(torch.autograd.Function):
    """:func:`radial_linear` keeping ``x`` and ``h`` for backward: not ``w`` (recomputed) nor ``x * w``
    (which would double the largest tensors of a training step). Differentiates all six inputs."""

    @staticmethod
    def forward(ctx, x, h, rw, rb, weight, bias):
        ctx.save_for_backward(x, h, rw, rb, weight)
        ctx.has_bias = bias is not None
        return linear(x * radial_weights(h, rw, rb), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, h, rw, rb, weight = ctx.saved_tensors
        w = radial_weights(h, rw, rb).to(grad.dtype)
        grad_xw = mm(grad, weight.to(grad.dtype))  # [E, D]
        grad_x = grad_xw * w if ctx.needs_input_grad[0] else None
        grad_radial = (None,) * 3
        if any(ctx.needs_input_grad[1:4]):
            grad_radial = _radial_backward(ctx.needs_input_grad[1:4], grad_xw * x, h, rw)
        grad_weight = mm(grad.T, (x * w).to(grad.dtype)) if ctx.needs_input_grad[4] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
        return grad_x, *grad_radial, grad_weight, grad_bias


class _ComplexLinear(torch.autograd.Function):
    """:func:`complex_linear` with radial weights ``w = h rw^T + rb`` (or none: ``h, rw, rb`` None),
    keeping ``x`` and ``h`` for backward, not ``w`` nor the scaled copies, with a backward of three
    matmuls per gradient as well: for ``g = (g_{+m}, g_{-m})`` and ``s = g_{+m} + g_{-m}``,

        dL/da = W_r^T s + (W_i - W_r)^T g_{-m},   dL/db = W_r^T s - (W_r + W_i)^T g_{+m},
        dL/dW_r = s^T (a + b) - g_{-m}^T a - g_{+m}^T b,   dL/dW_i = g_{-m}^T a - g_{+m}^T b.

    Differentiates all five inputs.
    """

    @staticmethod
    def forward(ctx, x, h, rw, rb, weight):
        ctx.save_for_backward(x, h, rw, rb, weight)
        return _complex_product(x, None if h is None else radial_weights(h, rw, rb), weight)

    @staticmethod
    def backward(ctx, grad):
        x, h, rw, rb, weight = ctx.saved_tensors
        w = None if h is None else radial_weights(h, rw, rb).to(grad.dtype)
        g_plus, g_minus = grad[:, 0], grad[:, 1]
        s = g_plus + g_minus
        w_r, w_i = weight.to(grad.dtype).chunk(2)
        grad_x, grad_radial, grad_weight = None, (None,) * 3, None
        if any(ctx.needs_input_grad[:4]):
            p1 = mm(s, w_r)
            grad_a, grad_b = p1 + mm(g_minus, w_i - w_r), p1 - mm(g_plus, w_r + w_i)  # [E, D]
            if ctx.needs_input_grad[0]:
                grad_x = torch.stack((grad_a, grad_b), dim=1)
                if w is not None:
                    grad_x.mul_(w.unsqueeze(1))
            if w is not None and any(ctx.needs_input_grad[1:4]):
                grad_w = grad_a * x[:, 0] + grad_b * x[:, 1]
                grad_radial = _radial_backward(ctx.needs_input_grad[1:4], grad_w, h, rw)
        if ctx.needs_input_grad[4]:
            a, b = (t.to(grad.dtype) for t in _scaled_pair(x, w))
            q2, q3 = mm(g_minus.T, a), mm(g_plus.T, b)
            grad_weight = torch.cat((mm(s.T, a + b) - q2 - q3, q2 - q3))
        return grad_x, *grad_radial, grad_weight
