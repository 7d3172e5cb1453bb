"""A tensor that backward recomputes instead of keeping (``torch.autograd.graph.saved_tensors_hooks``).

The edge messages that enter the attention's first SO(2) convolution (``[E, K, 2C]``, the largest
tensor a block keeps for backward: 45 MB per layer for two 38-atom slabs at lmax 6) are a cheap
function of the atoms' features (``[N, F, C]``: 2 MB): a gather and one rotation per edge. Inside
:func:`recomputed_in_backward`, whatever the autograd graph would keep of the messages (the tensor
or views of it) is kept as a note of the view; the first backward use recomputes the tensor, once,
and every note reads its view of that. Exact: the same operations on the same inputs.

Not under ``torch.compile`` (the compiler chooses what to keep and recompute itself) nor inside
``torch.utils.checkpoint`` (whose own saved-tensor hooks these would displace): there the context does
nothing.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .autograd_mode import lean_autograd


class _ViewOfRecomputed:
    """What is kept instead of a view of the recomputed tensor: where the view lies in it."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


def recomputed_in_backward(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor], enabled: bool = True):
    """``with recomputed_in_backward(tensor, recompute):`` operations inside that keep ``tensor`` or a
    view of it for backward keep a note instead; backward calls ``recompute()`` (which must return
    ``tensor``'s values in its layout) the first time one of them needs it. A no-op context when not
    ``enabled``, without gradients or under ``torch.compile``."""
    if not enabled or not lean_autograd() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    # the hooks are methods of an object that does not hold them: a hooks object holding its own
    # bound methods is a reference cycle, and the recomputed tensor would outlive the backward pass
    # until the next garbage collection
    state = _Recomputed(tensor, recompute)
    return torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack)


class _Recomputed:
    """The tensor to recompute: its storage (to know its views by), layout, recipe and, once
    recomputed, value."""

    def __init__(self, tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]):
        storage = tensor.untyped_storage()
        self.key = (storage.data_ptr(), storage.nbytes())
        self.layout = (tensor.shape, tensor.stride(), tensor.dtype)
        self.recompute, self.value = recompute, None

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if (storage.data_ptr(), storage.nbytes()) == self.key:
            return _ViewOfRecomputed(t)
        # not t itself: a saved output would then hold its own grad_fn (a reference cycle, freed only
        # by the garbage collector); autograd gives the unpacked tensor its place in the graph back
        return t.detach()

    def unpack(self, packed):
        if not isinstance(packed, _ViewOfRecomputed):
            return packed
        if self.value is None:
            self.value = self.recompute()
            if (self.value.shape, self.value.stride(), self.value.dtype) != self.layout:
                raise RuntimeError(f"recomputed tensor {self.value.shape} is not laid out as the original {self.layout}")
        return self.value.as_strided(packed.size, packed.stride, packed.offset)
