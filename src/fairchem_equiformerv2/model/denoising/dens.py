"""DeNS, denoising non-equilibrium structures (Liao, Smidt, Shuaibi, Das: "Generalizing Denoising to
Non-Equilibrium Structures Improves Equivariant Force Fields", arXiv 2403.09549): the model side, on
torch alone.

A structure from an S2EF trajectory is not at a minimum, so the displacement that restores it after
Gaussian noise is ambiguous. DeNS removes the ambiguity by also giving the model the original
structure's forces (Section 3.2): the model sees the corrupted positions, the atom types and the
original forces, and predicts the added noise (per atom) and the original structure's energy
(Section 3.3 for how the forces enter EquiformerV2; Section 3.4 for partially corrupted
structures, where only some atoms are noised and encoded, the others predict forces as usual).

This module holds the computation, in the layout of fairchem 1.10's ``EqV2DeNSBackbone`` and its
DeNS heads, so that fairchem's DeNS checkpoints load (``tools/checkpoints.py`` maps their key names):

* :class:`DeNSBackbone` adds the force encoding to the node features before the edge-degree
  embedding: each atom's force ``f [3]`` becomes ``|f| / sqrt(3) * Y(f / |f|)`` ``[(lmax+1)**2]``
  (e3nn's real spherical harmonics, component normalisation, so the ``l = 1`` part is ``f`` itself),
  mapped to ``sphere_channels`` by an :class:`.SO3Linear` (``force_embedding``). Optionally the
  noise level ``sigma [N, 1]`` of a noise schedule enters ``l = 0`` through a linear map
  (``noise_schedule_sigma_embedding``).
* :class:`DeNSEnergyHead` is :class:`.EnergyHead`; with ``use_denoising=False`` it predicts zero on
  a denoising forward (the paper's ablation).
* :class:`DeNSForceHead` has two graph attentions: ``force_block`` (forces) and
  ``denoising_pos_block`` (the noise). On a denoising forward its output is the noise prediction
  for corrupted atoms and the force prediction for the others.
* :class:`DeNSStressHead` is :class:`.StressHead`, zeroed on a denoising forward with
  ``use_denoising=False``.

Which forward is a denoising one is said by the batch, with fairchem's field names, so that these
classes run under fairchem's own DeNS trainer (``equiformerv2_dens``) as its classes do:

* ``denoising_pos_forward``: true on a denoising forward (absent or false otherwise: then the
  force encoding is zero, i.e. only ``force_embedding``'s bias, and the heads predict forces);
* ``forces [N, 3]``: the original structure's forces, encoded on a denoising forward;
* ``noise_mask [N]`` (bool, optional): the corrupted atoms; only they are encoded and denoised;
* ``sigmas [N, 1]`` (with ``use_noise_schedule_sigma_encoding``): each atom's noise level.

In evaluation (validation, prediction, relaxations) no batch carries ``denoising_pos_forward`` and
the model is a plain EquiformerV2 whose ``l = 0`` input has the constant ``force_embedding.bias``
added. The inputs are corrupted in training either by a trainer that sets those fields (fairchem's
``equiformerv2_dens``) or by the backbone itself when its config has a ``denoising`` block
(:mod:`.dens_objective`: the objective with fairchem's plain trainers). The backbone passes what it
saw to the heads as ``emb.denoising`` (:class:`DenoisingState`).
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from e3nn import o3
from torch import nn

from ..config import check_arguments, flag, optional
from ..backbone import BackboneOutput
from .base import AuxiliaryTarget, CorruptingBackbone
from .dens_objective import DENS_SALT, DenoisingConfig, corrupt_batch
from ..heads import EnergyHead, ForceHead, StressHead
from ...nn.linear import SO3Linear
from ...nn.init import init_weights

logger = logging.getLogger(__name__)

__all__ = ["is_denoising", "DenoisingState", "denoising_state", "force_encoding", "DeNSBackbone", "DeNSEnergyHead", "DeNSForceHead", "DeNSStressHead"]


def is_denoising(data) -> bool:
    """True when ``data`` is a denoising forward (``data.denoising_pos_forward`` set and true)."""
    return bool(getattr(data, "denoising_pos_forward", False))


def noise_mask(data) -> torch.Tensor | None:
    """``data.noise_mask`` as ``[N]`` bool, or ``None`` when the batch has none (all atoms corrupted)."""
    mask = getattr(data, "noise_mask", None)
    return None if mask is None else mask.view(-1).bool()


class DenoisingState(NamedTuple):
    """What the heads need to know about the forward, :attr:`.BackboneOutput.denoising`.

    active: a denoising forward.
    mask: ``[N]`` bool, the corrupted atoms, or ``None`` (all atoms, when ``active``).
    objective: with the backbone's ``denoising`` block, the denoising output's target
        (:class:`.base.AuxiliaryTarget`, see :mod:`.dens_objective`); ``None`` otherwise.
    """

    active: bool
    mask: torch.Tensor | None
    objective: AuxiliaryTarget | None = None


def denoising_state(data, emb: BackboneOutput | None = None) -> DenoisingState:
    """``emb.denoising`` when the backbone wrote it, else read from ``data``'s fields."""
    if emb is not None and emb.denoising is not None:
        return emb.denoising
    return DenoisingState(is_denoising(data), noise_mask(data) if is_denoising(data) else None)


