"""Moving features between atoms and edges.

* :func:`scatter_sum` sums edge messages into their target atoms. ``torch.Tensor.index_add_`` keeps
  its whole ``source`` for the backward pass (torch 2.4 needs only its shape); for edge messages
  ``[E, (lmax+1)**2, C]`` that is the largest tensor of a block. :func:`scatter_sum` keeps only the index.
* :func:`gather_pairs` gives each edge its source and target atoms' features side by side. Its
  backward sums the whole (contiguous) gradient into the atoms twice, by source and by target, and
  keeps the half each wants: on the CPU, ``index_add_`` of a strided source (each half of the
  gradient of a concatenation, as autograd would do) is 5x slower than both sums.
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


class _GatherPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, source, target):
        ctx.save_for_backward(source, target)
        ctx.num_nodes = x.shape[0]
        return _pairs(x, source, target)

    @staticmethod
    def backward(ctx, grad):
        source, target = ctx.saved_tensors
        grad, channels = grad.contiguous(), grad.shape[-1] // 2
        # index_add_ of the whole (contiguous) gradient by source, then by target, and keep the half
        # each one wants: faster than making either half contiguous (a strided copy into new memory)
        sums = grad.new_zeros(2, ctx.num_nodes, *grad.shape[1:])
        sums[0].index_add_(0, source, grad)
        sums[1].index_add_(0, target, grad)
        return sums[0, ..., :channels] + sums[1, ..., channels:], None, None


def gather_pairs(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cat(x[source], x[target], dim=-1)``: ``x [N, ..., C]``, ``source, target [E]`` -> ``[E, ..., 2C]``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherPairs.apply(x, source, target)
    return _pairs(x, source, target)


def _pairs(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.cat((x.index_select(0, source), x.index_select(0, target)), dim=-1)  # [E, ..., 2C]
