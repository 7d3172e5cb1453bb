"""Edge-aligned frames: one rotation per edge that takes the edge direction to e3nn's polar axis.

eSCN (Passaro & Zitnick 2023) rotates each message so that its edge points along the axis whose
``m = 0`` harmonics are the only ones that do not vanish; the roll about that axis is free. The roll
is fixed by a helper vector ``h`` not parallel to the edge ``x``:

    z = normalize(x cross h),  y = x cross z,  R = rows(z, x, -y)

so that ``R @ x = (0, 1, 0)``. EquiformerV2 as published draws ``h`` at random for every edge and
call; the S2 activations make the network only approximately invariant to that roll, so the random
choice makes two evaluations of the same atoms differ slightly. :func:`edge_frames` offers both:

* ``random=True``: ``h`` uniform in ``[-0.5, 0.5]^3``, swapped for a 90-degree-rotated copy when it
  is too close to ``x`` (fairchem's rule, so training sees the same augmentation);
* ``random=False``: ``h`` is a fixed generic direction ``h0``, or a second one ``h1`` for edges
  within ~25 degrees of ``h0`` (``|x . h0| > 0.9``). The result depends only on the edge vector, so
  repeated evaluations are bit-identical; and since ``h0`` lines up with no crystal axis, symmetric
  structures do not sit on the switch, where rounding could flip the choice.

Differentiability (``differentiable=True``, for forces as gradients of the energy). With a fixed
helper, ``x cross h`` vanishes for edges along ``+-h``: the frame is singular there, and no choice of
a helper that varies continuously with ``x`` avoids a singular direction somewhere (the hairy-ball
theorem). The deterministic frame never meets it: ``h0`` serves only edges at least ~25 degrees from
``+-h0``, and ``h1`` (about 87 degrees from ``h0``) only edges within ~26 degrees of ``+-h0``, so every
edge's ``|x cross h|`` is at least ~0.44 and the frame is a smooth function of ``x`` with bounded
derivatives on each side of the switch (the switch itself is a cone, |x . h0| = 0.9, of zero measure:
there the energy steps by the S2 grid's roll error, as it did before). The random frame's helper is
likewise kept away from the edge. Frames are detached unless ``differentiable`` is set.
"""
from __future__ import annotations

import torch


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _random_helper(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``[E, 3]`` random helper vectors, each replaced by a rotated copy when nearly parallel to x."""
    h = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator) - 0.5
    h = _normalize(h)
    h_b = torch.stack((-h[:, 1], h[:, 0], h[:, 2]), dim=1)  # 90 degrees about z
    h_c = torch.stack((h[:, 0], -h[:, 2], h[:, 1]), dim=1)  # 90 degrees about x

    def alignment(v):
        return (v * x).sum(dim=1, keepdim=True).abs()

    h = torch.where(alignment(h) > alignment(h_b), h_b, h)
    h = torch.where(alignment(h) > alignment(h_c), h_c, h)
    return h


# Two fixed, generic and nearly orthogonal helper directions (h0 . h1 ~ 0.05).
_H0 = (1.0, 2.0**0.5, 5.0**0.5)
_H1 = (-(3.0**0.5), 2.0, -(0.5**0.5))


def _fixed_helper(x: torch.Tensor) -> torch.Tensor:
    """``[E, 3]``: ``h0`` for each unit vector of ``x [E, 3]``, ``h1`` where ``|x . h0| > 0.9``."""
    h0 = _normalize(x.new_tensor(_H0))
    h1 = _normalize(x.new_tensor(_H1))
    return torch.where((x @ h0).abs().unsqueeze(1) > 0.9, h1, h0)


def edge_frames(
    edge_vec: torch.Tensor,
    random: bool = False,
    generator: torch.Generator | None = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Rotations ``[E, 3, 3]`` with ``R @ edge_vec[e] / |edge_vec[e]| = (0, 1, 0)``.

    Args:
        edge_vec: ``[E, 3]`` edge vectors (need not be normalised; must be non-zero).
        random: draw the roll about the edge at random (see module docstring).
        generator: random stream for ``random=True``.
        differentiable: keep the autograd graph to ``edge_vec`` (else the frames are detached).
    """
    x = _normalize(edge_vec)
    h = _random_helper(x, generator) if random else _fixed_helper(x)
    z = _normalize(torch.cross(x, h, dim=1))
    y = _normalize(torch.cross(x, z, dim=1))
    frames = torch.stack((z, x, -y), dim=1)  # [E, 3, 3]
    return frames if differentiable else frames.detach()
