"""Projection between spherical-harmonic coefficients and points on an S2 grid.

EquiformerV2's S2 activation (Sec. 3.2 of the paper, after Cohen et al.'s spherical CNNs) samples
each channel's function on a latitude/longitude grid, applies a pointwise nonlinearity, and
projects back. The sampling and quadrature matrices come from e3nn's ``ToS2Grid``/``FromS2Grid``
(``normalization="component"``); here they are flattened to ``[points, coefficients]`` and their
columns ordered as the layout of the features they act on, so no reshuffle happens at run time.
Degrees above ``mmax`` carry the layout's rescale factor (see :mod:`.layout`).
"""
from __future__ import annotations

import torch
from e3nn.o3 import FromS2Grid, ToS2Grid


def grid_shape(lmax: int, mmax: int, resolution: int | None = None) -> tuple[int, int]:
    """(latitude, longitude) sample counts: ``resolution`` for both when given, else
    ``2 (lmax + 1)`` latitudes and ``2 mmax + 1`` longitudes (``2 mmax + 3`` when ``mmax = lmax``)."""
    if resolution is not None:
        return resolution, resolution
    longitudes = 2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1
    return 2 * (lmax + 1), longitudes


def s2_grid_matrices(
    lmax: int,
    mmax: int,
    columns: torch.Tensor,
    rescale: torch.Tensor,
    resolution: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling and projection matrices for features laid out by ``columns``.

    Args:
        lmax, mmax: degree of the harmonics and order that sets the default grid.
        columns: ``[K]`` l-major coefficient index of each feature row.
        rescale: ``[K]`` factor applied to each feature row (1 where none).
        resolution: grid size override (``grid_resolution`` in configs).

    Returns:
        ``to_grid [P, K]`` and ``from_grid [K, P]`` in float64, ``P = lat * long``.
    """
    shape = grid_shape(lmax, mmax, resolution)
    to_s2 = ToS2Grid(lmax, shape, normalization="component", dtype=torch.float64)
    from_s2 = FromS2Grid(shape, lmax, normalization="component", dtype=torch.float64)
    # sha: [long, m-slot], shb: [m-slot, lat, coeff]  ->  [lat, long, coeff]
    to_grid = torch.einsum("mbi,am->bai", to_s2.shb, to_s2.sha)
    from_grid = torch.einsum("am,mbi->bai", from_s2.sha, from_s2.shb)
    to_grid = to_grid.reshape(-1, to_grid.shape[-1])[:, columns] * rescale
    from_grid = from_grid.reshape(-1, from_grid.shape[-1])[:, columns] * rescale
    return to_grid, from_grid.T.contiguous()


class S2Grid(torch.nn.Module):
    """Samples features ``[N, K, C]`` on an S2 grid ``[N, P, C]`` and projects back.

    Buffers are derived from the configuration, so they are not saved in checkpoints.
    """

    def __init__(self, lmax: int, mmax: int, columns, rescale, resolution: int | None = None):
        super().__init__()
        self.lmax, self.mmax, self.resolution = lmax, mmax, resolution
        to_grid, from_grid = s2_grid_matrices(lmax, mmax, torch.as_tensor(columns), torch.as_tensor(rescale), resolution)
        dtype = torch.get_default_dtype()
        self.register_buffer("to_grid_mat", to_grid.to(dtype), persistent=False)
        self.register_buffer("from_grid_mat", from_grid.to(dtype), persistent=False)

    @property
    def num_points(self) -> int:
        return self.to_grid_mat.shape[0]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, K, C]`` -> ``[N, P, C]``."""
        return torch.matmul(self.to_grid_mat, x)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid [N, P, C]`` -> ``[N, K, C]``."""
        return torch.matmul(self.from_grid_mat, grid)

    def extra_repr(self) -> str:
        lat, lon = grid_shape(self.lmax, self.mmax, self.resolution)
        return f"lmax={self.lmax}, mmax={self.mmax}, grid={lat}x{lon}"
