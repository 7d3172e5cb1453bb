"""Periodic slab + adsorbate structures for the tests, as fairchem batches."""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.constraints import FixAtoms
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs

_A2G = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_fixed=True, r_pbc=False)


def slab_with_adsorbate(metal: str = "Cu", facet: str = "111", adsorbate: str = "CO", seed: int = 0) -> Atoms:
    """A 2x2x3 slab, bottom layer fixed, an adsorbate on top, positions rattled."""
    build = fcc111 if facet == "111" else fcc100
    slab = build(metal, size=(2, 2, 3), vacuum=6.0)
    ads = molecule(adsorbate) if len(adsorbate) > 1 else Atoms(adsorbate)
    add_adsorbate(slab, ads, height=1.8, position="ontop")
    layer = np.round(slab.positions[:, 2], 1)
    tags = np.where(np.arange(len(slab)) >= len(slab) - len(ads), 2, np.where(layer > layer.min(), 1, 0))
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.rattle(0.05, seed=seed)
    slab.pbc = True
    return slab


def default_structures() -> list[Atoms]:
    return [
        slab_with_adsorbate("Cu", "111", "CO", seed=0),
        slab_with_adsorbate("Pt", "100", "O", seed=1),
        slab_with_adsorbate("Ag", "111", "OH", seed=2),
    ]


def rotated(structures: list[Atoms], rotation: np.ndarray) -> list[Atoms]:
    """Copies of ``structures`` with positions and cell turned by the 3x3 ``rotation``."""
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
        atoms.positions = atoms.positions @ rotation.T
        out.append(atoms)
    return out


def moved(structures: list[Atoms]) -> list[Atoms]:
    """Copies translated (differently each) with atom 0 moved to another periodic image (a, b
    periodic), then wrapped: the same periodic structures."""
    out = []
    for i, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.translate([1.3, -0.7, 0.4 + i])
        atoms.positions[0] += atoms.cell[0] - 2 * atoms.cell[1]  # another image of atom 0
        atoms.wrap(pbc=[True, True, False])
        out.append(atoms)
    return out


def to_batch(structures: list[Atoms], dtype: torch.dtype = torch.float32):
    """A fairchem ``Batch`` of the structures (``pos``, ``cell``, ``atomic_numbers``, ``natoms``, ...)."""
    data = []
    for i, atoms in enumerate(structures):
        d = _A2G.convert(atoms)
        d.sid, d.fid = i, 0
        d.tags = torch.as_tensor(atoms.get_tags(), dtype=torch.long)
        # from ASE directly: AtomsToGraphs rounds to float32
        d.pos = torch.tensor(atoms.positions, dtype=dtype)
        d.cell = torch.tensor(atoms.cell.array, dtype=dtype).unsqueeze(0)
        data.append(d)
    return data_list_collater(data, otf_graph=True)
