"""Invariant edge features: Gaussian radial basis and the radial MLP.

EquiformerV2 (Sec. 3.1) expands each edge length in Gaussians and turns the expansion (optionally
concatenated with source/target atom-type embeddings) into the per-edge weights of the SO(2)
convolutions with a small MLP (Linear -> LayerNorm -> SiLU, twice, -> Linear).
"""
from __future__ import annotations

import torch
from torch import nn

from .ops.dense import Linear
from .precision import autocast_off


class GaussianBasis(nn.Module):
    """``exp(-(d - mu_k)^2 / (2 (width * spacing)^2))`` for ``num_basis`` centres ``mu_k`` evenly
    spaced on ``[start, stop]``. Shapes: ``[E]`` -> ``[E, num_basis]``."""

    def __init__(self, start: float, stop: float, num_basis: int, width: float):
        super().__init__()
        self.start, self.stop, self.num_basis, self.width = start, stop, num_basis, width
        offset = torch.linspace(start, stop, num_basis)
        self.coeff = -0.5 / (width * (offset[1] - offset[0])).item() ** 2
        self.register_buffer("offset", offset)  # saved: fairchem checkpoints carry it

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (distance.view(-1, 1) - self.offset.view(1, -1)) ** 2)  # [E, num_basis]

    def extra_repr(self) -> str:
        return f"start={self.start}, stop={self.stop}, num_basis={self.num_basis}, width={self.width}"


class RadialMLP(nn.Module):
    """MLP over invariant edge features: ``channels = [in, hidden..., out]``; each hidden layer is
    Linear -> LayerNorm -> SiLU. Shapes: ``[E, in]`` -> ``[E, out]``.

    Autocast off: it computes in its input's dtype (float32 edge features under autocast): its
    outputs scale every message, and its bf16 weights would cost much of bf16's accuracy for a small
    part of the work (see ``precision.py``).
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        self.channels = list(channels)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(Linear(c_in, c_out))
            if i < len(channels) - 2:
                layers += [nn.LayerNorm(c_out), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x):
            return self.net(x)  # [E, channels[-1]]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """All layers but the last: ``[E, in]`` -> ``[E, channels[-2]]``."""
        with autocast_off(x):
            return self.net[:-1](x)

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(channels={self.channels})"


class EdgeTypeEmbedding(nn.Module):
    """Concatenates the radial basis of an edge with embeddings of its source and target atom types:
    ``[E, B]`` -> ``[E, B + 2 * channels]``."""

    def __init__(self, max_num_elements: int, channels: int):
        super().__init__()
        self.source_embedding = nn.Embedding(max_num_elements, channels)
        self.target_embedding = nn.Embedding(max_num_elements, channels)
        nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)

    def forward(self, radial: torch.Tensor, atomic_numbers: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        source = self.source_embedding(atomic_numbers[edge_index[0]])
        target = self.target_embedding(atomic_numbers[edge_index[1]])
        return torch.cat((radial, source, target), dim=1)  # [E, B + 2 * channels]
