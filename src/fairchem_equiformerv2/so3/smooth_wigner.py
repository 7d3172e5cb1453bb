"""Wigner-D matrices as polynomials of the rotation matrix: differentiable at every rotation.

:func:`.wigner.wigner_d` goes through Euler angles, whose derivative is singular where the middle
angle is 0 or pi (gimbal lock: here, edges along e3nn's polar axis ``+-y``). Gradient forces need
``dD/dR`` everywhere, so this module computes the same matrices from the defining identity of the
real spherical harmonics, ``Y^l(R p) = D^l(R) Y^l(p)``, on ``S`` fixed sample points ``p``
(rows of ``P [S, 3]``, a Fibonacci lattice):

    D^l(R) = Y^l(P R^T)^T A^l,    A^l = pinv(Y^l(P))^T  [S, 2l+1]

``Y^l`` is a homogeneous polynomial of degree ``l`` (e3nn's, evaluated without normalising the
rotated points, which are unit vectors), so ``D`` is a polynomial in the entries of ``R``: smooth,
with exact derivatives along rotations. ``S = 4 lmax + 4`` points keep ``Y^l(P)``'s condition number
at most 3.5 for ``lmax <= 6`` (``cond`` of the lattice's ``Y^l(P)``, float64).

Costlier than the Euler-angle route (``E S F`` harmonics and an ``[E, K, S] @ [S, F]`` product per
forward pass), so the backbone uses it only when it differentiates the energy with respect to the
geometry (``model/conservative.py``).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from e3nn import o3

from .layout import degree_of_coefficients


@lru_cache(maxsize=None)
def _tables(lmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For degrees ``0..lmax`` (``F = (lmax+1)**2`` coefficients, l-major), float64: the sample points
    ``P [S, 3]``, ``A [S, F]`` (each degree's ``pinv(Y^l(P))^T`` in its columns) and the block mask
    ``[F, F]`` (1 where row and column have the same degree)."""
    s = 4 * lmax + 4
    i = torch.arange(s, dtype=torch.float64) + 0.5
    polar, azimuth = torch.acos(1 - 2 * i / s), torch.pi * (1 + 5**0.5) * i
    points = torch.stack(
        (torch.cos(azimuth) * torch.sin(polar), torch.cos(polar), torch.sin(azimuth) * torch.sin(polar)), dim=1
    )
    columns = [torch.linalg.pinv(o3.spherical_harmonics(l, points, normalize=True)).T for l in range(lmax + 1)]
    degree = degree_of_coefficients(lmax)
    mask = (degree[:, None] == degree[None, :]).to(torch.float64)
    return points, torch.cat(columns, dim=1).contiguous(), mask


def smooth_wigner_d(rotation: torch.Tensor, lmax: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The block-diagonal Wigner-D of ``rotation [E, 3, 3]`` for degrees ``0..lmax`` (the matrices of
    :func:`.wigner.wigner_d`, to rounding), in the rotation's dtype and differentiable with respect to
    it everywhere: ``[E, F, F]`` with ``F = (lmax+1)**2`` (l-major), or only the rows ``rows [K]``:
    ``[E, K, F]``."""
    points, columns, mask = (t.to(device=rotation.device, dtype=rotation.dtype) for t in _tables(lmax))
    if rows is not None:
        mask = mask[rows]
    rotated = torch.einsum("sj,eij->esi", points, rotation)  # R p for every sample point: [E, S, 3]
    harmonics = o3.spherical_harmonics(list(range(lmax + 1)), rotated, normalize=False)  # [E, S, F]
    if rows is not None:
        harmonics = harmonics[:, :, rows]
    return (harmonics.transpose(1, 2) @ columns) * mask  # [E, K, F]
