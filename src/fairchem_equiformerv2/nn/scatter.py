"""Summing edge messages into their target atoms.

``torch.Tensor.index_add_`` keeps its whole ``source`` for the backward pass (torch 2.4 needs only
its shape); for edge messages ``[E, (lmax+1)**2, C]`` that is the largest tensor of a block.
:func:`scatter_sum` keeps only the index.
"""
from __future__ import annotations

import torch


class _ScatterSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, size):
        ctx.save_for_backward(index)
        return src.new_zeros(size, *src.shape[1:]).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[i] = sum of src[e] over e with index[e] == i``: ``src [E, ...]``, ``index [E]`` -> ``[size, ...]``."""
    if torch.is_grad_enabled() and src.requires_grad:
        return _ScatterSum.apply(src, index, size)
    return src.new_zeros(size, *src.shape[1:]).index_add_(0, index, src)
