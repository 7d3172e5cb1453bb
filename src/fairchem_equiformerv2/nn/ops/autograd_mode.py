"""Plain autograd: every block differentiable to any order, through the rotations and radial features.

The functional ops of ``nn/ops/`` (``dense.py``, ``scatter.py``, ``so2.py``, ``grid.py``,
``linear.py``) train through memory-lean ``torch.autograd.Function``s, and the blocks keep some
tensors by recomputing them (``recompute.py``). Those backward passes treat the edge rotations as
constants and are first order only: right for direct forces, where nothing differentiates with
respect to the geometry.

Forces and stress as gradients of the energy (``model/conservative.py``) differentiate the energy with
respect to positions (through the edge vectors, frames, Wigner matrices and radial features), and
training them differentiates that gradient again (``create_graph``). Inside :func:`plain_autograd`,
every op takes its plain-torch path (the one it takes under ``torch.compile``), which autograd
differentiates natively, to any order. The flag is per thread.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def plain_autograd(enabled: bool = True):
    """``with plain_autograd():`` blocks compute with plain torch operations only (see module docstring)."""
    previous = getattr(_state, "on", False)
    _state.on = enabled or previous
    try:
        yield
    finally:
        _state.on = previous


def is_plain() -> bool:
    """True inside :func:`plain_autograd`."""
    return getattr(_state, "on", False)


def lean_autograd() -> bool:
    """True when a block may record its memory-lean autograd Function: gradients are on and we are
    not inside :func:`plain_autograd`."""
    return torch.is_grad_enabled() and not getattr(_state, "on", False)
