"""Nonlinearities for spherical features (EquiformerV2 Sec. 3.2).

* :class:`S2Activation`: sample every channel on an S2 grid, apply SiLU pointwise, project back.
* :class:`SeparableS2Activation`: the paper's *separable S2 activation*: the ``l = 0`` output comes
  from a SiLU of separate invariant inputs; degrees ``l > 0`` from the S2 activation.
* :class:`GateActivation`: SiLU on ``l = 0``, each degree ``l > 0`` scaled by a sigmoid gate per
  channel (Equiformer / e3nn's ``Gate``).

Each acts on one layout, given by the coefficient order and degrees of its rows: the m-major,
mmax-truncated edge layout inside the graph attention, or the full l-major node layout in the
feed-forward network.
"""
from __future__ import annotations

import torch
from torch import nn

from ..so3.grid import S2Grid
from .ops.grid import grid_silu


class SmoothLeakyReLU(nn.Module):
    """``(1 + a)/2 x + (1 - a)/2 x (2 sigmoid(x) - 1)``, a smooth leaky ReLU of slope ``a``, computed as
    ``a x + (1 - a) SiLU(x)`` (the same function), for which autograd keeps only ``x``."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.negative_slope
        return a * x + (1 - a) * nn.functional.silu(x)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class S2Activation(nn.Module):
    """``x [N, K, C]`` -> ``from_grid(SiLU(to_grid(x)))  [N, K, C]``; with ``first_row``, only the rows
    from there on are projected back: ``[N, K - first_row, C]``."""

    def __init__(self, grid: S2Grid):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        return grid_silu(x, self.grid.to_grid_mat, self.grid.from_grid_mat[first_row:])  # [N, K - first_row, C]


class SeparableS2Activation(nn.Module):
    """``scalars [N, C]``, ``x [N, K, C]`` -> ``[N, K, C]``: row 0 (``l = 0``) is ``SiLU(scalars)``,
    the other rows come from the S2 activation of ``x``."""

    def __init__(self, grid: S2Grid):
        super().__init__()
        self.s2_act = S2Activation(grid)
        self.scalar_act = nn.SiLU()

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # row 0 of the S2 activation would be thrown away: not projected back at all
        return torch.cat((self.scalar_act(scalars).unsqueeze(1), self.s2_act(x, first_row=1)), dim=1)


class GateActivation(nn.Module):
    """``gates [N, lmax * C]``, ``x [N, K, C]`` -> ``[N, K, C]``: ``SiLU`` on row 0 (``l = 0``), and
    each row of degree ``l > 0`` times ``sigmoid(gates[:, l - 1, :])``.

    Args:
        degree: ``[K]`` degree of each row of ``x`` (row 0 must be ``l = 0``).
        lmax, num_channels: shape of the gates.
    """

    def __init__(self, degree: torch.Tensor, lmax: int, num_channels: int):
        super().__init__()
        self.lmax, self.num_channels = lmax, num_channels
        self.register_buffer("gate_index", torch.as_tensor(degree)[1:] - 1, persistent=False)
        self.scalar_act, self.gate_act = nn.SiLU(), nn.Sigmoid()

    def forward(self, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gates = self.gate_act(gates).view(x.shape[0], self.lmax, self.num_channels)[:, self.gate_index]
        return torch.cat((self.scalar_act(x[:, :1]), x[:, 1:] * gates), dim=1)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, num_channels={self.num_channels}"
