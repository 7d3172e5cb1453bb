"""Wigner-D matrices of a batch of rotations, per degree, in e3nn's real basis.

``D^l(R)`` is computed from the Euler angles of ``R`` (e3nn's Y-X-Y convention) as
``D^l(R) = Z(alpha) J Z(beta) J Z(gamma)``: ``Z`` rotates about e3nn's polar axis, which is a
rotation of each ``(m, -m)`` pair, and ``J = D^l(x <-> y swap)`` turns a rotation about the polar
axis into one about ``x``. ``J`` is taken from e3nn once per degree; the per-edge work is cos/sin and
small batched matmuls, much cheaper than e3nn's matrix exponential. ``D^1(R) = R`` in this basis.

``J`` is solved from e3nn's (polynomial, exact) real spherical harmonics, ``Y^l(R x) = D^l(R) Y^l(x)``
on a few sample points, which keeps float64 runs exact to ~1e-15 (e3nn's own ``D_from_matrix``
carries float32-level error).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from e3nn import o3

_SWAP_XY = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)


@lru_cache(maxsize=None)
def _swap_matrix(l: int) -> torch.Tensor:
    """``[2l+1, 2l+1]`` float64: ``D^l`` of the x <-> y swap (an involution)."""
    points = torch.randn(4 * l + 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(l))
    y = o3.spherical_harmonics(l, points, normalize=True)  # [P, 2l+1]
    y_rotated = o3.spherical_harmonics(l, points @ _SWAP_XY.T, normalize=True)
    # y_rotated = y @ D^T  ->  D^T = lstsq(y, y_rotated)
    return torch.linalg.lstsq(y, y_rotated).solution.T.contiguous()


def polar_rotation(angle: torch.Tensor, l: int) -> torch.Tensor:
    """``[..., 2l+1, 2l+1]``: ``D^l`` of a rotation by ``angle [...]`` about e3nn's polar (y) axis."""
    frequencies = torch.arange(l, -l - 1, -1, dtype=angle.dtype, device=angle.device)
    phase = frequencies * angle[..., None]  # [..., 2l+1]
    out = torch.diag_embed(torch.cos(phase))
    anti = torch.diag_embed(torch.sin(phase)).flip(-1)  # sin on the anti-diagonal
    return out + anti


def euler_angles(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler angles ``(alpha, beta, gamma)``, each ``[...]``, with
    ``e3nn.o3.angles_to_matrix(alpha, beta, gamma) == rotation [..., 3, 3]``."""
    alpha, beta = o3.xyz_to_angles(rotation[..., :, 1])
    rest = o3.angles_to_matrix(alpha, beta, torch.zeros_like(alpha)).transpose(-1, -2) @ rotation
    gamma = torch.atan2(rest[..., 0, 2], rest[..., 0, 0])
    return alpha, beta, gamma


def wigner_d_blocks(rotation: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """Per-degree Wigner-D blocks of ``rotation [E, 3, 3]``.

    Returns a list over ``l = 0..lmax`` of ``[E, 2l+1, 2l+1]`` tensors in the rotation's dtype.
    """
    alpha, beta, gamma = euler_angles(rotation)
    blocks = []
    for l in range(lmax + 1):
        swap = _swap_matrix(l).to(dtype=rotation.dtype, device=rotation.device)
        blocks.append(
            polar_rotation(alpha, l) @ swap @ polar_rotation(beta, l) @ swap @ polar_rotation(gamma, l)
        )
    return blocks


def wigner_d(rotation: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[E, (lmax+1)**2, (lmax+1)**2]``: the block-diagonal Wigner-D of ``rotation [E, 3, 3]``."""
    return _block_diagonal(wigner_d_blocks(rotation, lmax))


def _block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Batched block-diagonal matrix from ``[E, n_i, n_i]`` blocks."""
    size = sum(b.shape[-1] for b in blocks)
    out = blocks[0].new_zeros(blocks[0].shape[0], size, size)
    start = 0
    for b in blocks:
        n = b.shape[-1]
        out[:, start : start + n, start : start + n] = b
        start += n
    return out
