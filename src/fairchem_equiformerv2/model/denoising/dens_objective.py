"""The DeNS training objective inside the model, so that fairchem's unmodified trainers (``ocp``,
``equiformerv2_forces``) train with it (Liao et al., arXiv 2403.09549, Sections 3.2-3.4); on torch
alone. :class:`.dens.DeNSBackbone` uses it when its config has a ``denoising`` block.

In training, each batch is corrupted with probability ``probability`` (per batch, as fairchem's DeNS
trainer does): Gaussian noise of ``noise_std`` Å per component (or, with ``noise_schedule``, of a
level ``sigma`` drawn per structure from ``num_steps`` log-spaced levels between ``std_low`` and
``std_high``) moves the corrupted atoms: all atoms, or each with probability ``corrupt_ratio``
(partially corrupted structures, Section 3.4); never fixed atoms unless ``all_atoms``; never
structures with ``md == 1`` (fairchem's rule for MD frames). The model sees the corrupted positions and
the original forces of the corrupted atoms (the force encoding) and predicts

* the original structure's energy (the trainer's ``energy`` target, unchanged);
* the noise of each corrupted atom divided by ``noise_std`` (``std_high`` with a schedule), the
  ``output_name`` output (default ``denoising``), whose target the force head writes into the batch;
* forces for the atoms that are not corrupted (the trainer's ``forces`` target, unchanged).

How the losses come out with fairchem's ``OCPTrainer`` (``_compute_loss`` reads ``batch[target]``
after the forward, so the model may write targets into the batch):

* ``forces`` (``l2mae``, ``train_on_free_atoms: true``): for corrupted atoms the force output is the
  force block's prediction *detached*, so they give no gradient (their forces are those of another
  structure); the gradient is ``lambda_F / N_free * sum over free, uncorrupted atoms``, the forces
  part of fairchem's hybrid loss. The logged loss keeps a constant for those atoms.
* ``<output_name>`` (``l2mae``, coefficient 1, ``train_on_free_atoms: false``): prediction and target
  are zero outside the corrupted atoms and both are multiplied by ``coefficient * N / N_free`` (the
  L2-norm MAE is homogeneous of degree 1), so the term is ``coefficient / N_free * sum over corrupted
  atoms of |prediction - noise / noise_std|``, the denoising part of fairchem's hybrid loss
  (``N_free`` counts every atom with ``all_atoms``).

fairchem 1.10's own DeNS trainer (``equiformerv2_dens``) also adds the forces loss a second time on
denoising batches (its ``_compute_loss`` falls through to the generic term); this objective does not.

Evaluation (``model.eval()``) sees clean inputs; the ``output_name`` output and its target are zeros.
Each training forward draws from its own ``torch.Generator`` seeded from ``(seed, rank, step)``, as
Noisy Nodes does (:mod:`.noisy_nodes`); ``step`` and ``seed`` are buffers of the backbone, so a resumed
run continues the stream.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import NamedTuple

import torch

from ...errors import ConfigError
from ..config import ConfigBlock, Rule, boolean, integer, optional, real
from .base import seeded_generator

DENS_SALT = 0xDE45  # mixed into the stream's seed after (seed, rank, step)

__all__ = ["DenoisingConfig", "DenoisingDraws", "draw_denoising", "corrupted_atoms", "dens_generator", "corrupt_batch"]


def _new_output_name(value) -> str | None:
    ok = isinstance(value, str) and value not in ("", "energy", "forces", "stress")
    return None if ok else "must be a new output name (not energy, forces or stress)"


#: The rule of each field of :class:`DenoisingConfig` (:mod:`.config`'s, as Noisy Nodes' fields).
DENOISING_RULES: dict[str, Rule] = {
    "probability": real(0, maximum=1),
    "noise_std": real(0, above=True),
    "noise_schedule": boolean,
    "std_low": real(0, above=True),
    "std_high": real(0, above=True),
    "num_steps": integer(1),
    "corrupt_ratio": optional(real(0, above=True, maximum=1)),
    "all_atoms": boolean,
    "coefficient": real(0),
    "output_name": _new_output_name,
    "seed": optional(integer(0)),
}


@dataclasses.dataclass(frozen=True)
class DenoisingConfig(ConfigBlock):
    """The ``denoising`` block of :class:`.dens.DeNSBackbone`'s config (all optional).

    probability: chance that a training batch is corrupted.
    noise_std: Gaussian noise per Cartesian component (Å); the target is the noise divided by it.
    noise_schedule: draw each structure's noise level from ``num_steps`` levels spaced evenly in log
        between ``std_low`` and ``std_high`` instead (the target is divided by ``std_high``); pair it
        with the backbone's ``use_noise_schedule_sigma_encoding``.
    corrupt_ratio: corrupt each atom with this probability (partially corrupted structures); ``null``
        corrupts every atom of the batch.
    all_atoms: corrupt and denoise fixed atoms (``fixed == 1``) too.
    coefficient: the denoising loss coefficient (configure the output's own loss coefficient as 1).
    output_name: the name of the denoising output and of the target written into the batch.
    seed: the random stream's seed; ``null`` = ``torch.initial_seed()`` when the model is built.

    Each field is checked with :data:`DENOISING_RULES`, and ``std_high >= std_low``
    (:class:`ConfigError` names the field and value: ``denoising.<field>=...``).
    """

    probability: float = 0.5
    noise_std: float = 0.1
    noise_schedule: bool = False
    std_low: float = 0.01
    std_high: float = 0.5
    num_steps: int = 50
    corrupt_ratio: float | None = None
    all_atoms: bool = False
    coefficient: float = 10.0
    output_name: str = "denoising"
    seed: int | None = None

    block, rules = "denoising", DENOISING_RULES

    def __post_init__(self):
        super().__post_init__()
        if self.std_high < self.std_low:
            raise ConfigError(f"denoising.std_high={self.std_high!r}: must be >= std_low")

    @property
    def target_scale(self) -> float:
        """The noise is divided by this (Å) for the target: ``std_high`` with a schedule, else ``noise_std``."""
        return self.std_high if self.noise_schedule else self.noise_std


class DenoisingDraws(NamedTuple):
    """The random draws of one training forward.

    corrupt: whether the batch is corrupted.
    noise: ``[N, 3]`` standard normal noise (times ``sigma`` gives the displacement).
    sigma: ``[N, 1]`` each atom's noise level (Å): its structure's level, or ``noise_std``.
    selected: ``[N]`` bool, atoms drawn for corruption (all with ``corrupt_ratio`` null).
    """

    corrupt: bool
    noise: torch.Tensor
    sigma: torch.Tensor
    selected: torch.Tensor


def dens_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, rank, step)`` (salted: not Noisy Nodes')."""
    return seeded_generator(seed, rank, step, DENS_SALT)


def draw_denoising(
    config: DenoisingConfig, batch: torch.Tensor, num_structures: int, generator: torch.Generator,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> DenoisingDraws:
    """Draw (always all of them, in this order, so the stream's layout does not depend on the data)
    the batch's coin, the noise ``[N, 3]``, the structures' levels ``[B]`` and the atoms' selection
    ``[N]`` on the CPU; then move them to ``device``. ``batch [N]``: each atom's structure."""
    num_atoms = batch.shape[0]
    corrupt = bool(torch.rand((), generator=generator, dtype=torch.float64) < config.probability)
    noise = torch.randn(num_atoms, 3, generator=generator, dtype=torch.float64)
    level = torch.randint(0, config.num_steps, (num_structures,), generator=generator)
    pick = torch.rand(num_atoms, generator=generator, dtype=torch.float64)
    if config.noise_schedule:
        levels = torch.exp(torch.linspace(math.log(config.std_low), math.log(config.std_high), config.num_steps, dtype=torch.float64))
        sigma = levels[level].to(device)[batch].unsqueeze(1)
    else:
        sigma = torch.full((num_atoms, 1), config.noise_std, dtype=torch.float64, device=device)
    ratio = 1.0 if config.corrupt_ratio is None else config.corrupt_ratio
    return DenoisingDraws(corrupt, noise.to(device, dtype), sigma.to(dtype), (pick < ratio).to(device))


def corrupted_atoms(draws: DenoisingDraws, config: DenoisingConfig, batch: torch.Tensor,
                    fixed: torch.Tensor | None, md: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` bool: the atoms that are moved, encoded and denoised: drawn, free (unless
    ``all_atoms``; ``fixed [N]``) and not in an MD structure (``md [B]``); none when the batch's coin
    said no."""
    mask = draws.selected & draws.corrupt
    if fixed is not None and not config.all_atoms:
        mask = mask & (fixed.view(-1) == 0)
    if md is not None:
        mask = mask & ~md.view(-1).bool()[batch]
    return mask


class Corrupted(NamedTuple):
    """A training forward's corrupted input and what the heads need.

    data: a shallow copy of the batch with corrupted ``pos`` and fairchem's DeNS fields
        (``denoising_pos_forward``, ``noise_mask`` and, with a schedule, ``sigmas``), or the batch
        itself when it is not corrupted.
    mask: ``[N]`` bool, corrupted atoms.
    target: ``[N, 3]``, noise / ``target_scale`` on corrupted atoms, zeros elsewhere.
    scale: the factor prediction and target are multiplied by (``coefficient * N / N_free``).
    """

    data: object
    mask: torch.Tensor
    target: torch.Tensor
    scale: float


def corrupt_batch(data, config: DenoisingConfig, generator: torch.Generator | None) -> Corrupted:
    """Corrupt ``data`` (``generator`` given: a training forward) or not (``None``: evaluation).

    Reads ``pos [N, 3]``, ``batch [N]``, ``natoms [B]`` and, when present, ``fixed [N]`` and ``md [B]``.
    """
    pos = data.pos
    num_atoms = pos.shape[0]
    fixed = getattr(data, "fixed", None)
    free = num_atoms if (fixed is None or config.all_atoms) else int((fixed.view(-1) == 0).sum())
    scale = config.coefficient * num_atoms / max(free, 1)
    none = torch.zeros(num_atoms, dtype=torch.bool, device=pos.device)
    if generator is None:
        return Corrupted(data, none, torch.zeros_like(pos), scale)
    with torch.no_grad():
        draws = draw_denoising(config, data.batch, len(data.natoms), generator, pos.dtype, pos.device)
        mask = corrupted_atoms(draws, config, data.batch, fixed, getattr(data, "md", None))
        if not bool(mask.any()):
            return Corrupted(data, mask, torch.zeros_like(pos), scale)
        displacement = draws.noise * draws.sigma * mask.unsqueeze(1).to(pos.dtype)  # [N, 3]
        target = displacement / config.target_scale
    noisy = copy.copy(data)
    noisy.pos = pos + displacement
    noisy.denoising_pos_forward = True
    noisy.noise_mask = mask
    if config.noise_schedule:
        noisy.sigmas = draws.sigma
    return Corrupted(noisy, mask, target, scale)
