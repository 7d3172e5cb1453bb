"""The SO(2) convolution of eSCN (Passaro & Zitnick 2023, Eq. 8-9; EquiformerV2 Sec. 3.1).

In an edge-aligned frame a rotation-equivariant linear map only mixes coefficients of the same
order ``|m|``, and for ``m > 0`` acts on the ``(+m, -m)`` pair as a complex multiplication:

    y_{+m} = W_r x_{+m} - W_i x_{-m},    y_{-m} = W_r x_{-m} + W_i x_{+m}

(all degrees ``l >= m`` and channels of one order are flattened into one vector). ``m = 0`` is a plain
real linear map, with a bias, and may emit extra invariant channels (EquiformerV2 uses them for
attention logits and gates). With a radial MLP, each input is first scaled by per-edge weights.
The products, forward and backward, go through :mod:`.dense` (oneDNN on the CPU).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..so3.layout import EdgeLayout
from .ops.dense import Linear, linear, mm
from .ops.autograd_mode import lean_autograd
from .precision import autocast_off
from .radial import RadialMLP


# Per-edge radial weights enter the maps below as ``(h, rw, rb)``: the radial MLP's last hidden
# features ``h [E, H]`` and its last layer's rows for one order, ``w = h rw^T + rb  [E, D]``. The maps
# keep ``h`` (as that layer would, for its own backward) and recompute ``w`` in backward instead of
# keeping it: one small matmul per order buys 19 MB per layer for two 38-atom slabs at lmax 4 (28 MB
# at lmax 6).
Radial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h [E, H], rw [D, H], rb [D])


def radial_weights(h: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """``h rw^T + rb``: ``[E, H]`` -> ``[E, D]``, in ``h``'s dtype (float32 under autocast, as the radial
    MLP)."""
    with autocast_off(h):
        return linear(h, rw, rb)


def _radial_backward(needs_grad, grad_w: torch.Tensor, h: torch.Tensor, rw: torch.Tensor):
    """Gradients of ``(h, rw, rb)`` from that of ``w [E, D]``; ``needs_grad`` flags the three."""
    return (
        mm(grad_w, rw.to(grad_w.dtype)) if needs_grad[0] else None,
        mm(grad_w.T, h.to(grad_w.dtype)) if needs_grad[1] else None,
        grad_w.sum(0) if needs_grad[2] else None,
    )


def _recomputed_weights(h, rw, rb, dtype) -> torch.Tensor:
    return radial_weights(h, rw, rb).to(dtype)


class _RadialLinear(torch.autograd.Function):
    """``linear(x * w, weight, bias)`` for ``x [E, D]`` and radial weights ``w = h rw^T + rb``, keeping
    ``x`` and ``h`` for backward: not ``w`` (recomputed) nor ``x * w`` (which would double the largest
    tensors of a training step)."""

    @staticmethod
    def forward(ctx, x, h, rw, rb, weight, bias):
        ctx.save_for_backward(x, h, rw, rb, weight)
        ctx.has_bias = bias is not None
        return linear(x * radial_weights(h, rw, rb), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, h, rw, rb, weight = ctx.saved_tensors
        w = _recomputed_weights(h, rw, rb, grad.dtype)
        grad_xw = mm(grad, weight.to(grad.dtype))  # [E, D]
        grad_x = grad_xw * w if ctx.needs_input_grad[0] else None
        grad_radial = (None,) * 3
        if any(ctx.needs_input_grad[1:4]):
            grad_radial = _radial_backward(ctx.needs_input_grad[1:4], grad_xw * x, h, rw)
        grad_weight = mm(grad.T, (x * w).to(grad.dtype)) if ctx.needs_input_grad[4] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
        return grad_x, *grad_radial, grad_weight, grad_bias


def radial_linear(layer: nn.Linear, x: torch.Tensor, radial: Radial | None) -> torch.Tensor:
    """``layer(x * w)`` for ``x [E, D]`` and the radial weights of ``radial`` (``layer(x)`` when None),
    memory-lean in training."""
    if radial is None:
        return layer(x)
    if lean_autograd():
        return _RadialLinear.apply(x, *radial, layer.weight, layer.bias)
    return layer(x * radial_weights(*radial))


def complex_linear(x: torch.Tensor, w: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """The complex product ``(W_r + i W_i)(a + i b)`` with ``a = x_{+m} w``, ``b = x_{-m} w``, in three
    real matmuls instead of four (Gauss): ``k1 = W_r (a + b)``, ``k2 = (W_i - W_r) a``,
    ``k3 = (W_r + W_i) b``; ``y_{+m} = k1 - k3``, ``y_{-m} = k1 + k2``.

    ``x [E, 2, D]`` (rows ``+m``, ``-m``), per-edge weights ``w [E, D]`` or None, ``weight [2 O, D]``
    (``W_r`` above ``W_i``) -> ``[E, 2, O]``.
    """
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


class _ComplexLinear(torch.autograd.Function):
    """:func:`complex_linear` with radial weights ``w = h rw^T + rb`` (or none: ``h, rw, rb`` None),
    keeping ``x`` and ``h`` for backward, not ``w`` nor the scaled copies, with a backward of three
    matmuls per gradient as well: for ``g = (g_{+m}, g_{-m})`` and ``s = g_{+m} + g_{-m}``,

        dL/da = W_r^T s + (W_i - W_r)^T g_{-m},   dL/db = W_r^T s - (W_r + W_i)^T g_{+m},
        dL/dW_r = s^T (a + b) - g_{-m}^T a - g_{+m}^T b,   dL/dW_i = g_{-m}^T a - g_{+m}^T b.
    """

    @staticmethod
    def forward(ctx, x, h, rw, rb, weight):
        ctx.save_for_backward(x, h, rw, rb, weight)
        return complex_linear(x, None if h is None else radial_weights(h, rw, rb), weight)

    @staticmethod
    def backward(ctx, grad):
        x, h, rw, rb, weight = ctx.saved_tensors
        w = None if h is None else _recomputed_weights(h, rw, rb, grad.dtype)
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


class SO2MConvolution(nn.Module):
    """The complex-linear map of one order ``m > 0``: ``[E, 2, (lmax+1-m) * C_in]`` ->
    ``[E, 2 (lmax+1-m), C_out]`` (rows ``+m`` then ``-m``). ``fc.weight`` holds ``W_r`` above ``W_i``."""

    def __init__(self, m: int, in_features: int, out_channels: int, num_degrees: int):
        super().__init__()
        self.m, self.out_channels = m, out_channels
        self.fc = nn.Linear(in_features, 2 * out_channels * num_degrees, bias=False)
        self.fc.weight.data.mul_(1 / math.sqrt(2))

    def forward(self, x: torch.Tensor, radial: Radial | None = None) -> torch.Tensor:
        """``x [E, 2, D * C_in]``, optional radial weights ``radial = (h, rw, rb)`` (``w [E, D * C_in]``)."""
        if lean_autograd():
            y = _ComplexLinear.apply(x, *(radial or (None,) * 3), self.fc.weight)
        else:
            y = complex_linear(x, None if radial is None else radial_weights(*radial), self.fc.weight)
        return y.view(x.shape[0], y.shape[1] * y.shape[2] // self.out_channels, self.out_channels)  # [E, 2 D, C_out]


class SO2Convolution(nn.Module):
    """SO(2) convolution over all orders of an edge layout.

    Args:
        in_channels, out_channels: channels per coefficient.
        layout: the m-major edge layout of inputs and outputs.
        radial_channels: ``[in, hidden, hidden]`` of the radial MLP that makes per-edge weights, or
            ``None`` for none.
        extra_m0_channels: extra invariant outputs of the ``m = 0`` map, returned separately.

    Forward: ``x [E, K, in_channels]``, ``edge_features [E, radial_channels[0]]`` ->
    ``[E, K, out_channels]`` (and ``[E, extra_m0_channels]`` when asked for).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layout: EdgeLayout,
        radial_channels: list[int] | None = None,
        extra_m0_channels: int = 0,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.layout = in_channels, out_channels, layout
        self.extra_m0_channels = extra_m0_channels
        num_l = layout.lmax + 1
        self.fc_m0 = Linear(num_l * in_channels, num_l * out_channels + extra_m0_channels)
        self.so2_m_conv = nn.ModuleList(
            SO2MConvolution(m, size * in_channels, out_channels, size)
            for m, size in enumerate(layout.m_sizes)
            if m > 0
        )
        self.order_lengths = list(layout.order_lengths)  # a plain list: torch.compile reads it as constants
        self.radial_sizes = [self.fc_m0.in_features] + [c.fc.in_features for c in self.so2_m_conv]
        self.rad_func = RadialMLP([*radial_channels, sum(self.radial_sizes)]) if radial_channels else None

    def forward(self, x: torch.Tensor, edge_features: torch.Tensor | None = None):
        num_edges = x.shape[0]
        radial = [None] * len(self.radial_sizes)
        if self.rad_func is not None:  # the last layer's rows of each order, applied inside the maps
            h, last = self.rad_func.hidden(edge_features), self.rad_func.last
            radial = [(h, rw, rb) for rw, rb in zip(last.weight.split(self.radial_sizes), last.bias.split(self.radial_sizes))]

        # split, not narrow: its backward concatenates the blocks' gradients instead of zero-filling
        # a full-size gradient per block
        x_0, *x_m = x.split(self.order_lengths, dim=1)
        y_0 = radial_linear(self.fc_m0, x_0.flatten(1), radial[0])
        extra, y_0 = y_0.split([self.extra_m0_channels, y_0.shape[1] - self.extra_m0_channels], dim=1)
        out = [y_0.view(num_edges, self.layout.lmax + 1, self.out_channels)]

        for x_m, conv, r in zip(x_m, self.so2_m_conv, radial[1:]):
            out.append(conv(x_m.reshape(num_edges, 2, x_m.shape[1] // 2 * x_m.shape[2]), r))

        out = torch.cat(out, dim=1)  # [E, K, out_channels]
        return (out, extra) if self.extra_m0_channels else out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"lmax={self.layout.lmax}, mmax={self.layout.mmax}, extra_m0_channels={self.extra_m0_channels}, "
            f"radial={self.rad_func is not None}"
        )
