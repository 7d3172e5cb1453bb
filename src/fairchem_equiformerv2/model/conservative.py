"""Energy-conserving outputs: forces and stress as gradients of the energy.

``F = -dE/dx`` and ``sigma = (1/V) dE/d(epsilon)`` (Fu et al. 2025, eSEN, Sec. 3: a symmetric strain
``epsilon``, zero in value, applied to positions and cell before the graph is built, so that every
edge vector moves with it). Direct forces (:class:`.heads.ForceHead`) are not the gradient of
anything: in NVE molecular dynamics the total energy drifts, and phonons, elastic constants or
free-energy methods need a potential. Measurements: ``docs/conservative.md``.

Two pieces:

* :class:`EnergyGradients`, which the backbone holds when a head asks for gradients: it gives the
  batch positions that require grad and the strain (``prepare``), and turns an energy into forces and
  stress (``differentiate``).
* :class:`ConservativeHead`, an :class:`.heads.EnergyHead` (same weights, same names in a state dict)
  that returns ``energy [B]``, ``forces [N, 3]`` and, with ``stress=True``, ``stress [B, 9]``
  (row-major 3x3, fairchem's layout for ``stress`` targets; the sign of ASE's stress: positive under
  tension).

Under fairchem 1.x's prediction (``torch.no_grad()``) the backbone and this head switch gradients on
for themselves. In training (gradients on outside the model) the forces keep their graph
(``create_graph``), so a force loss reaches the weights; elsewhere they are detached. Everything on
this path computes with plain autograd (:mod:`.nn.plain_autograd`) and differentiable edge frames
(:mod:`.so3.frames`, :mod:`.so3.smooth_wigner`); direct-force models keep their leaner path.

The normalisers: the model predicts a normalised energy ``(E - mean) / stdev`` and its gradient, so
fairchem's ``forces`` normaliser must have ``mean: 0`` and the energy's ``stdev`` (see the
conservative configs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import ConfigError, InputError
from .backbone import BackboneOutput
from .heads import EnergyHead
from ..nn.ops.autograd_mode import plain_autograd
from ..nn.precision import at_least_float32


@dataclass
class EnergyGradients:
    """What the backbone differentiates the energy by: positions, and a strain when ``stress``."""

    stress: bool = False

    def prepare(self, data) -> tuple[object, dict[str, torch.Tensor]]:
        """A shallow copy of the batch whose ``pos [N, 3]`` (and ``cell [B, 3, 3]``) derive from leaves that
        require grad, and those leaves, :class:`.backbone.BackboneOutput`'s fields: ``{"gradient_positions":
        [N, 3], "gradient_strain": [B, 3, 3], "gradient_cell": [B, 3, 3]}`` (strain and cell only with
        ``stress``). Call with gradients enabled."""
        out = copy.copy(data)
        positions = data.pos.detach().requires_grad_(True)
        inputs = {"gradient_positions": positions}
        out.pos = positions
        if self.stress:
            num_structures = len(data.natoms)
            cell = getattr(data, "cell", None)
            if cell is None or cell.numel() != 9 * num_structures:
                raise InputError(
                    f"stress needs a cell [{num_structures}, 3, 3] per batch (got "
                    f"{None if cell is None else tuple(cell.shape)})"
                )
            cell = cell.reshape(num_structures, 3, 3).to(positions.dtype)
            strain = torch.zeros_like(cell, requires_grad=True)
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            # r -> r (1 + epsilon) for every position (row vector) and cell vector
            out.pos = positions + torch.bmm(positions.unsqueeze(1), symmetric[data.batch]).squeeze(1)
            out.cell = cell + torch.bmm(cell, symmetric)
            inputs["gradient_strain"] = strain
            inputs["gradient_cell"] = cell.detach()
        return out, inputs

    def differentiate(
        self, energy: torch.Tensor, emb: BackboneOutput, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``energy [B]`` -> forces ``-dE/dx [N, 3]`` and, with ``stress``, ``(1/V) dE/d(epsilon) [B, 9]``
        (``None`` otherwise), from the leaves :meth:`prepare` made (in ``emb``)."""
        leaves = [emb.gradient_positions] + ([emb.gradient_strain] if self.stress else [])
        grads = torch.autograd.grad(energy.sum(), leaves, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        forces = -grads[0]
        if not self.stress:
            return forces, None
        volume = torch.linalg.det(emb.gradient_cell).abs()  # [B]
        if not (volume > 0).all():
            s = int((volume <= 0).nonzero()[0])
            raise InputError(f"structure {s}: stress needs a cell of non-zero volume; its cell is {emb.gradient_cell[s].tolist()}")
        return forces, (grads[1] / volume.view(-1, 1, 1)).reshape(-1, 9)


class ConservativeHead(EnergyHead):
    """Energy ``[B]``, forces ``-dE/dx [N, 3]`` and, with ``stress``, stress ``(1/V) dE/d(epsilon)
    [B, 9]``, from one energy network (:class:`.heads.EnergyHead`'s).

    Args:
        backbone: the EquiformerV2 backbone; this head tells it to make positions (and the strain)
            differentiable. One such head per backbone.
        output_name, reduce: as :class:`.heads.EnergyHead`.
        forces_name: the forces' output name.
        stress: also return the stress (needs a cell of non-zero volume in every structure).
        stress_name: the stress's output name.
    """

    def __init__(
        self,
        backbone,
        output_name: str = "energy",
        reduce: str = "sum",
        forces_name: str = "forces",
        stress: bool = False,
        stress_name: str = "stress",
    ):
        if not isinstance(stress, bool):
            raise ConfigError(f"ConservativeHead: stress={stress!r}: must be true or false")
        names = [output_name, forces_name] + ([stress_name] if stress else [])
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"ConservativeHead: output_name, forces_name, stress_name = {names}: must be distinct, non-empty names")
        if backbone.config.activation_checkpoint:
            raise ConfigError(
                "ConservativeHead with activation_checkpoint=True: the checkpointed blocks would recompute "
                "outside plain autograd in the backward pass, where the force loss needs second derivatives; "
                "set activation_checkpoint: false"
            )
        if backbone.config.compile_options is not None:
            raise ConfigError(
                "ConservativeHead with torch_compile: torch 2.4's compiled graphs have no double backward, "
                "which training on gradient forces needs; set torch_compile: false"
            )
        if getattr(backbone, "energy_gradients", None) is not None:
            raise ConfigError("ConservativeHead: the backbone already serves another ConservativeHead; use one per model")
        super().__init__(backbone, output_name=output_name, reduce=reduce)
        self.forces_name, self.stress, self.stress_name = forces_name, stress, stress_name
        self.gradients = EnergyGradients(stress=stress)
        backbone.energy_gradients = self.gradients

    @property
    def use_amp(self) -> bool:
        """fairchem's ``HeadInterface``: no autocast around this head (derivatives in full precision)."""
        return False

    def forward(self, data, emb: BackboneOutput) -> dict:
        if emb.gradient_positions is None:
            raise RuntimeError("ConservativeHead: the backbone did not make positions differentiable (was it built with this head?)")
        create_graph = torch.is_grad_enabled()  # training: the force loss must reach the weights
        with torch.enable_grad(), plain_autograd():
            energy = super().forward(data, emb)[self.output_name]  # [B]
            forces, stress = self.gradients.differentiate(energy, emb, create_graph)
        out = {self.output_name: energy, self.forces_name: at_least_float32(forces)}
        if stress is not None:
            out[self.stress_name] = at_least_float32(stress)
        if not create_graph:
            out = {name: value.detach() for name, value in out.items()}
        return out  # energy [B], forces [N, 3], stress [B, 9]

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", forces_name={self.forces_name!r}, stress={self.stress}"
            + (f", stress_name={self.stress_name!r}" if self.stress else "")
        )
