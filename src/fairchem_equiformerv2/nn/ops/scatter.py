"""Moving features between atoms and edges, optionally through each edge's rotation.

* :func:`gather_pairs` gives each edge its source and target atoms' features side by side,
  ``cat(x[source], x[target], dim=-1)``, and with ``rotation`` turns them into the edge frame:
  ``rotation[e] @ pair[e]``.
* :func:`scatter_sum` sums edge messages into their target atoms, with ``rotation`` first turning each
  one out of the edge frame: ``out[i] = sum of rotation[e] @ src[e] over e with index[e] == i``.

Sums (and the gather's backward, a sum) accumulate in float32 at least, also under autocast, where
the rotations run as bf16 ``bmm``s: a GPU's bf16 ``index_add_`` rounds after every term.

Both keep only the indices (and the rotations, kept anyway) for backward. The backward of the
gather sums the whole (contiguous) gradient into the atoms twice, by source and by target, and keeps
the half each wants: on the CPU, ``index_add_`` of a strided source (each half of the gradient of a
concatenation, as autograd would do) is 5x slower than both sums.

With a rotation, the CPU goes through the edges in blocks of about :data:`EDGE_BLOCK_BYTES`: a
block's gathered pairs (or rotated messages) stay in cache, and the edge-frame tensors of all edges
in the l-major layout (``[E, (lmax+1)**2, 2C]``: 76 MB at lmax 6 for two 38-atom slabs) are never
allocated (with glibc's mmap threshold at 32 MB, as the plugin once set it, each was page-faulted
anew in every layer: 1.4 GB of page faults per 83M inference step). Elsewhere (and under
``torch.compile``) all edges are one block.
"""
from __future__ import annotations

import torch

from .autograd_mode import is_plain, lean_autograd
from ..precision import accumulation_dtype, autocast_off, matmul_dtype

EDGE_BLOCK_BYTES = 4 * 2**20


