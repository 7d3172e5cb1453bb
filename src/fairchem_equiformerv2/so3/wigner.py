"""Wigner-D matrices of a batch of rotations, all degrees up to lmax at once, in e3nn's real basis.

``D(R)`` (block-diagonal over degrees ``l = 0..lmax``) is computed from the Euler angles of ``R``
(e3nn's Y-X-Y convention) as ``D(R) = Z(alpha) J Z(beta) J Z(gamma)``: ``Z`` rotates about e3nn's
polar axis, which rotates each ``(m, -m)`` pair of a degree by the angle ``m * angle``, and
``J = D(x <-> y swap)`` turns a rotation about the polar axis into one about ``x``. ``J`` is taken
from e3nn once per ``lmax``. Multiplying by ``Z`` is elementwise (each row or column mixes with its
``-m`` partner), so the per-edge work is cos/sin, a few elementwise products and one matmul by the
constant ``J``, for all degrees at once: the edge rotations of a forward pass (``rotation.py``) take
128 operators whatever ``lmax``, 64 of them for the Euler angles (a loop over degrees took 328 at
lmax 4 and 428 at lmax 6, each a kernel launch on a GPU); much cheaper than e3nn's matrix exponential.
``D^1(R) = R`` in this basis.

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


def euler_angles(rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler angles ``(alpha, beta, gamma)``, each ``[...]``, with
    ``e3nn.o3.angles_to_matrix(alpha, beta, gamma) == rotation [..., 3, 3]``."""
    alpha, beta = o3.xyz_to_angles(rotation[..., :, 1])
    rest = o3.angles_to_matrix(alpha, beta, torch.zeros_like(alpha)).transpose(-1, -2) @ rotation
    gamma = torch.atan2(rest[..., 0, 2], rest[..., 0, 0])
    return alpha, beta, gamma


def wigner_d(rotation: torch.Tensor, lmax: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The block-diagonal Wigner-D of ``rotation [E, 3, 3]`` for degrees ``0..lmax``, in the rotation's
    dtype: ``[E, F, F]`` with ``F = (lmax+1)**2`` (l-major), or only the rows ``rows [K]``: ``[E, K, F]``."""
    frequency, partner, swap = (t.to(rotation.device) for t in _tables(lmax))
    frequency, swap = frequency.to(rotation.dtype), swap.to(rotation.dtype)
    if rows is None:
        rows = torch.arange(swap.shape[0], device=rotation.device)
    phases = [angle[:, None] * frequency for angle in euler_angles(rotation)]  # alpha, beta, gamma: [E, F]
    (cos_a, sin_a), (cos_b, sin_b), (cos_g, sin_g) = ((torch.cos(p), torch.sin(p)) for p in phases)
    # (Z M)[i] = cos_i M[i] + sin_i M[partner(i)];  (M Z)[:, j] = M[:, j] cos_j + M[:, partner(j)] sin_partner(j)
    d = cos_a[:, rows, None] * swap[rows] + sin_a[:, rows, None] * swap[partner[rows]]  # Z(alpha) J
    d = d * cos_b[:, None, :] + d[:, :, partner] * sin_b[:, None, partner]  # ... Z(beta)
    d = d @ swap  # ... J
    return d * cos_g[:, None, :] + d[:, :, partner] * sin_g[:, None, partner]  # ... Z(gamma)  [E, K, F]


def wigner_d_blocks(rotation: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """The diagonal blocks of :func:`wigner_d`: a list over ``l = 0..lmax`` of ``[E, 2l+1, 2l+1]``."""
    d = wigner_d(rotation, lmax)
    return [d[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] for l in range(lmax + 1)]


@lru_cache(maxsize=None)
def _tables(lmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the l-major coefficients of degrees ``0..lmax``, ``F = (lmax+1)**2`` of them: the frequency
    ``[F]`` (float64) by which ``Z`` turns each (``l, l-1, ..., -l`` within a degree), the index
    ``[F]`` of its partner in the same degree (the coefficient ``Z`` mixes it with), and ``J`` (the
    block-diagonal swap matrix, ``[F, F]`` float64)."""
    frequency = torch.cat([torch.arange(l, -l - 1, -1, dtype=torch.float64) for l in range(lmax + 1)])
    partner = torch.cat([l * l + torch.arange(2 * l, -1, -1) for l in range(lmax + 1)])
    swap = torch.block_diag(*(_swap_matrix(l) for l in range(lmax + 1)))
    return frequency, partner, swap
