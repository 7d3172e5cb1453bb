"""What computes in which dtype under autocast (bf16 mixed precision).

Autocast runs matmuls in bf16 and leaves the rest to each op. The model runs in bf16 only the work
per edge that is most of the time: the attention's rotations into and out of the edge frames, its
SO(2) convolutions and its S2 activation. Elsewhere bf16 would cost accuracy out of
proportion to the time it saves (numbers in the README, ``benchmarks/bf16_error.py``):

* the geometry (graph, edge frames, Wigner matrices) stays in the input's dtype (``model/backbone.py``);
* the edge-degree embedding, the start of every atom's features, computes in float32 (its radial MLP,
  and its one rotation per forward pass: ``embedding.py``);
* the work per atom computes in float32, the residual stream's dtype: the norms (``norm.py``), the
  feed-forward networks (``feed_forward.py``), the attention's output projection (``attention.py``)
  and, in fairchem's HydraModel, the heads. An atom has up to ``max_neighbors`` edges, so this is a
  small part of the work, and on weights near their initialisation, the feed-forward networks' bf16
  weights cost the most accuracy;
* the radial MLPs and the per-edge radial weights compute in float32 (``radial.py``,
  ``so2_conv.py``): on weights further from it, theirs cost the most;
* the attention logits, from the first SO(2) convolution's invariant outputs to the softmax, compute
  in float32 (``attention.py``): ``[E, heads x alpha_channels]`` features reduced to ``[E, heads]``
  logits, whose bf16 rounding the softmax's exponential turns into relative errors of the weights;
* sums of many terms (messages into atoms, their gradients, energies per structure) accumulate in
  float32 (``ops/scatter.py``, ``model/heads.py``): a GPU's bf16 atomic adds round after every term.
"""
from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a lower precision (bf16 under autocast), else as it is."""
    return x.to(accumulation_dtype(x))


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or ``x``'s dtype if that is wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs a matmul of ``x`` in: its own without autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def autocast_off(x: torch.Tensor) -> torch.autocast:
    """A context with autocast off on ``x``'s device: ops inside compute in their inputs' dtypes."""
    return torch.autocast(x.device.type, enabled=False)
