"""One EquiformerV2 block (Fig. 1 of the paper): pre-norm graph attention and feed-forward
network, each a residual branch with drop path and projection dropout."""
from __future__ import annotations

import torch
from torch import nn

from ..so3.rotation import EdgeRotation
from .attention import GraphAttention
from .feed_forward import FeedForward
from .norm import make_norm


class GraphDropPath(nn.Module):
    """Stochastic depth per structure: in training, zeroes a residual branch for whole graphs with
    probability ``drop_prob`` and rescales the rest. ``x [N, ...]``, ``batch [N]`` -> like ``x``."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = (keep + torch.rand(num_graphs, dtype=x.dtype, device=x.device)).floor_() / keep
        return x * mask[batch].view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ChannelDropout(nn.Module):
    """Equivariant dropout: drops whole channels of a node (all coefficients together).
    ``x [N, F, C]`` -> ``[N, F, C]``."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.dropout = nn.Dropout(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * self.dropout(x.new_ones(x.shape[0], 1, x.shape[2]))


class EquiformerV2Block(nn.Module):
    """``x = x + drop(attention(norm_1(x)))``, then ``x = x + drop(ffn(norm_2(x)))``.

    Forward: node features ``[N, F, C]``, atomic numbers ``[N]``, radial features ``[E, basis]``,
    ``edge_index [2, E]``, the edges' rotations, ``batch [N]`` and the number of graphs ->
    ``[N, F, C]``.
    """

    def __init__(
        self,
        attention: GraphAttention,
        ffn: FeedForward,
        norm_type: str,
        drop_path_rate: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        lmax, channels = attention.layout.lmax, attention.sphere_channels
        self.norm_1 = make_norm(norm_type, lmax, channels)
        self.ga = attention
        self.norm_2 = make_norm(norm_type, lmax, channels)
        self.ffn = ffn
        self.drop_path = GraphDropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.proj_drop = ChannelDropout(proj_drop) if proj_drop > 0 else None

    def _dropped(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        if self.drop_path is not None:
            x = self.drop_path(x, batch, num_graphs)
        if self.proj_drop is not None:
            x = self.proj_drop(x)
        return x

    def forward(
        self,
        x: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_features: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
        batch: torch.Tensor,
        num_graphs: int,
    ) -> torch.Tensor:
        h = self.ga(self.norm_1(x), atomic_numbers, edge_features, edge_index, rotation)
        x = x + self._dropped(h, batch, num_graphs)
        h = self.ffn(self.norm_2(x))
        return x + self._dropped(h, batch, num_graphs)  # [N, F, C]
