"""Rotating features into and out of the edge-aligned frames.

Into the frame: ``x_edge = D(R) x`` restricted to the rows the mmax truncation keeps, in m-major
order. Out of it: ``x = D(R)^T x_edge`` with each kept coefficient rescaled (see :mod:`.layout`).
Row selection, reordering and rescaling are folded into the matrices once per forward pass.
The graph attention applies them together with the gather from and the sum into the atoms
(:func:`..nn.scatter.gather_pairs`, :func:`..nn.scatter.scatter_sum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import EdgeLayout
from .smooth_wigner import smooth_wigner_d
from .wigner import wigner_d


@dataclass
class EdgeRotation:
    """Per-edge rotation matrices between the l-major node layout and an edge layout.

    Attributes:
        to_edge: ``[E, K, (lmax+1)**2]``.
        from_edge: ``[E, (lmax+1)**2, K]``.
    """

    to_edge: torch.Tensor
    from_edge: torch.Tensor

    @classmethod
    def from_frames(cls, frames: torch.Tensor, layout: EdgeLayout, differentiable: bool = False) -> EdgeRotation:
        """Matrices for the edge frames ``frames [E, 3, 3]`` (see :func:`.frames.edge_frames`): detached,
        or with ``differentiable`` through :func:`.smooth_wigner.smooth_wigner_d`, whose derivative with
        respect to the frames exists everywhere."""
        wigner = smooth_wigner_d if differentiable else wigner_d
        to_edge = wigner(frames, layout.lmax, rows=layout.index.to(frames.device))  # [E, K, F]
        from_edge = to_edge.transpose(1, 2) * layout.rescale.to(device=frames.device, dtype=frames.dtype)
        if not differentiable:
            to_edge, from_edge = to_edge.detach(), from_edge.detach()
        return cls(to_edge.contiguous(), from_edge.contiguous())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [E, (lmax+1)**2, C]`` (l-major) -> ``[E, K, C]`` (m-major, in the edge frame), in ``x``'s dtype."""
        return torch.bmm(self.to_edge.to(x.dtype), x)
