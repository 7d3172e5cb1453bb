"""The SO(2) convolution of eSCN (Passaro & Zitnick 2023, Eq. 8-9; EquiformerV2 Sec. 3.1).

In an edge-aligned frame a rotation-equivariant linear map only mixes coefficients of the same
order ``|m|``, and for ``m > 0`` acts on the ``(+m, -m)`` pair as a complex multiplication:

    y_{+m} = W_r x_{+m} - W_i x_{-m},    y_{-m} = W_r x_{-m} + W_i x_{+m}

(all degrees ``l >= m`` and channels of one order are flattened into one vector). ``m = 0`` is a plain
real linear map, with a bias, and may emit extra invariant channels (EquiformerV2 uses them for
attention logits and gates). With a radial MLP, each input is first scaled by per-edge weights.
The maps themselves are the functional ops of :mod:`.ops.so2`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..so3.layout import EdgeLayout
from .ops.dense import Linear
from .ops.so2 import Radial, complex_linear, radial_linear
from .radial import RadialMLP


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
        y = complex_linear(x, radial, self.fc.weight)  # [E, 2, D * C_out]
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
        y_0 = radial_linear(x_0.flatten(1), radial[0], self.fc_m0.weight, self.fc_m0.bias)
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
