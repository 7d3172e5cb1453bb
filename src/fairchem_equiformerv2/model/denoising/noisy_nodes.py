"""Noisy Nodes (Godwin et al., ICLR 2022) as the Equiformer line of work uses it for OC20 IS2RE.

During training only, each structure is corrupted with probability ``probability``: every movable
atom moves to a random point between its initial and relaxed position (interpolation factor
``t ~ U[0, 1]`` per atom) plus Gaussian noise (``noise_std`` Å per component). An equivariant vector
head (:class:`NoisyNodesHead`, the ``l = 1`` output of a graph attention like :class:`.ForceHead`)
predicts the displacement from the corrupted input to the relaxed position divided by ``pos_std``;
fairchem's trainer scores it over free atoms with the reference's L1 loss (per atom summed over x, y, z)
or an L2-norm MAE (``loss``). The energy target is unchanged
(``y_relaxed``, mapped to ``energy``). For data without ``pos_relaxed`` (energy-only, QM9-like) the
input gets Gaussian noise only and the target is that noise divided by ``noise_std``.

The auxiliary loss coefficient decays linearly from ``coefficient_start`` to ``coefficient_end``
over ``decay_steps`` optimizer steps. fairchem's loss coefficients are static, so the schedule is
applied inside the model: the head multiplies both its prediction and the target it attaches to the
batch by the scheduled coefficient ``c``. Both losses are homogeneous of degree 1, so the loss
term is exactly ``c * loss(prediction, target)`` when the config's static coefficient is 1 (for
``l1`` the factor also holds the 3 that turns fairchem's per-component ``mae`` into a per-atom sum).

How it fits fairchem's unmodified ``OCPTrainer`` (``ocp``, ``equiformerv2_forces``,
``equiformerv2_energy``): ``_forward`` calls the model on the batch object and ``_compute_loss`` /
``_compute_metrics`` then read ``batch[target]``, so the head writes its target into the batch
during the forward (``batch.noisy_nodes``). The backbone corrupts a shallow copy of the batch; the
trainer's ``batch.pos`` is left untouched.

Evaluation (``model.eval()``: validation, prediction, relaxations) sees clean inputs; the target is
then ``(pos_relaxed - pos) / pos_std`` (the relaxed displacement, an IS2RS-style output), or zeros
when the batch has no ``pos_relaxed`` (test splits) or for noise-only data, and the coefficient is 1.

Reproducibility: each training forward draws from its own ``torch.Generator`` seeded from
``(seed, rank, step)``; ``step`` counts the model's training forwards (a buffer, so checkpoints
resume the stream) and ``seed`` defaults to ``torch.initial_seed()`` when the model is built, which
fairchem sets from ``--seed``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import torch

from ...errors import ConfigError
from ..backbone import BackboneOutput
from ..config import ConfigBlock, Rule, boolean, check_arguments, integer, one_of, optional, real
from .base import AuxiliaryTarget, CorruptingBackbone, seeded_generator
from ..heads import ForceHead

__all__ = [
    "NoisyNodesConfig", "CONFIG_RULES", "LinearCoefficientSchedule", "Corruption", "draw_corruption",
    "relaxed_displacement", "corrupt_positions", "denoising_target", "noisy_nodes_generator",
    "mean_corrupted_target_norm",
    "NoisyNodesBackbone", "NoisyNodesHead",
]


#: The factor by which the training prediction and target are multiplied (besides the scheduled
#: coefficient) so that fairchem's loss function gives the loss named: fairchem's ``mae`` averages
#: over the N x 3 components, the reference's L1 sums over x, y, z and averages over atoms.
LOSS_SCALE: dict[str, float] = {"l1": 3.0, "l2mae": 1.0}

#: The rule of each field of :class:`NoisyNodesConfig` (the backbone's rules, :mod:`.arguments`):
#: booleans are YAML's true/false (``"no"`` is a true string), numbers finite, whole numbers integers.
CONFIG_RULES: dict[str, Rule] = {
    "probability": real(0, maximum=1),
    "interpolate": boolean,
    "noise_std": real(0),
    "pos_std": real(0, above=True),
    "coefficient_start": real(0),
    "coefficient_end": real(0),
    "decay_steps": integer(0),
    "corrupt_fixed": boolean,
    "loss": one_of(*LOSS_SCALE),
    "seed": optional(integer(0)),
}


@dataclasses.dataclass(frozen=True)
class NoisyNodesConfig(ConfigBlock):
    """The ``noisy_nodes`` block of the backbone's config (all optional).

    probability: chance that a training structure is corrupted (per structure).
    interpolate: move atoms towards ``pos_relaxed`` by ``t ~ U[0, 1]`` (needs ``pos_relaxed``).
    noise_std: Gaussian noise per Cartesian component (Å).
    pos_std: the relaxed-displacement target is divided by this (Å).
    coefficient_start, coefficient_end, decay_steps: the auxiliary loss coefficient, linear in the
        step from start (step 0) to end (step >= decay_steps); ``decay_steps: 0`` = end throughout.
    corrupt_fixed: also corrupt fixed atoms (``fixed == 1``); default no, as Equiformer does.
    loss: the auxiliary loss, which the config's ``loss_functions`` entry must name:
        ``"l1"`` (the reference's: per atom the L1 norm, summed over x, y, z; pair with ``fn: mae``, a
        mean over components, and the model multiplies by 3 in training) or ``"l2mae"`` (the L2
        norm per atom; pair with ``fn: l2mae``).
    seed: the random stream's seed; ``None`` = ``torch.initial_seed()`` when the model is built.

    Each field is checked with :data:`CONFIG_RULES` (:class:`ConfigError` names the field and value).
    """

    probability: float = 0.5
    interpolate: bool = True
    noise_std: float = 0.3
    pos_std: float = 1.0
    coefficient_start: float = 15.0
    coefficient_end: float = 1.0
    decay_steps: int = 0
    corrupt_fixed: bool = False
    loss: str = "l1"
    seed: int | None = None

    block, rules = "noisy_nodes", CONFIG_RULES


class LinearCoefficientSchedule:
    """``coefficient(step)``: ``start`` at step 0, linear to ``end`` at ``decay_steps``, then ``end``."""

    def __init__(self, start: float = 15.0, end: float = 1.0, decay_steps: int = 0):
        self.start, self.end, self.decay_steps = float(start), float(end), int(decay_steps)

    def __call__(self, step: int) -> float:
        if self.decay_steps <= 0:
            return self.end
        fraction = min(max(step, 0) / self.decay_steps, 1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return f"LinearCoefficientSchedule(start={self.start}, end={self.end}, decay_steps={self.decay_steps})"


# ------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------
class Corruption(NamedTuple):
    """The random draws of one corruption.

    selected: ``[B]`` bool, the structures that are corrupted.
    interpolation: ``[N]`` float in ``[0, 1)``, the per-atom interpolation factor ``t``.
    noise: ``[N, 3]`` float, Gaussian noise (already multiplied by ``noise_std``).
    """

    selected: torch.Tensor
    interpolation: torch.Tensor
    noise: torch.Tensor


noisy_nodes_generator = seeded_generator  # (seed, rank, step) -> the stream of a training forward


def draw_corruption(
    num_structures: int,
    num_atoms: int,
    probability: float,
    noise_std: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Corruption:
    """Draw ``selected [B]``, ``interpolation [N]`` and ``noise [N, 3]`` (in this order, always all of
    them, so the stream's layout does not depend on the data) on the CPU, then move them to ``device``."""
    selected = torch.rand(num_structures, generator=generator, dtype=torch.float64) < probability
    interpolation = torch.rand(num_atoms, generator=generator, dtype=torch.float64)
    noise = torch.randn(num_atoms, 3, generator=generator, dtype=torch.float64) * noise_std
    return Corruption(selected.to(device), interpolation.to(device, dtype), noise.to(device, dtype))


def relaxed_displacement(
    pos: torch.Tensor, pos_relaxed: torch.Tensor, cell: torch.Tensor | None = None, batch: torch.Tensor | None = None
) -> torch.Tensor:
    """``pos_relaxed - pos`` ``[N, 3]``; with ``cell [B, 3, 3]`` (rows = lattice vectors) and
    ``batch [N]``, the periodic image nearest in fractional coordinates, so relaxed positions that
    were wrapped into the cell differently from the initial ones still give the true displacement."""
    delta = pos_relaxed - pos
    if cell is None:
        return delta
    cell = cell.to(delta.dtype)[batch]  # [N, 3, 3]
    frac = torch.linalg.solve(cell.transpose(1, 2), delta.unsqueeze(2)).squeeze(2)  # delta = frac @ cell
    frac = frac - torch.round(frac)
    return torch.bmm(frac.unsqueeze(1), cell).squeeze(1)


def corrupt_positions(
    pos: torch.Tensor,
    batch: torch.Tensor,
    corruption: Corruption,
    displacement: torch.Tensor | None = None,
    movable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrupted positions ``[N, 3]``.

    Args:
        pos: ``[N, 3]`` initial positions.
        batch: ``[N]`` structure index of each atom.
        corruption: the draws (:func:`draw_corruption`).
        displacement: ``[N, 3]`` initial -> relaxed displacement, or ``None`` (noise only).
        movable: ``[N]`` bool, atoms that may be corrupted (default all).

    An atom of a selected structure that is movable moves to
    ``pos + t * displacement + noise``; all others keep ``pos``.
    """
    offset = corruption.noise
    if displacement is not None:
        offset = offset + corruption.interpolation.unsqueeze(1) * displacement
    active = corruption.selected[batch]
    if movable is not None:
        active = active & movable
    return pos + active.unsqueeze(1).to(pos.dtype) * offset


def denoising_target(
    pos: torch.Tensor,
    corrupted: torch.Tensor,
    displacement: torch.Tensor | None,
    pos_std: float,
    noise_std: float,
) -> torch.Tensor:
    """The auxiliary target ``[N, 3]``.

    With ``displacement [N, 3]`` (``pos_relaxed - pos``): ``(pos + displacement - corrupted) / pos_std``,
    the displacement from the corrupted input to the relaxed position. Without (noise only): the noise
    ``(corrupted - pos) / noise_std`` (zeros where nothing was added, or when ``noise_std`` is 0).
    """
    if displacement is not None:
        return (pos + displacement - corrupted) / pos_std
    if noise_std == 0:
        return torch.zeros_like(pos)
    return (corrupted - pos) / noise_std


def mean_corrupted_target_norm(displacement: torch.Tensor, noise_std: float = 0.3, interpolate: bool = True,
                               draws: int = 8, seed: int = 0) -> float:
    """The mean L2 norm of ``pos_relaxed - corrupted input`` over free atoms of corrupted training
    inputs, from their relaxed displacements ``[M, 3]``: the reference's choice of ``pos_std``
    (Equiformer's OC20 IS2RE code divides the target by it), so that the normalised target has mean
    norm 1 (``fairchem-eqv2 noisy-nodes-scale`` computes it for an LMDB).

    For a free atom with relaxed displacement ``d`` the corrupted input is ``pos + t d + noise`` (as
    :func:`corrupt_positions`), so the un-normalised target is ``(1 - t) d - noise``; its mean norm is
    estimated over ``draws`` draws of ``t ~ U[0, 1]`` (``t = 0`` without ``interpolate``) and
    ``noise ~ N(0, noise_std^2)`` per atom, from a generator seeded with ``seed``. :class:`ConfigError`
    names a ``noise_std`` that breaks the config's rule (a finite number >= 0) or ``draws`` < 1."""
    check_arguments({"noise_std": noise_std, "draws": draws},
                    {"noise_std": CONFIG_RULES["noise_std"], "draws": integer(1)}, "mean_corrupted_target_norm")
    displacement = displacement.double().repeat(draws, 1)  # [draws * M, 3]
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(displacement.shape[0], 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(displacement.shape, generator=generator, dtype=torch.float64) * noise_std
    remaining = (1 - t) * displacement if interpolate else displacement
    return float((remaining - noise).norm(dim=1).mean())


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
class NoisyNodesBackbone(CorruptingBackbone):
    """:class:`.EquiformerV2Backbone` that corrupts its input in training (Noisy Nodes).

    Takes every argument of the backbone plus ``noisy_nodes`` (a dict, see :class:`NoisyNodesConfig`).
    Its :class:`.BackboneOutput` gains ``noisy_nodes``: the target ``[N, 3]`` and the coefficient
    (:class:`.base.AuxiliaryTarget`) for :class:`NoisyNodesHead`. Buffers ``noisy_nodes_seed`` and ``noisy_nodes_step`` (training forwards
    so far) are saved in checkpoints, so a resumed run continues the same random stream.
    """

    stream = "noisy_nodes"

    def __init__(self, *args, noisy_nodes: dict | None = None, **kwargs):
        config = NoisyNodesConfig.from_config(noisy_nodes)  # before the model is built: a bad field fails fast
        super().__init__(*args, **kwargs)
        self.noisy_nodes = config
        self.coefficient_schedule = LinearCoefficientSchedule(config.coefficient_start, config.coefficient_end, config.decay_steps)
        self._start_stream(config.seed)

    def corrupt(self, data):
        """``(model input, target [N, 3], coefficient)`` for ``data``; in training the input is a
        shallow copy of ``data`` with corrupted ``pos`` (``data`` itself is not modified) and the
        coefficient is the scheduled one times :data:`LOSS_SCALE` of the loss; in evaluation it is 1."""
        cfg = self.noisy_nodes
        pos = data.pos
        with torch.no_grad():
            displacement = None
            if "pos_relaxed" in data and data.pos_relaxed is not None:
                cell = data.cell if (self.use_pbc and "cell" in data) else None
                displacement = relaxed_displacement(pos, data.pos_relaxed.to(pos.dtype), cell, data.batch)
            if not self.training:
                return data, denoising_target(pos, pos, displacement, cfg.pos_std, cfg.noise_std), 1.0

            generator, step = self.next_generator()
            corruption = draw_corruption(len(data.natoms), pos.shape[0], cfg.probability, cfg.noise_std,
                                         generator, pos.dtype, pos.device)
            movable = None
            if not cfg.corrupt_fixed and "fixed" in data:
                movable = data.fixed == 0
            corrupted = corrupt_positions(pos, data.batch, corruption,
                                          displacement if cfg.interpolate else None, movable)
            target = denoising_target(pos, corrupted, displacement, cfg.pos_std, cfg.noise_std)
        noisy = copy.copy(data)
        noisy.pos = corrupted
        return noisy, target, self.coefficient_schedule(step) * LOSS_SCALE[cfg.loss]

    def forward(self, data) -> BackboneOutput:
        model_input, target, coefficient = self.corrupt(data)
        emb = super().forward(model_input)
        emb.noisy_nodes = AuxiliaryTarget(target, coefficient)
        return emb

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noisy_nodes={self.noisy_nodes}"


class NoisyNodesHead(ForceHead):
    """The Noisy Nodes output ``[N, 3]``: an equivariant vector per atom (``l = 1`` of a graph
    attention, as :class:`.ForceHead`), needs :class:`NoisyNodesBackbone`.

    In its forward it writes the target into the batch (``data[output_name]``) and returns the
    prediction, both multiplied by the scheduled coefficient (1 in evaluation). Configure fairchem
    with ``outputs: {<output_name>: {shape: 3, level: atom}}`` and ``loss_functions: - <output_name>:
    {fn: mae, coefficient: 1}`` (``fn: l2mae`` with the backbone's ``loss: l2mae``); ``output_name``
    must not be a key the data already has.
    """

    def __init__(self, backbone, output_name: str = "noisy_nodes"):
        if not isinstance(backbone, NoisyNodesBackbone):
            raise ConfigError(
                f"NoisyNodesHead needs backbone model fairchem_equiformerv2.NoisyNodesBackbone, got {type(backbone).__name__}"
            )
        super().__init__(backbone, output_name=output_name)

    def forward(self, data, emb: BackboneOutput) -> dict:
        prediction = super().forward(data, emb)[self.output_name]  # [N, 3]
        return {self.output_name: emb.noisy_nodes.answer(data, prediction, self.output_name)}
