"""Equivariant linear map on l-major features: one weight matrix per degree, bias on ``l = 0``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..so3.layout import degree_of_coefficients
from .ops.linear import so3_linear


class SO3Linear(nn.Module):
    """``y[n, (l,m), :] = W_l x[n, (l,m), :] (+ b for l = 0)``.

    Shapes: ``[N, (lmax+1)**2, in_features]`` -> ``[N, (lmax+1)**2, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, lmax: int):
        super().__init__()
        self.in_features, self.out_features, self.lmax = in_features, out_features, lmax
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("degree", degree_of_coefficients(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return so3_linear(x, self.weight, self.bias, self.degree)  # [N, F, out]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(in_features={self.in_features}, out_features={self.out_features}, lmax={self.lmax})"
