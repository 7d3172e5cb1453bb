"""Equivariant normalisations of l-major features ``[N, (lmax+1)**2, C]`` (EquiformerV2 Sec. 3.3).

Each divides by a root-mean-square taken over coefficients and channels, so rotations, which mix
only the coefficients of one degree and preserve their norm, commute with it. ``l = 0`` may be
centred (it is invariant). Affine weights are per degree and channel; the bias only on ``l = 0``.

* ``layer_norm``: one RMS per degree (Equiformer's equivariant layer norm).
* ``layer_norm_sh``: a standard LayerNorm on ``l = 0``, one RMS shared by all ``l > 0``, each
  degree weighted equally ("separable layer norm", the paper's Sec. 3.3).
* ``rms_norm_sh``: ``l = 0`` centred, one RMS shared by all degrees, each weighted equally (the
  default of the published models).

Under autocast the norms compute in their input's dtype (float32 for the residual stream): bf16
sums of squares would cost most of bf16 training's accuracy, for little time.
"""
from __future__ import annotations

import torch
from torch import nn

from ..so3.layout import degree_of_coefficients
from .precision import autocast_off

NORM_TYPES = ("layer_norm", "layer_norm_sh", "rms_norm_sh")


def _degree_weights(lmax: int, lmin: int) -> torch.Tensor:
    """``[(lmax+1)**2 - lmin**2]``: ``1 / ((2l+1) * number of degrees)`` for degrees ``lmin..lmax``,
    so that a weighted sum of squares averages the per-degree mean squares."""
    degree = degree_of_coefficients(lmax)[lmin * lmin :].double()
    return 1.0 / ((2 * degree + 1) * (lmax + 1 - lmin))


class _EquivariantNorm(nn.Module):
    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax, self.num_channels, self.eps = lmax, num_channels, eps
        self.register_buffer("degree", degree_of_coefficients(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, (lmax+1)**2, C]`` -> ``[N, (lmax+1)**2, C]``."""
        with autocast_off(x):
            return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(lmax={self.lmax}, num_channels={self.num_channels}, eps={self.eps})"


class EquivariantLayerNorm(_EquivariantNorm):
    """``layer_norm``: per degree ``l``, ``x_l / sqrt(mean_{m,c} x_l^2 + eps) * w_l``; ``l = 0`` centred
    first and shifted by a bias after."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5):
        super().__init__(lmax, num_channels, eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, num_channels))
        self.affine_bias = nn.Parameter(torch.zeros(num_channels))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x[:, :1] - x[:, :1].mean(dim=2, keepdim=True), x[:, 1:]), dim=1)
        mean_sq = x.pow(2).mean(dim=2)  # [N, F]
        per_degree = mean_sq.new_zeros(x.shape[0], self.lmax + 1).index_add_(1, self.degree, mean_sq)
        per_degree = per_degree / (2 * torch.arange(self.lmax + 1, device=x.device) + 1)
        scale = (per_degree + self.eps).pow(-0.5)[:, self.degree, None] * self.affine_weight[self.degree]
        out = x * scale
        return torch.cat((out[:, :1] + self.affine_bias, out[:, 1:]), dim=1)  # [N, F, C]


class SeparableLayerNorm(_EquivariantNorm):
    """``layer_norm_sh``: LayerNorm on ``l = 0``; degrees ``l > 0`` share one RMS (degrees weighted
    equally), then per-degree weights."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5):
        super().__init__(lmax, num_channels, eps)
        self.norm_l0 = nn.LayerNorm(num_channels, eps=eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax, num_channels))
        if lmax > 0:
            balance = _degree_weights(lmax, 1).to(torch.get_default_dtype())
            self.register_buffer("balance", balance, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        scalars = self.norm_l0(x[:, :1])
        if self.lmax == 0:
            return scalars
        tensors = x[:, 1:]
        mean_sq = torch.einsum("nic,i->nc", tensors.pow(2), self.balance).mean(dim=1)  # [N]
        scale = (mean_sq + self.eps).pow(-0.5)[:, None, None] * self.affine_weight[self.degree[1:] - 1]
        return torch.cat((scalars, tensors * scale), dim=1)  # [N, F, C]


class SeparableRMSNorm(_EquivariantNorm):
    """``rms_norm_sh``: centre ``l = 0``; all degrees share one RMS (degrees weighted equally); then
    per-degree weights and an ``l = 0`` bias."""

    def __init__(self, lmax: int, num_channels: int, eps: float = 1e-5):
        super().__init__(lmax, num_channels, eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, num_channels))
        self.affine_bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("balance", _degree_weights(lmax, 0).to(torch.get_default_dtype()), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x[:, :1] - x[:, :1].mean(dim=2, keepdim=True), x[:, 1:]), dim=1)
        mean_sq = torch.einsum("nic,i->nc", x.pow(2), self.balance).mean(dim=1)  # [N]
        out = x * ((mean_sq + self.eps).pow(-0.5)[:, None, None] * self.affine_weight[self.degree])
        return torch.cat((out[:, :1] + self.affine_bias, out[:, 1:]), dim=1)  # [N, F, C]


def make_norm(norm_type: str, lmax: int, num_channels: int) -> nn.Module:
    """The normalisation called ``norm_type`` (one of :data:`NORM_TYPES`)."""
    classes = {"layer_norm": EquivariantLayerNorm, "layer_norm_sh": SeparableLayerNorm, "rms_norm_sh": SeparableRMSNorm}
    if norm_type not in classes:
        raise ValueError(f"norm_type must be one of {list(classes)}, got {norm_type!r}")
    return classes[norm_type](lmax, num_channels)
