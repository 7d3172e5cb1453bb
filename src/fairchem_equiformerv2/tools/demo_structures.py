"""Adsorbate-on-slab structures labelled with ASE's EMT potential, for the demo datasets.

Everything here is plain ASE: ``Atoms`` in, ``Atoms`` out, the labels (energy in eV, forces
in eV/Å) attached as a ``SinglePointCalculator``. Randomness comes only from the
``numpy.random.Generator`` passed in, so a seeded generator gives the same structures.

Conventions follow OC20:

* tags: 0 sub-surface slab atoms (fixed), 1 surface slab atoms (free), 2 adsorbate atoms;
* fixed atoms carry an ``ase.constraints.FixAtoms`` constraint;
* periodic in all three directions (``pbc=True``), with vacuum along z.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.optimize import BFGS

#: fcc metals that ASE's EMT has parameters for.
METALS: tuple[str, ...] = ("Cu", "Pt", "Ag", "Au", "Ni", "Pd", "Al")

#: Surface builders by facet name.
FACETS: dict[str, Callable[..., Atoms]] = {"111": fcc111, "100": fcc100, "110": fcc110}

#: Adsorbates made of EMT's light elements (H, C, N, O): symbols and positions in Å,
#: the binding atom first, at the origin, the rest above it along +z.
ADSORBATES: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "H": ("H", ((0.0, 0.0, 0.0),)),
    "C": ("C", ((0.0, 0.0, 0.0),)),
    "N": ("N", ((0.0, 0.0, 0.0),)),
    "O": ("O", ((0.0, 0.0, 0.0),)),
    "CO": ("CO", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.15))),
    "OH": ("OH", ((0.0, 0.0, 0.0), (0.0, 0.0, 0.97))),
    "NH": ("NH", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.04))),
    "CH": ("CH", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.09))),
}

TAG_SUBSURFACE, TAG_SURFACE, TAG_ADSORBATE = 0, 1, 2

#: Number of top slab layers that are free to move (tag 1); the layers below are fixed.
FREE_LAYERS = 2


def build_slab(metal: str, facet: str, layers: int, vacuum: float = 7.0) -> Atoms:
    """A 2x2 surface cell of ``layers`` layers, the bottom ``layers - FREE_LAYERS`` fixed.

    Returns:
        ``Atoms`` with ``4 * layers`` atoms, tags 1 (top ``FREE_LAYERS`` layers) or 0
        (fixed, with a ``FixAtoms`` constraint), ``pbc=True``, ``vacuum`` Å each side in z.
    """
    if layers <= FREE_LAYERS:
        raise ValueError(f"need more than {FREE_LAYERS} layers to have fixed ones, got {layers}")
    slab = FACETS[facet](metal, size=(2, 2, layers), vacuum=vacuum)
    layer_from_top = slab.get_tags()  # ase.build numbers layers 1 (top) .. layers (bottom)
    tags = np.where(layer_from_top <= FREE_LAYERS, TAG_SURFACE, TAG_SUBSURFACE)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == TAG_SUBSURFACE))
    slab.pbc = True
    return slab


def place_adsorbate(slab: Atoms, name: str, site: str, height: float, shift_xy: np.ndarray) -> Atoms:
    """A copy of ``slab`` with adsorbate ``name`` at ``site``, ``height`` Å above the top layer.

    Args:
        slab: from :func:`build_slab` (its ``info`` names the sites).
        name: a key of :data:`ADSORBATES`.
        site: a site of the facet (``slab.info["adsorbate_info"]["sites"]``).
        height: height of the binding atom above the top slab layer, in Å.
        shift_xy: ``[2]`` extra in-plane displacement of the adsorbate, in Å.

    Returns:
        ``Atoms``: the slab atoms followed by the adsorbate atoms (tag 2), same constraint.
    """
    symbols, positions = ADSORBATES[name]
    adsorbate = Atoms(symbols, positions=positions, tags=[TAG_ADSORBATE] * len(positions))
    system = slab.copy()
    add_adsorbate(system, adsorbate, height=height, position=site)
    added = np.arange(len(slab), len(system))
    system.positions[added, :2] += shift_xy
    system.set_tags(np.concatenate([slab.get_tags(), np.full(len(added), TAG_ADSORBATE)]))
    system.pbc = True
    return system


def random_system(
    rng: np.random.Generator,
    max_layers: int = 4,
    rattle_stdev: float = 0.0,
    height: tuple[float, float] = (1.2, 2.2),
    lateral_offset: float | None = 0.4,
) -> Atoms:
    """A random metal/facet/adsorbate/site, adsorbate at a random height and offset.

    Args:
        rng: the only source of randomness.
        max_layers: slabs have 3 to ``max_layers`` layers (12 to ``4 * max_layers`` metal atoms).
        rattle_stdev: Gaussian noise (Å) added to the free atoms' positions; 0 for none.
        height: the binding atom starts ``U(*height)`` Å above the top layer.
        lateral_offset: the adsorbate is shifted from its site by ``U(-a, a)`` Å along x and y;
            ``None``: by a uniform random point of the surface cell (any lateral position, as OC20's
            initial structures).
    """
    metal = str(rng.choice(METALS))
    facet = str(rng.choice(sorted(FACETS)))
    layers = int(rng.integers(FREE_LAYERS + 1, max_layers + 1))
    slab = build_slab(metal, facet, layers)
    sites = sorted(slab.info["adsorbate_info"]["sites"])
    name, site = str(rng.choice(sorted(ADSORBATES))), str(rng.choice(sites))
    start_height = float(rng.uniform(*height))
    if lateral_offset is None:
        shift_xy = rng.uniform(0.0, 1.0, size=2) @ slab.cell.array[:2, :2]
    else:
        shift_xy = rng.uniform(-lateral_offset, lateral_offset, size=2)
    system = place_adsorbate(slab, name=name, site=site, height=start_height, shift_xy=shift_xy)
    if rattle_stdev > 0:
        system = displaced(system, rng, rattle_stdev)
    return system


def free_mask(atoms: Atoms) -> np.ndarray:
    """``[natoms]`` bool: True for atoms not held by a ``FixAtoms`` constraint."""
    mask = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.index] = False
    return mask


def displaced(atoms: Atoms, rng: np.random.Generator, stdev: float) -> Atoms:
    """A copy of ``atoms`` (without labels) with N(0, ``stdev``²) noise on the free atoms."""
    out = atoms.copy()
    out.calc = None
    free = free_mask(out)
    out.positions[free] += rng.normal(0.0, stdev, size=(int(free.sum()), 3))
    return out


def labelled(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` carrying its EMT energy and forces (all atoms, constraints ignored)."""
    probe = atoms.copy()
    probe.calc = EMT()
    return _snapshot(probe)


def emt_relaxation(atoms: Atoms, fmax: float = 0.05, steps: int = 100) -> list[Atoms]:
    """Relax ``atoms`` with EMT and BFGS; every visited structure, labelled.

    Args:
        atoms: the start; not modified.
        fmax: convergence threshold on the largest free-atom force, eV/Å.
        steps: at most this many optimizer steps.

    Returns:
        ``[num_steps + 1]`` labelled ``Atoms``: the start, then one per step; the last one
        is the relaxed structure (or the last step reached).
    """
    moving = atoms.copy()
    moving.calc = EMT()
    frames: list[Atoms] = []
    optimizer = BFGS(moving, logfile=None)
    optimizer.attach(lambda: frames.append(_snapshot(moving)), interval=1)
    optimizer.run(fmax=fmax, steps=steps)
    return frames


def _snapshot(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` whose calculator holds the current energy and raw forces.

    Reads the results the calculator already holds for these positions (computing them
    if needed), so recording an optimizer step costs no extra force evaluation.
    """
    calc = atoms.calc
    if calc.calculation_required(atoms, ["energy", "forces"]):
        calc.get_forces(atoms)
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=calc.results["energy"], forces=calc.results["forces"].copy())
    return frame