def edge_blocks(num_edges: int, row_bytes: int, device: torch.device) -> list[slice]:
    """Slices of ``num_edges`` rows of ``row_bytes`` each, about :data:`EDGE_BLOCK_BYTES` per slice
    on the CPU; one slice elsewhere."""
    if device.type != "cpu" or torch.compiler.is_compiling() or is_plain():
        return [slice(0, num_edges)]
    return row_slices(num_edges, max(1, EDGE_BLOCK_BYTES // max(1, row_bytes)))


def row_slices(num_rows: int, step: int) -> list[slice]:
    """``num_rows`` rows in slices of ``step`` (the last one shorter)."""
    return [slice(start, min(num_rows, start + step)) for start in range(0, num_rows, step)]


def gather_pairs(
    x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [N, F, C]``, ``source, target [E]`` -> ``cat(x[source], x[target], -1)  [E, F, 2C]``; with
    ``rotation [E, K, F]``, times it per edge -> ``[E, K, 2C]`` (in autocast's dtype, as a ``bmm``)."""
    if lean_autograd() and x.requires_grad:
        return _GatherPairs.apply(x, source, target, rotation)
    return _gather_pairs(x, source, target, rotation)


def scatter_sum(
    src: torch.Tensor, index: torch.Tensor, size: int, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[i] = sum of src[e] over e with index[e] == i``: ``src [E, K, C]``, ``index [E]`` ->
    ``[size, K, C]``; with ``rotation [E, F, K]``, of ``rotation[e] @ src[e]`` (a ``bmm`` in autocast's
    dtype) -> ``[size, F, C]``. Summed in float32 at least (see ``precision.py``)."""
    if lean_autograd() and src.requires_grad:
        return _ScatterSum.apply(src, index, size, rotation)
    return _scatter_sum(src, index, size, rotation)


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` in ``b``'s dtype, autocast off: the functions here choose their dtype up front (autocast
    would also be on in backward)."""
    with autocast_off(b):
        return torch.bmm(a.to(b.dtype), b, out=out)


def _gather(x: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """``cat(x[i] for i in indices, -1)``: ``x [N, ..., C]``, each index ``[E]`` -> ``[E, ..., len(indices) C]``."""
    if len(indices) == 1:
        return x.index_select(0, indices[0])
    return torch.cat([x.index_select(0, i) for i in indices], dim=-1)


def _rotated_gather(rotation: torch.Tensor, x: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """``rotation[e] @ _gather(x, *indices)[e]``, block by block of edges on the CPU: ``rotation [E, K, F]``,
    ``x [N, F, C]`` -> ``[E, K, len(indices) C]``."""
    num_edges, width = indices[0].shape[0], len(indices) * x.shape[-1]
    blocks = edge_blocks(num_edges, len(indices) * x[0].numel() * x.element_size(), x.device)
    if len(blocks) == 1:  # no out=: autograd and the compiler refuse it
        return _bmm(rotation, _gather(x, *indices))
    out = x.new_empty(num_edges, rotation.shape[1], width)
    for rows in blocks:
        _bmm(rotation[rows], _gather(x, *(i[rows] for i in indices)), out=out[rows])
    return out


def _gather_pairs(x, source, target, rotation):
    if rotation is None:
        return _gather(x, source, target)  # [E, F, 2C]
    return _rotated_gather(rotation, x.to(matmul_dtype(x)), source, target)  # [E, K, 2C]


def _rotated_scatter_(outs: tuple, rotation: torch.Tensor, src: torch.Tensor, indices: tuple) -> None:
    """``outs[j][indices[j][e]] += rotation[e] @ src[e]`` for each ``j`` (a ``bmm`` in ``src``'s dtype,
    summed in that of ``outs``), block by block of edges on the CPU: ``rotation [E, F, K]``,
    ``src [E, K, C]``, each of ``outs`` ``[N, F, C]``."""
    row_bytes = rotation.shape[1] * src.shape[-1] * src.element_size()
    for rows in edge_blocks(src.shape[0], row_bytes, src.device):
        rotated = _bmm(rotation[rows], src[rows]).to(outs[0].dtype)
        for out, index in zip(outs, indices):
            out.index_add_(0, index[rows], rotated)


def _scatter_sum(src, index, size, rotation):
    sum_dtype = accumulation_dtype(src)
    if rotation is None:
        return src.new_zeros(size, *src.shape[1:], dtype=sum_dtype).index_add_(0, index, src.to(sum_dtype))
    out = src.new_zeros(size, rotation.shape[1], src.shape[-1], dtype=sum_dtype)
    _rotated_scatter_((out,), rotation, src.to(matmul_dtype(src)), (index,))
    return out  # [size, F, C]


class _GatherPairs(torch.autograd.Function):
    """:func:`gather_pairs` keeping only the indices (and rotations); differentiates ``x`` only."""

    @staticmethod
    def forward(ctx, x, source, target, rotation):
        ctx.save_for_backward(source, target, rotation)
        ctx.num_nodes = x.shape[0]
        return _gather_pairs(x, source, target, rotation)

    @staticmethod
    def backward(ctx, grad):
        source, target, rotation = ctx.saved_tensors
        grad, channels = grad.contiguous(), grad.shape[-1] // 2
        pair_shape = grad.shape[1:] if rotation is None else (rotation.shape[2], grad.shape[2])
        # by source, by target: [2, N, F, 2C]
        sums = grad.new_zeros(2, ctx.num_nodes, *pair_shape, dtype=accumulation_dtype(grad))
        if rotation is None:
            grad = grad.to(sums.dtype)
            sums[0].index_add_(0, source, grad)
            sums[1].index_add_(0, target, grad)
        else:
            _rotated_scatter_((sums[0], sums[1]), rotation.transpose(1, 2), grad, (source, target))
        return sums[0, ..., :channels] + sums[1, ..., channels:], None, None, None


class _ScatterSum(torch.autograd.Function):
    """:func:`scatter_sum` keeping only the indices (and rotations); differentiates ``src`` only."""

    @staticmethod
    def forward(ctx, src, index, size, rotation):
        ctx.save_for_backward(index, rotation)
        ctx.matmul_dtype = matmul_dtype(src)
        return _scatter_sum(src, index, size, rotation)

    @staticmethod
    def backward(ctx, grad):
        index, rotation = ctx.saved_tensors
        if rotation is None:
            return grad.index_select(0, index), None, None, None
        grad = grad.to(ctx.matmul_dtype)  # the forward's bmm dtype, not the float32 of the sum
        return _rotated_gather(rotation.transpose(1, 2), grad, index), None, None, None  # [E, K, C]


def segment_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[i] = sum of src[e] over e with index[e] == i``: ``src [E, ...]``, ``index [E]`` -> ``[size, ...]``
    (no rotation, any trailing shape; :func:`scatter_sum` is the edge-message one)."""
    return src.new_zeros(size, *src.shape[1:]).index_add_(0, index, src)


def segment_mean(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """The mean of the rows of ``src [E, ...]`` that share ``index [E]`` -> ``[size, ...]``; 0 where none."""
    count = torch.bincount(index, minlength=size).clamp_(min=1).to(src.dtype)
    return segment_sum(src, index, size) / count.view(-1, *([1] * (src.dim() - 1)))


def segment_softmax(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax of ``src [E, H]`` over the rows that share ``index [E]`` (the edges into one atom): the
    attention weights of EquiformerV2's graph attention (Sec. 3.2). Each group's maximum, taken without
    gradient, is subtracted first, as it cancels; ``1e-16`` keeps empty sums finite."""
    rows = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    maximum = src.new_full((size, *src.shape[1:]), float("-inf")).scatter_reduce_(0, rows, src.detach(), "amax")
    out = (src - maximum[index]).exp()
    return out / (segment_sum(out, index, size)[index] + 1e-16)  # [E, H]
