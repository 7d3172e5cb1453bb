"""Equivariant linear map on l-major features: one weight matrix per degree, bias on ``l = 0``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..so3.layout import degree_of_coefficients
from .ops.autograd_mode import lean_autograd


def so3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """``x [N, F, in]``, ``weight [lmax+1, out, in]``, ``bias [out]``, ``degree [F]`` -> ``[N, F, out]``."""
    out = torch.einsum("nfi,foi->nfo", x, weight.index_select(0, degree))  # one matrix per coefficient
    return out + nn.functional.pad(bias.view(1, 1, -1), (0, 0, 0, x.shape[1] - 1))


class _SO3Linear(torch.autograd.Function):
    """:func:`so3_linear` keeping ``x`` and the per-degree weight for backward, not the weight expanded
    to one matrix per coefficient (``F / (lmax+1)`` times larger: 3.2 MB per map at lmax 6 and 128
    channels) nor the einsum's reordered copy of ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, degree):
        ctx.save_for_backward(x, weight, degree)
        return so3_linear(x, weight, bias, degree)

    @staticmethod
    def backward(ctx, grad):
        x, weight, degree = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.einsum("nfo,foi->nfi", grad, weight.index_select(0, degree).to(grad.dtype))
        if ctx.needs_input_grad[1]:
            # summed by degree with index_add_ (not a serial accumulating index_put_)
            per_coefficient = torch.einsum("nfo,nfi->foi", grad, x.to(grad.dtype))
            grad_weight = per_coefficient.new_zeros(weight.shape).index_add_(0, degree, per_coefficient)
        if ctx.needs_input_grad[2]:
            grad_bias = grad[:, 0].sum(0)
        return grad_x, grad_weight, grad_bias, None


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
        if lean_autograd():
            return _SO3Linear.apply(x, self.weight, self.bias, self.degree)
        return so3_linear(x, self.weight, self.bias, self.degree)  # [N, F, out]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(in_features={self.in_features}, out_features={self.out_features}, lmax={self.lmax})"
