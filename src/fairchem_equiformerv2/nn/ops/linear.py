"""The equivariant linear map on l-major features (EquiformerV2's ``SO3_Linear``): one weight matrix per
degree, a bias on ``l = 0`` only, so it commutes with rotations."""
from __future__ import annotations

import torch
from torch import nn

from .autograd_mode import lean_autograd


def so3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """``y[n, (l,m)] = W_l x[n, (l,m)] (+ b for l = 0)``: ``x [N, F, in]``, ``weight [lmax+1, out, in]``,
    ``bias [out]``, ``degree [F]`` (``l`` of each coefficient) -> ``[N, F, out]``; memory-lean in
    training (:class:`_SO3Linear`)."""
    if lean_autograd():
        return _SO3Linear.apply(x, weight, bias, degree)
    return _so3_linear(x, weight, bias, degree)  # [N, F, out]


def _so3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("nfi,foi->nfo", x, weight.index_select(0, degree))  # one matrix per coefficient
    return out + nn.functional.pad(bias.view(1, 1, -1), (0, 0, 0, x.shape[1] - 1))


class _SO3Linear(torch.autograd.Function):
    """:func:`so3_linear` keeping ``x`` and the per-degree weight for backward, not the weight expanded
    to one matrix per coefficient (``F / (lmax+1)`` times larger: 3.2 MB per map at lmax 6 and 128
    channels) nor the einsum's reordered copy of ``x``. Differentiates ``x``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, degree):
        ctx.save_for_backward(x, weight, degree)
        return _so3_linear(x, weight, bias, degree)

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
