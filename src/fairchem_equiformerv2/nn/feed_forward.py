"""Feed-forward network of an EquiformerV2 block (Sec. 3.2 and 3.4 of the paper).

``SO3Linear -> nonlinearity -> SO3Linear`` on node features, with one of:

* ``separable_s2`` (the published models): separable S2 activation, its ``l = 0`` input from a linear
  map of the block input's ``l = 0`` channels;
* ``s2``: plain S2 activation;
* ``gate``: gate activation, gates from a linear map of the ``l = 0`` channels;
* ``grid_mlp`` / ``separable_grid_mlp``: project to the S2 grid, a 3-layer pointwise MLP there,
  project back (the separable form takes ``l = 0`` from an MLP of the ``l = 0`` channels instead).
"""
from __future__ import annotations

import torch
from torch import nn

from ..so3.grid import S2Grid
from ..so3.layout import degree_of_coefficients, num_coefficients
from .activation import GateActivation, S2Activation, SeparableS2Activation
from .linear import SO3Linear
from .precision import autocast_off

FFN_ACTIVATIONS = ("separable_s2", "s2", "gate", "grid_mlp", "separable_grid_mlp")


def full_grid(lmax: int, resolution: int | None) -> S2Grid:
    """S2 grid for full l-major features of degree ``lmax``."""
    f = num_coefficients(lmax)
    return S2Grid(lmax, lmax, torch.arange(f), torch.ones(f, dtype=torch.float64), resolution)


class FeedForward(nn.Module):
    """Shapes: ``[N, (lmax+1)**2, sphere_channels]`` -> ``[N, (lmax+1)**2, output_channels]``."""

    def __init__(
        self,
        sphere_channels: int,
        hidden_channels: int,
        output_channels: int,
        lmax: int,
        activation: str = "separable_s2",
        grid_resolution: int | None = None,
    ):
        super().__init__()
        if activation not in FFN_ACTIVATIONS:
            raise ValueError(f"feed-forward activation must be one of {FFN_ACTIVATIONS}, got {activation!r}")
        self.sphere_channels, self.hidden_channels, self.output_channels = sphere_channels, hidden_channels, output_channels
        self.lmax, self.activation = lmax, activation

        self.so3_linear_1 = SO3Linear(sphere_channels, hidden_channels, lmax)
        if activation in ("grid_mlp", "separable_grid_mlp"):
            self.grid = full_grid(lmax, grid_resolution)
            if activation == "separable_grid_mlp":
                self.scalar_mlp = nn.Sequential(nn.Linear(sphere_channels, hidden_channels), nn.SiLU())
            self.grid_mlp = nn.Sequential(
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
                nn.SiLU(),
                nn.Linear(hidden_channels, hidden_channels, bias=False),
            )
        elif activation == "gate":
            self.gating_linear = nn.Linear(sphere_channels, lmax * hidden_channels)
            self.act = GateActivation(degree_of_coefficients(lmax), lmax, hidden_channels)
        elif activation == "separable_s2":
            self.gating_linear = nn.Linear(sphere_channels, hidden_channels)
            self.act = SeparableS2Activation(full_grid(lmax, grid_resolution))
        else:
            self.act = S2Activation(full_grid(lmax, grid_resolution))
        self.so3_linear_2 = SO3Linear(hidden_channels, output_channels, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x):  # node-level work in x's dtype, float32 for the residual stream (see precision.py)
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars = x[:, 0]  # [N, C]
        h = self.so3_linear_1(x)  # [N, F, hidden]
        if self.activation in ("grid_mlp", "separable_grid_mlp"):
            h = self.grid.from_grid(self.grid_mlp(self.grid.to_grid(h)))
            if self.activation == "separable_grid_mlp":
                h = torch.cat((self.scalar_mlp(scalars).unsqueeze(1), h[:, 1:]), dim=1)
        elif self.activation == "s2":
            h = self.act(h)
        else:
            h = self.act(self.gating_linear(scalars), h)
        return self.so3_linear_2(h)  # [N, F, output_channels]

    def extra_repr(self) -> str:
        return (
            f"sphere_channels={self.sphere_channels}, hidden_channels={self.hidden_channels}, "
            f"output_channels={self.output_channels}, lmax={self.lmax}, activation={self.activation!r}"
        )
