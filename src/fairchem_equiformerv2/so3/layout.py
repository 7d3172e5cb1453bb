"""Where each spherical-harmonic coefficient sits.

Two layouts run through the network (both use e3nn's real spherical harmonics, so the coefficient
of degree ``l`` and order ``m`` in a full l-major vector sits at ``l**2 + l + m``):

* **l-major, full**: node features, ``[num_nodes, (lmax + 1)**2, channels]``, ordered
  ``(0,0), (1,-1), (1,0), (1,1), (2,-2), ...``. Norms, feed-forward networks and heads use it.
* **m-major, truncated**: edge features in the edge-aligned frame, ``[num_edges, K, channels]``,
  keeping only orders ``|m| <= mmax`` (eSCN, Passaro & Zitnick 2023, Sec. 3; EquiformerV2 Sec. 3.1).
  Ordered as the SO(2) convolution consumes them: all ``m = 0`` coefficients (``l = 0..lmax``), then
  for each ``m = 1..mmax`` the ``+m`` coefficients (``l = m..lmax``) followed by the ``-m`` ones.

The mmax truncation drops coefficients of degrees ``l > mmax``; EquiformerV2 rescales the kept ones
by ``sqrt((2l + 1) / (2 mmax + 1))`` when leaving the edge frame or the S2 grid
(:attr:`EdgeLayout.rescale`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


def num_coefficients(lmax: int) -> int:
    """Number of coefficients of degrees ``0..lmax``: ``(lmax + 1)**2``."""
    return (lmax + 1) ** 2


def coefficient_index(l: int, m: int) -> int:
    """Position of ``(l, m)`` in the full l-major layout."""
    return l * l + l + m


def degree_of_coefficients(lmax: int) -> torch.Tensor:
    """``[(lmax + 1)**2]`` long tensor: the degree ``l`` of every l-major coefficient."""
    return torch.repeat_interleave(torch.arange(lmax + 1), 2 * torch.arange(lmax + 1) + 1)


@dataclass(frozen=True)
class EdgeLayout:
    """The m-major, mmax-truncated layout of edge features for one ``(lmax, mmax)``."""

    lmax: int
    mmax: int

    def __post_init__(self):
        if not 0 <= self.mmax <= self.lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={self.lmax}, mmax={self.mmax}")

    @cached_property
    def degrees_orders(self) -> list[tuple[int, int]]:
        """``(l, m)`` of each position, in m-major order."""
        out = [(l, 0) for l in range(self.lmax + 1)]
        for m in range(1, self.mmax + 1):
            out += [(l, m) for l in range(m, self.lmax + 1)]
            out += [(l, -m) for l in range(m, self.lmax + 1)]
        return out

    @property
    def num_coefficients(self) -> int:
        """K, the number of kept coefficients."""
        return len(self.degrees_orders)

    @cached_property
    def m_sizes(self) -> list[int]:
        """Number of degrees carrying order ``m`` (for each sign), ``m = 0..mmax``."""
        return [self.lmax + 1 - m for m in range(self.mmax + 1)]

    @cached_property
    def index(self) -> torch.Tensor:
        """``[K]``: position in the full l-major layout of each m-major coefficient."""
        return torch.tensor([coefficient_index(l, m) for l, m in self.degrees_orders])

    @cached_property
    def degree(self) -> torch.Tensor:
        """``[K]``: degree ``l`` of each m-major coefficient."""
        return torch.tensor([l for l, _ in self.degrees_orders])

    @cached_property
    def rescale(self) -> torch.Tensor:
        """``[K]``: ``sqrt((2l + 1) / (2 mmax + 1))`` for ``l > mmax``, else 1."""
        return torch.tensor(
            [
                math.sqrt((2 * l + 1) / (2 * self.mmax + 1)) if l > self.mmax else 1.0
                for l, _ in self.degrees_orders
            ],
            dtype=torch.float64,
        )

    @cached_property
    def order_lengths(self) -> list[int]:
        """Rows of each order block, in layout order: ``lmax + 1`` for ``m = 0`` and
        ``2 (lmax + 1 - m)`` (``+m`` then ``-m``) for ``m > 0``."""
        return [size if m == 0 else 2 * size for m, size in enumerate(self.m_sizes)]
