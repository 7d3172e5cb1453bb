"""SiLU on an S2 grid, the pointwise step of the S2 activation (EquiformerV2 Sec. 3.2):
``y = from_grid @ SiLU(to_grid @ x)``, block by block of rows, recomputed in backward.
"""
from __future__ import annotations

import torch
from torch import nn

from .autograd_mode import is_plain, lean_autograd
from .dense import mm, uses_onednn
from .scatter import row_slices
from ..precision import autocast_off

# Rows (edges or atoms) per block of the grid computation. On the CPU a block's grid values
# ([32, P, C]: 5 MB for an 18x18 grid and 128 channels) are reused from one block to the next and
# stay in cache; one grid tensor for all edges (hundreds of MB) costs more in fresh-page faults than
# in arithmetic (measured: 4x slower for 1520 edges). On a GPU, blocks are as large as
# GRID_BLOCK_BYTES_GPU allows: few kernel launches, bounded memory.
GRID_BLOCK_ROWS = 32
GRID_BLOCK_BYTES_GPU = 256 * 2**20


def grid_block_rows(x: torch.Tensor, grid_points: int) -> int:
    """Rows of ``x [N, K, C]`` per block of a ``grid_points``-point grid computation."""
    if x.device.type == "cpu":
        return GRID_BLOCK_ROWS
    return max(GRID_BLOCK_ROWS, GRID_BLOCK_BYTES_GPU // (grid_points * x.shape[-1] * x.element_size()))


def grid_silu(x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
    """``y = from_grid @ SiLU(to_grid @ x)``: ``x [N, K, C]``, ``to_grid [P, K]``, ``from_grid [K', P]``
    -> ``[N, K', C]``, in ``x``'s dtype; memory-lean in training (:class:`_GridSiLU`)."""
    if lean_autograd() and x.requires_grad:
        return _GridSiLU.apply(x, to_grid, from_grid)
    return _grid_silu(x, to_grid, from_grid)  # [N, K', C]


def _grid_silu(x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
    """:func:`grid_silu` block by block over ``N`` (no autograd), or in plain torch under
    ``torch.compile`` and :func:`.autograd_mode.plain_autograd`."""
    # autocast off: in x's dtype (bf16 when autocast made x bf16), into preallocated tensors, which
    # autocast does not handle
    with autocast_off(x):
        to_grid, from_grid = to_grid.to(x.dtype), from_grid.to(x.dtype)
        if torch.compiler.is_compiling() or is_plain():  # the compiler fuses and plans memory itself
            return from_grid @ nn.functional.silu(to_grid @ x)
        return _grid_silu_blocks(x, to_grid, from_grid)


def _grid_silu_blocks(x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor) -> torch.Tensor:
    n, _, channels = x.shape
    layout, points = _block_layout(x), to_grid.shape[0]
    block = grid_block_rows(x, points)
    out = x.new_empty(n, from_grid.shape[0], channels)
    grid = layout.buffer(x, min(block, n), points)
    for rows in row_slices(n, block):
        g = layout.to_grid(to_grid, x[rows], grid)
        nn.functional.silu(g, inplace=True)
        layout.from_grid(from_grid, g, out=out[rows])
    return out


def grid_silu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor
) -> torch.Tensor:
    """The gradient of :func:`grid_silu` with respect to ``x``: ``[N, K, C]``, block by block."""
    with autocast_off(x):
        grad_out, to_grid, from_grid = grad_out.to(x.dtype), to_grid.to(x.dtype), from_grid.to(x.dtype)
        if torch.compiler.is_compiling():
            return _grid_silu_backward_rows(grad_out, x, to_grid, from_grid)
        return _grid_silu_backward(grad_out, x, to_grid, from_grid)


def _grid_silu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor
) -> torch.Tensor:
    n, _, channels = x.shape
    layout, points = _block_layout(x), to_grid.shape[0]
    block = grid_block_rows(x, points)
    grad_x = torch.empty_like(x)
    grid, grad_grid = layout.buffer(x, min(block, n), points), layout.buffer(x, min(block, n), points)
    for rows in row_slices(n, block):
        g = layout.to_grid(to_grid, x[rows], grid)
        grad_g = layout.to_grid(from_grid.T, grad_out[rows], grad_grid)
        _silu_backward(grad_g, g, out=grad_g)
        layout.from_grid(to_grid.T, grad_g, out=grad_x[rows])
    return grad_x


class _PointsByChannels:
    """A block's grid values as ``[B, P, C]``: ``matrix @ x`` batched over the block's rows, into
    buffers reused from block to block."""

    @staticmethod
    def buffer(x: torch.Tensor, rows: int, points: int) -> torch.Tensor:
        """``[rows, points, C]`` for ``x [N, K, C]``."""
        return x.new_empty(rows, points, x.shape[2])

    @staticmethod
    def to_grid(matrix: torch.Tensor, x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """``matrix [P, K] @ x [B, K, C]`` -> ``[B, P, C]`` (in ``buffer``)."""
        return torch.matmul(matrix, x, out=buffer[: x.shape[0]])

    @staticmethod
    def from_grid(matrix: torch.Tensor, grid: torch.Tensor, out: torch.Tensor) -> None:
        """``out [B, K, C] = matrix [K, P] @ grid [B, P, C]``."""
        torch.matmul(matrix, grid, out=out)


class _ChannelsByPoints:
    """A block's grid values as ``[B C, P]``, each product one 2D matmul through :func:`.dense.mm`
    (oneDNN on the CPU, which has no batched form); only the ``K``-row coefficient blocks are
    transposed, in and out. On this project's CPUs the grid step is about 30% faster this way."""

    @staticmethod
    def buffer(x: torch.Tensor, rows: int, points: int) -> None:
        return None  # oneDNN has no out=: each product allocates (reused by malloc: see runtime.py)

    @staticmethod
    def to_grid(matrix: torch.Tensor, x: torch.Tensor, buffer: None) -> torch.Tensor:
        """``matrix [P, K]``, ``x [B, K, C]`` -> ``[B C, P]``."""
        return mm(x.transpose(1, 2).reshape(-1, x.shape[1]), matrix.T)

    @staticmethod
    def from_grid(matrix: torch.Tensor, grid: torch.Tensor, out: torch.Tensor) -> None:
        """``out [B, K, C] = matrix [K, P] @ grid``, ``grid [B C, P]``."""
        out.copy_(mm(grid, matrix.T).view(out.shape[0], out.shape[2], -1).transpose(1, 2))


def _block_layout(x: torch.Tensor):
    return _ChannelsByPoints if uses_onednn(x) else _PointsByChannels


def _grid_silu_backward_rows(
    grad_out: torch.Tensor, x: torch.Tensor, to_grid: torch.Tensor, from_grid: torch.Tensor
) -> torch.Tensor:
    """The gradient for all rows ``x [N, K, C]`` at once."""
    grad_g = _silu_backward(torch.matmul(from_grid.T, grad_out), torch.matmul(to_grid, x))  # [N, P, C]
    return torch.matmul(to_grid.T, grad_g)  # [N, K, C]


def _silu_backward(grad: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * d SiLU(g) / dg`` in one pass (torch's fused kernel, elementwise, so ``out`` may be ``grad``)."""
    if out is None:
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)


class _GridSiLU(torch.autograd.Function):
    """:func:`grid_silu` that keeps only ``x`` for the backward pass (and differentiates only ``x``: the
    grid matrices are constants).

    The grid values ``[N, P, C]`` are ``P / K`` times larger than the coefficients (17x for lmax 4,
    mmax 2 on an 18x18 grid); recomputing them in backward instead of storing them (twice: SiLU
    input and output) is what keeps training memory low.
    """

    @staticmethod
    def forward(ctx, x, to_grid, from_grid):
        ctx.save_for_backward(x, to_grid, from_grid)
        return _grid_silu(x, to_grid, from_grid)

    @staticmethod
    def backward(ctx, grad_out):
        x, to_grid, from_grid = ctx.saved_tensors
        return grid_silu_backward(grad_out.contiguous(), x, to_grid, from_grid), None, None