def force_encoding(forces: torch.Tensor, lmax: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The force of each atom as coefficients of degrees ``0..lmax`` (Section 3.3).

    Args:
        forces: ``[N, 3]``.
        lmax: the highest degree.
        mask: ``[N]`` bool, the atoms to encode (others get zeros), or ``None`` for all.

    Returns:
        ``[N, (lmax+1)**2, 1]``: ``|f| / sqrt(3) * Y(f / |f|)`` in e3nn's real spherical harmonics with
        component normalisation (``Y_l`` has squared norm ``2l + 1``), so degree 0 is ``|f| / sqrt(3)``
        and degree 1 is ``f`` itself (``x, y, z``). A zero force encodes as zeros.
    """
    harmonics = o3.spherical_harmonics(list(range(lmax + 1)), forces, normalize=True, normalization="component")
    encoded = harmonics * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3.0))  # [N, F]
    if mask is not None:
        encoded = encoded * mask.unsqueeze(1).to(encoded.dtype)
    return encoded.unsqueeze(2)


class DeNSBackbone(CorruptingBackbone):
    """EquiformerV2 with the DeNS force encoding (fairchem's ``equiformer_v2_dens_backbone``).

    Forward: as :class:`.EquiformerV2Backbone` (a :class:`.BackboneOutput` with ``denoising`` set);
    on a denoising forward (``data.denoising_pos_forward``) the node features start from the atom
    embedding plus ``force_embedding(force_encoding(data.forces))`` (masked by ``data.noise_mask``),
    otherwise from the atom embedding plus ``force_embedding``'s bias.

    Takes every argument of the backbone plus fairchem's two DeNS ones:
    ``use_force_encoding`` (default true; false zeroes the encoding, the paper's ablation) and
    ``use_noise_schedule_sigma_encoding`` (default false; true adds a linear map of
    ``data.sigmas [N, 1]``, zeros when not denoising, to the ``l = 0`` features). The DeNS backbone of
    the fairchem release that trained the OMat24 models also took ``use_denoising_energy`` and
    ``use_denoising_stress`` (default true), which its heads read; here they are the default of the
    heads' ``use_denoising``.

    ``denoising`` (a dict, see :class:`.dens_objective.DenoisingConfig`) switches on the DeNS training
    objective inside the model: in training the backbone corrupts (a shallow copy of) the batch
    itself, and :class:`DeNSForceHead` answers the denoising output. Buffers ``dens_seed`` and
    ``dens_step`` (training forwards so far) then keep the random stream across checkpoints.
    """

    stream, salt = "dens", (DENS_SALT,)

    def __init__(
        self, *args, use_force_encoding: bool = True, use_noise_schedule_sigma_encoding: bool = False,
        use_denoising_energy: bool = True, use_denoising_stress: bool = True, denoising: dict | None = None, **kwargs,
    ):
        flags = {
            "use_force_encoding": use_force_encoding, "use_noise_schedule_sigma_encoding": use_noise_schedule_sigma_encoding,
            "use_denoising_energy": use_denoising_energy, "use_denoising_stress": use_denoising_stress,
        }
        check_arguments(flags, dict.fromkeys(flags, flag), type(self).__name__)
        super().__init__(*args, **kwargs)
        self.use_denoising_energy, self.use_denoising_stress = bool(use_denoising_energy), bool(use_denoising_stress)
        self.use_force_encoding = use_force_encoding
        self.use_noise_schedule_sigma_encoding = use_noise_schedule_sigma_encoding
        config = self.config
        self.force_embedding = SO3Linear(1, config.sphere_channels, config.lmax)
        self.noise_schedule_sigma_embedding = None
        if use_noise_schedule_sigma_encoding:
            self.noise_schedule_sigma_embedding = nn.Linear(1, config.sphere_channels)
        for module in (self.force_embedding, self.noise_schedule_sigma_embedding):
            if module is not None:
                module.apply(lambda m: init_weights(m, config.weight_init))
        self.denoising = None
        if denoising is not None:
            self.denoising = DenoisingConfig.from_config(denoising)
            if self.denoising.noise_schedule and not use_noise_schedule_sigma_encoding:
                logger.warning("denoising.noise_schedule without use_noise_schedule_sigma_encoding: the model is not told the noise level")
            self._start_stream(self.denoising.seed)

    def forward(self, data) -> BackboneOutput:
        if self.denoising is None:
            emb = super().forward(data)
            emb.denoising = denoising_state(data)
            return emb
        generator = self.next_generator()[0] if self.training else None
        corrupted = corrupt_batch(data, self.denoising, generator)
        emb = super().forward(corrupted.data)
        state = denoising_state(corrupted.data)
        objective = AuxiliaryTarget(corrupted.target, corrupted.scale, self.denoising.output_name)
        emb.denoising = DenoisingState(state.active, state.mask, objective)
        return emb

    def embed_atoms(self, data, atomic_numbers: torch.Tensor) -> torch.Tensor:
        x = super().embed_atoms(data, atomic_numbers)  # [N, F, C]
        num_atoms, dtype = x.shape[0], data.pos.dtype
        denoising = is_denoising(data)
        if denoising and self.use_force_encoding:
            if getattr(data, "forces", None) is None:
                raise ValueError("a denoising forward (denoising_pos_forward) needs the original forces in data.forces")
            encoded = force_encoding(data.forces.to(dtype), self.config.lmax, noise_mask(data))
        else:
            encoded = x.new_zeros(num_atoms, x.shape[1], 1, dtype=dtype)
        x = x + self.force_embedding(encoded.to(x.dtype))
        if self.noise_schedule_sigma_embedding is not None:
            if denoising:
                if getattr(data, "sigmas", None) is None:
                    raise ValueError("use_noise_schedule_sigma_encoding: a denoising forward needs data.sigmas [N, 1]")
                sigmas = data.sigmas.view(num_atoms, 1).to(x.dtype)
            else:
                sigmas = x.new_zeros(num_atoms, 1)
            sigma = self.noise_schedule_sigma_embedding(sigmas)  # [N, C]
            x = x + nn.functional.pad(sigma.unsqueeze(1), (0, 0, 0, x.shape[1] - 1))
        return x

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", use_force_encoding={self.use_force_encoding}, "
            f"use_noise_schedule_sigma_encoding={self.use_noise_schedule_sigma_encoding}"
            + (f", denoising={self.denoising}" if self.denoising is not None else "")
        )


class _DenoisingSwitch:
    """Head mix-in: ``use_denoising`` (None: the backbone's ``use_denoising_<default_from>``, true);
    false zeroes the head's outputs on a denoising forward (the paper's ablation)."""

    default_from: str

    def _set_use_denoising(self, backbone, use_denoising: bool | None) -> None:
        check_arguments({"use_denoising": use_denoising}, {"use_denoising": optional(flag)}, type(self).__name__)
        if use_denoising is None:
            use_denoising = getattr(backbone, f"use_denoising_{self.default_from}", True)
        self.use_denoising = bool(use_denoising)

    def forward(self, data, emb: BackboneOutput) -> dict:
        out = super().forward(data, emb)
        if denoising_state(data, emb).active and not self.use_denoising:
            out = {key: value * 0.0 for key, value in out.items()}
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_denoising={self.use_denoising}"


class DeNSEnergyHead(_DenoisingSwitch, EnergyHead):
    """Energy per structure ``[B]`` (fairchem's ``eqV2_DeNS_scalar_head``): :class:`.EnergyHead`.

    On a denoising forward it predicts the original structure's energy from the corrupted one
    (Section 3.2), or zero with ``use_denoising=False`` (the paper's ablation; default: the backbone's
    ``use_denoising_energy``, true).
    """

    default_from = "energy"

    def __init__(self, backbone, output_name: str = "energy", reduce: str = "sum", use_denoising: bool | None = None):
        self._set_use_denoising(backbone, use_denoising)  # before nn.Module's __init__: checked first
        super().__init__(backbone, output_name=output_name, reduce=reduce)


class DeNSForceHead(ForceHead):
    """Forces, or the noise on a denoising forward, ``[N, 3]`` (fairchem's ``eqV2_DeNS_vector_head``).

    Two graph attentions like :class:`.ForceHead`'s: ``force_block`` predicts forces,
    ``denoising_pos_block`` the noise added to each atom (in units of the noise's scale, as the
    trainer normalises its target). On a denoising forward the output is the noise prediction for
    the corrupted atoms (``data.noise_mask``, all atoms without one) and the force prediction for the
    others (Section 3.4); otherwise it is the force prediction.

    In training both blocks run on every forward (the unused one multiplied by zero), as in fairchem,
    so that every parameter has a gradient (DDP expects it); in evaluation only the needed one runs.

    With the backbone's ``denoising`` block (the objective inside the model, :mod:`.dens_objective`)
    it answers two outputs: ``forces`` (the force block; detached on corrupted atoms) and the
    denoising output (the denoising block on corrupted atoms, zeros elsewhere, times the objective's
    scale), and writes the denoising target into the batch under the output's name.
    """

    def __init__(self, backbone, output_name: str = "forces"):
        super().__init__(backbone, output_name=output_name)
        self.denoising_pos_block = backbone.compiled(backbone.make_attention(1, alpha_drop=0.0))
        self.denoising_pos_block.apply(lambda m: init_weights(m, backbone.config.weight_init))

    def forward(self, data, emb: BackboneOutput) -> dict:
        state = denoising_state(data, emb)
        if state.objective is not None:
            return self._objective(data, emb, state)
        both = self.training and torch.is_grad_enabled()
        if not state.active:
            forces = self.vector(self.force_block, emb)
            if both:
                forces = forces + 0.0 * self.vector(self.denoising_pos_block, emb)
            return {self.output_name: forces}
        mask = state.mask
        noise = self.vector(self.denoising_pos_block, emb)
        if mask is None:
            if both:
                noise = noise + 0.0 * self.vector(self.force_block, emb)
            return {self.output_name: noise}
        return {self.output_name: torch.where(mask.unsqueeze(1), noise, self.vector(self.force_block, emb))}

    def _objective(self, data, emb: BackboneOutput, state: DenoisingState) -> dict:
        objective, target = state.objective, state.objective.target
        forces = self.vector(self.force_block, emb)  # [N, 3]
        mask = state.mask if state.active else None
        if mask is not None:
            forces = torch.where(mask.unsqueeze(1), forces.detach(), forces)
        if self.training and torch.is_grad_enabled() or mask is not None:
            noise = self.vector(self.denoising_pos_block, emb)
            keep = (mask if mask is not None else torch.zeros_like(target[:, 0], dtype=torch.bool)).unsqueeze(1)
            noise = torch.where(keep, noise, 0.0 * noise)
        else:
            noise = torch.zeros_like(target)
        return {self.output_name: forces, objective.output_name: objective.answer(data, noise, dtype=noise.dtype)}


class DeNSStressHead(_DenoisingSwitch, StressHead):
    """Stress (fairchem's ``dens_rank2_symmetric_head``): :class:`.StressHead`, with the same
    arguments plus ``use_denoising``: false zeroes its outputs on a denoising forward (default: the
    backbone's ``use_denoising_stress``, true)."""

    default_from = "stress"

    def __init__(self, backbone, *args, use_denoising: bool | None = None, **kwargs):
        self._set_use_denoising(backbone, use_denoising)
        super().__init__(backbone, *args, **kwargs)
