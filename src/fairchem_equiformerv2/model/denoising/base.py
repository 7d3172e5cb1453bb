"""What DeNS (:mod:`.dens`) and Noisy Nodes (:mod:`.noisy_nodes`) share: a backbone that corrupts its
input in training from a random stream of its own, and the target its head writes into the batch (their
config blocks are checked as :class:`.config.ConfigBlock`).

The stream: each training forward draws from a fresh CPU ``torch.Generator`` seeded from ``(seed,
rank, step)`` (:func:`seeded_generator`), so the draws depend neither on torch's global generator nor
on other ranks; ``seed`` and ``step`` (training forwards so far) are buffers of the backbone, so a
checkpoint resumes the stream, and a checkpoint without them (a converted one, or one trained without
the objective) loads with this model's.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from ..backbone import EquiformerV2Backbone


def seeded_generator(seed: int, rank: int, step: int, *salt: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, rank, step, *salt)``."""
    entropy = [int(seed), int(rank), int(step), *map(int, salt)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@dataclasses.dataclass
class AuxiliaryTarget:
    """The target of a denoising output, which its head writes into the batch: fairchem's trainers read
    each loss's target from the batch after the forward, so the model may set it there.

    target: ``[N, 3]``.
    scale: prediction and target are both multiplied by it (a loss coefficient the model schedules).
    output_name: the output's and the batch field's name, when the backbone's config names it.
    """

    target: torch.Tensor
    scale: float
    output_name: str | None = None

    def answer(self, data, prediction: torch.Tensor, name: str | None = None, dtype: torch.dtype | None = None):
        """``prediction * scale`` ``[N, 3]``, after writing ``target * scale`` (cast to ``dtype`` when given)
        into ``data[name]`` (default :attr:`output_name`)."""
        target = self.target * self.scale
        data[name or self.output_name] = target if dtype is None else target.to(dtype)
        return prediction * self.scale


class CorruptingBackbone(EquiformerV2Backbone):
    """:class:`.EquiformerV2Backbone` with a random stream for corrupting its training inputs, kept in
    the buffers ``<stream>_seed`` and ``<stream>_step``."""

    #: the buffers' prefix (``dens``, ``noisy_nodes``: their names in checkpoints)
    stream: ClassVar[str]
    #: the stream's salt, mixed into the seed after ``(seed, rank, step)``
    salt: ClassVar[tuple[int, ...]] = ()

    def _start_stream(self, seed: int | None) -> None:
        """Register the buffers; ``seed`` ``None`` is ``torch.initial_seed()`` (fairchem's ``--seed``)."""
        seed = torch.initial_seed() if seed is None else int(seed)
        self.register_buffer(f"{self.stream}_seed", torch.tensor(seed % (2**63), dtype=torch.long))
        self.register_buffer(f"{self.stream}_step", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{self.stream}_seed" in self._buffers:  # a checkpoint without the buffers keeps this model's stream
            for name in (f"{self.stream}_seed", f"{self.stream}_step"):
                state_dict.setdefault(prefix + name, self._buffers[name].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _rank() -> int:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_rank() if distributed else 0

    def next_generator(self) -> tuple[torch.Generator, int]:
        """This training forward's generator and step; counts the step."""
        step_buffer = self._buffers[f"{self.stream}_step"]
        step = int(step_buffer)
        generator = seeded_generator(int(self._buffers[f"{self.stream}_seed"]), self._rank(), step, *self.salt)
        step_buffer += 1
        return generator, step
