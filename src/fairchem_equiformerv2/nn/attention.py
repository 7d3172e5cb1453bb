"""Equivariant graph attention of EquiformerV2 (Sec. 3.1 and Fig. 1 of the paper).

For every edge ``s -> t`` the features of both atoms are concatenated, rotated into the edge frame
and passed through an SO(2) convolution modulated by the edge's radial features. Its invariant
``m = 0`` extra outputs give the attention logit per head (with *attention re-normalisation*: a
LayerNorm before the smooth leaky ReLU and the dot product with ``a``) and, for the separable S2 or
gate activation, the invariant inputs of that activation. A second SO(2) convolution makes the value,
which is weighted by the softmax over the edges into ``t``, rotated back and summed at ``t``; an
equivariant linear map projects the heads to the output channels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..so3.grid import S2Grid
from ..so3.layout import EdgeLayout, degree_of_coefficients
from ..so3.rotation import EdgeRotation
from .activation import GateActivation, S2Activation, SeparableS2Activation, SmoothLeakyReLU
from .linear import SO3Linear
from .precision import at_least_float32, autocast_off
from .radial import EdgeTypeEmbedding, RadialMLP
from .ops.recompute import recomputed_in_backward
from .ops.scatter import gather_pairs, scatter_sum, segment_softmax
from .so2_conv import SO2Convolution

ACTIVATIONS = ("separable_s2", "s2", "gate")


class GraphAttention(nn.Module):
    """SO(2) equivariant graph attention.

    Args:
        sphere_channels: channels of the node features.
        hidden_channels: channels between the two SO(2) convolutions.
        num_heads, alpha_channels, value_channels: attention heads and their logit/value widths.
        output_channels: channels of the result.
        layout: lmax/mmax of the edge frame.
        radial_channels: ``[basis, hidden, hidden]`` sizes of the radial MLP.
        max_num_elements: size of the source/target atom-type embedding tables; ``None`` for none.
        activation: ``"separable_s2"``, ``"s2"`` or ``"gate"``.
        use_m_share_rad: one radial weight per degree and channel (applied before the rotation)
            instead of per-coefficient weights inside the first SO(2) convolution.
        use_attn_renorm: LayerNorm on the logit features (attention re-normalisation).
        alpha_drop: dropout on the attention weights.
        grid_resolution: S2 grid size override.
        recompute_messages: keep the atoms' features for backward instead of the edge messages made
            from them, recomputed there (:mod:`.recompute`); off inside activation checkpointing.

    Forward: node features ``x [N, (lmax+1)**2, sphere_channels]``, atomic numbers ``[N]``, radial
    features ``[E, basis]``, ``edge_index [2, E]`` (source, target), the edges' rotations ->
    ``[N, (lmax+1)**2, output_channels]``.
    """

    def __init__(
        self,
        sphere_channels: int,
        hidden_channels: int,
        num_heads: int,
        alpha_channels: int,
        value_channels: int,
        output_channels: int,
        layout: EdgeLayout,
        radial_channels: list[int],
        max_num_elements: int | None,
        activation: str = "separable_s2",
        use_m_share_rad: bool = False,
        use_attn_renorm: bool = True,
        alpha_drop: float = 0.0,
        grid_resolution: int | None = None,
        recompute_messages: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"attention activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.sphere_channels, self.hidden_channels, self.output_channels = sphere_channels, hidden_channels, output_channels
        self.num_heads, self.alpha_channels, self.value_channels = num_heads, alpha_channels, value_channels
        self.layout, self.activation, self.use_m_share_rad = layout, activation, use_m_share_rad
        self.recompute_messages = recompute_messages and not use_m_share_rad
        lmax = layout.lmax

        radial_channels = list(radial_channels)
        self.edge_types = None
        if max_num_elements is not None:
            self.edge_types = EdgeTypeEmbedding(max_num_elements, radial_channels[-1])
            radial_channels[0] += 2 * radial_channels[-1]

        gate_channels = {"separable_s2": hidden_channels, "s2": 0, "gate": lmax * hidden_channels}[activation]
        self.gate_channels = gate_channels
        if use_m_share_rad:
            self.rad_func = RadialMLP([*radial_channels, 2 * sphere_channels * (lmax + 1)])
            self.register_buffer("degree", degree_of_coefficients(lmax), persistent=False)
        self.so2_conv_1 = SO2Convolution(
            2 * sphere_channels,
            hidden_channels,
            layout,
            radial_channels=None if use_m_share_rad else radial_channels,
            extra_m0_channels=num_heads * alpha_channels + gate_channels,
        )
        if activation == "gate":
            self.act = GateActivation(layout.degree, lmax, hidden_channels)
        else:
            grid = S2Grid(lmax, layout.mmax, layout.index, layout.rescale, grid_resolution)
            self.act = SeparableS2Activation(grid) if activation == "separable_s2" else S2Activation(grid)

        self.alpha_norm = nn.LayerNorm(alpha_channels) if use_attn_renorm else nn.Identity()
        self.alpha_act = SmoothLeakyReLU(0.2)
        bound = 1.0 / math.sqrt(alpha_channels)
        self.alpha_dot = nn.Parameter(torch.empty(num_heads, alpha_channels).uniform_(-bound, bound))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None

        self.so2_conv_2 = SO2Convolution(hidden_channels, num_heads * value_channels, layout)
        self.proj = SO3Linear(num_heads * value_channels, output_channels, lmax=lmax)

    def forward(
        self,
        x: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_features: torch.Tensor,
        edge_index: torch.Tensor,
        rotation: EdgeRotation,
    ) -> torch.Tensor:
        source, target = edge_index
        if self.edge_types is not None:
            edge_features = self.edge_types(edge_features, atomic_numbers, edge_index)

        if self.use_m_share_rad:
            weight = self.rad_func(edge_features).view(-1, self.layout.lmax + 1, 2 * self.sphere_channels)
            message = rotation.rotate(gather_pairs(x, source, target) * weight[:, self.degree])
        else:
            message = gather_pairs(x, source, target, rotation.to_edge)  # [E, K, 2C]

        def recomputed_message(dtype=message.dtype):  # as above, in the forward's dtype
            with autocast_off(x):
                return gather_pairs(x.to(dtype), source, target, rotation.to_edge)

        with recomputed_in_backward(message, recomputed_message, enabled=self.recompute_messages):
            message, invariants = self.so2_conv_1(message, edge_features)  # [E, K, H], [E, heads*A + gates]
        logits, gates = invariants.split([self.num_heads * self.alpha_channels, self.gate_channels], dim=1)
        message = self.act(message) if self.activation == "s2" else self.act(gates, message)
        value = self.so2_conv_2(message)  # [E, K, heads * V]

        with autocast_off(logits):  # the logits in float32 (see precision.py): a small part of the work
            alpha = self.alpha_act(self.alpha_norm(at_least_float32(logits).view(-1, self.num_heads, self.alpha_channels)))
            alpha = torch.einsum("eha,ha->eh", alpha, self.alpha_dot)
        alpha = segment_softmax(alpha, target, x.shape[0])  # [E, heads]
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        value = value.view(value.shape[0], value.shape[1], self.num_heads, self.value_channels) * alpha[:, None, :, None]
        value = scatter_sum(value.flatten(2), target, x.shape[0], rotation.from_edge)  # [N, F, heads * V]
        with autocast_off(value):  # node-level work in float32 (see precision.py)
            return self.proj(value)  # [N, F, output_channels]

    def extra_repr(self) -> str:
        return (
            f"sphere_channels={self.sphere_channels}, hidden_channels={self.hidden_channels}, "
            f"num_heads={self.num_heads}, alpha_channels={self.alpha_channels}, value_channels={self.value_channels}, "
            f"output_channels={self.output_channels}, lmax={self.layout.lmax}, mmax={self.layout.mmax}, "
            f"activation={self.activation!r}, use_m_share_rad={self.use_m_share_rad}"
        )



