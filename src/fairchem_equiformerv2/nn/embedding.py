"""Input embeddings of EquiformerV2 (Sec. 3.1 of the paper, "edge-degree embedding").

Node features start as an atom-type embedding in their ``l = 0`` channels. The edge-degree embedding
then adds, for every atom, the sum over its incoming edges of a radial-MLP output placed in the
``m = 0`` coefficients of the edge frame and rotated back, divided by the average degree: an
equivariant summary of the neighbourhood's geometry before the first block.
"""
from __future__ import annotations

import torch
from torch import nn

from ..so3.layout import num_coefficients
from ..so3.rotation import EdgeRotation
from .precision import autocast_off
from .radial import EdgeTypeEmbedding, RadialMLP
from .ops.scatter import scatter_sum


class AtomEmbedding(nn.Module):
    """``atomic_numbers [N]`` -> ``[N, (lmax+1)**2, channels]`` with only ``l = 0`` non-zero."""

    def __init__(self, max_num_elements: int, channels: int, lmax: int):
        super().__init__()
        self.lmax = lmax
        self.sphere_embedding = nn.Embedding(max_num_elements, channels)

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        scalars = self.sphere_embedding(atomic_numbers).unsqueeze(1)  # [N, 1, C]
        return nn.functional.pad(scalars, (0, 0, 0, num_coefficients(self.lmax) - 1))


class EdgeDegreeEmbedding(nn.Module):
    """Sum over incoming edges of rotated radial features.

    Args:
        sphere_channels: channels of the node features.
        lmax: degree of the node features.
        radial_channels: ``[basis, hidden, hidden]`` sizes of the radial MLP.
        max_num_elements: source/target atom-type embedding table size, ``None`` for none.
        rescale_factor: the sum is divided by it (the average degree).

    Forward: atomic numbers ``[N]``, radial features ``[E, basis]``, ``edge_index [2, E]``, the
    edges' rotations -> ``[N, (lmax+1)**2, sphere_channels]``.
    """

    def __init__(
        self,
        sphere_channels: int,
        lmax: int,
        radial_channels: list[int],
        max_num_elements: int | None,
        rescale_factor: float,
    ):
        super().__init__()
        self.sphere_channels, self.lmax, self.rescale_factor = sphere_channels, lmax, rescale_factor
        radial_channels = list(radial_channels)
        self.edge_types = None
        if max_num_elements is not None:
            self.edge_types = EdgeTypeEmbedding(max_num_elements, radial_channels[-1])
            radial_channels[0] += 2 * radial_channels[-1]
        self.rad_func = RadialMLP([*radial_channels, (lmax + 1) * sphere_channels])

    def forward(
        self,
        atomic_numbers: torch.Tensor,
        edge_features: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
    ) -> torch.Tensor:
        if self.edge_types is not None:
            edge_features = self.edge_types(edge_features, atomic_numbers, edge_index)
        m0 = self.rad_func(edge_features).view(-1, self.lmax + 1, self.sphere_channels)  # [E, lmax+1, C]
        # The m = 0 coefficients are the first lmax + 1 rows of the edge layout. The rotation in float32
        # also under autocast (see precision.py): once per forward, the start of every atom's features.
        with autocast_off(m0):
            summed = scatter_sum(m0, edge_index[1], atomic_numbers.shape[0], rotation.from_edge[:, :, : self.lmax + 1])
        return summed / self.rescale_factor  # [N, F, C]

    def extra_repr(self) -> str:
        return f"sphere_channels={self.sphere_channels}, lmax={self.lmax}, rescale_factor={self.rescale_factor}"
