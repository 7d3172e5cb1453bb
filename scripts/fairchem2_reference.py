"""Make the fairchem 2.x suite's checkpoint and reference outputs, in the fairchem 1.10 environment.

    .venv/bin/python scripts/fairchem2_reference.py        # writes tests_fairchem2/data/

1. fairchem 1.10's own EquiformerV2 (random, perturbed weights, an EMA stepped a few times,
   normalizers and element references), saved by its trainer (the test suite's builder,
   ``tests/test_checkpoints.save_fairchem_hydra``);
2. converted to the plugin's 1.x checkpoint (``convert_checkpoint``) and to a fairchem 2.x inference
   checkpoint (``convert_checkpoint(..., to="fairchem2")``): ``equiformer_v2_fairchem2.pt``; likewise
   an OMat24-style one with a decomposed stress head and its normalizers:
   ``equiformer_v2_fairchem2_stress.pt`` (``reference_stress.json``, with the stress in eV/A^3);
3. energies and forces of the plugin's 1.x checkpoint through fairchem 1.10's ``OCPCalculator`` on the
   structures of ``reference.json``, with the EMA weights (fairchem 1.x's ``--mode predict`` uses them;
   its ``OCPCalculator`` drops the EMA, so they are put in here as fairchem's trainer does; fairchem
   2.x's predict unit always predicts with them): what the fairchem 2.x calculator must reproduce.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.constraints import FixAtoms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "tests_fairchem2" / "data"
DATASET, STRESS_DATASET = "oc20", "omat"
STRESS_OUTPUTS = {
    "energy": {"shape": 1, "level": "system"},
    "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
    "stress": {"level": "system", "property": "stress",
               "decomposition": {"stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}},
}


def structures() -> dict[str, Atoms]:
    """Slabs with adsorbates (3-D and 2-D periodic), a molecule without a cell, a lone atom."""
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, molecule("CO"), height=1.8, position="ontop")
    slab.set_constraint(FixAtoms(indices=range(4)))
    slab.rattle(0.05, seed=0)
    slab.pbc = True
    slab2d = fcc100("Pt", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab2d, "O", height=1.5, position="hollow")
    slab2d.rattle(0.05, seed=1)
    slab2d.pbc = [True, True, False]
    water = molecule("H2O")
    lone = Atoms("Cu", positions=[[1.0, 2.0, 3.0]], cell=[10, 10, 10], pbc=True)
    return {"slab": slab, "slab_2d": slab2d, "water": water, "lone_atom": lone}


def stress_structures() -> dict[str, Atoms]:
    """Strained and rattled bulk: a skewed Cu cell and a Pt3O cell."""
    from ase.build import bulk

    copper = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    copper.set_cell(copper.cell.array @ [[1.0, 0.02, 0.0], [0.0, 0.98, 0.03], [0.0, 0.0, 1.01]], scale_atoms=True)
    copper.rattle(0.05, seed=2)
    oxide = bulk("Pt", "fcc", a=3.9, cubic=True)
    oxide.symbols[0] = "O"
    oxide.rattle(0.05, seed=3)
    return {"skewed_copper": copper, "platinum_oxide": oxide}


def save_stress_checkpoint(tmp: Path) -> str:
    """fairchem's EquiformerV2 with energy, forces and a decomposed (OMat24-style) stress head."""
    from fairchem.core.modules.normalization.normalizer import create_normalizer
    from test_checkpoints import BACKBONE, _fairchem_trainer

    model = {
        "name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
        "backbone": {"model": "equiformer_v2_backbone", **BACKBONE},
        "heads": {"energy": {"module": "equiformerV2_scalar_head"}, "forces": {"module": "equiformerV2_vector_head"},
                  "stress": {"module": "rank2_symmetric_head", "output_name": "stress", "decompose": True,
                             "use_source_target_embedding": True}},
    }
    trainer = _fairchem_trainer(model, tmp, "s2ef", outputs=STRESS_OUTPUTS)
    trainer.normalizers["stress_isotropic"] = create_normalizer(mean=0.002, rmsd=0.03)
    trainer.normalizers["stress_anisotropic"] = create_normalizer(mean=0.0, rmsd=0.02)
    return trainer.save(checkpoint_file="fairchem_stress.pt")


def evaluate(plugin: Path, atoms_by_name: dict[str, Atoms], properties: tuple[str, ...]) -> dict:
    """The plugin's 1.x checkpoint through ``OCPCalculator``, with its EMA weights put in."""
    import torch
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    calc = OCPCalculator(checkpoint_path=str(plugin), cpu=True, trainer="ocp")
    ema = torch.load(plugin, weights_only=True)["ema"]
    average = ExponentialMovingAverage(calc.trainer.model.parameters(), ema["decay"])
    average.load_state_dict(ema)
    average.copy_to()
    reference = {}
    for name, atoms in atoms_by_name.items():
        calc.calculate(atoms, list(properties), ["positions", "numbers", "cell", "pbc"])
        forces = calc.results["forces"].copy()
        fixed = [int(i) for i in (atoms.constraints[0].index if atoms.constraints else [])]
        forces[fixed] = 0  # as ASE's get_forces() applies FixAtoms
        reference[name] = {
            "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
            "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist(), "fixed": fixed,
            "energy": float(calc.results["energy"]), "forces": forces.tolist(),
        }
        if "stress" in properties:
            reference[name]["stress"] = calc.results["stress"].reshape(3, 3).tolist()
    return reference


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from test_checkpoints import save_fairchem_hydra

    from fairchem_equiformerv2.tools.checkpoints import convert_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for folder in ("plain", "stress"):
            (tmp / folder).mkdir()
        for source, suffix, dataset, atoms, properties in (
            (save_fairchem_hydra(tmp / "plain"), "", DATASET, structures(), ("energy", "forces")),
            (save_stress_checkpoint(tmp / "stress"), "_stress", STRESS_DATASET, stress_structures(),
             ("energy", "forces", "stress")),
        ):
            plugin = convert_checkpoint(source, tmp / f"plugin{suffix}.pt")
            fairchem2 = OUT / f"equiformer_v2_fairchem2{suffix}.pt"
            convert_checkpoint(source, fairchem2, to="fairchem2", dataset=dataset, overwrite=True)
            reference = evaluate(plugin, atoms, properties)
            (OUT / f"reference{suffix}.json").write_text(json.dumps({"dataset": dataset, "structures": reference}, indent=1))
            print(f"wrote {fairchem2} and {OUT / f'reference{suffix}.json'}: "
                  + ", ".join(f"{k} {v['energy']:.6f} eV" for k, v in reference.items()))


if __name__ == "__main__":
    main()
