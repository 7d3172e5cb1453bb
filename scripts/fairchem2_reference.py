"""Make the fairchem 2.x suite's checkpoint and reference outputs, in the fairchem 1.10 environment.

    .venv/bin/python scripts/fairchem2_reference.py        # writes tests_fairchem2/data/

1. fairchem 1.10's own EquiformerV2 (random, perturbed weights, an EMA stepped a few times,
   normalizers and element references), saved by its trainer (the test suite's builder,
   ``tests/test_checkpoints.save_fairchem_hydra``);
2. converted to the plugin's 1.x checkpoint (``convert_checkpoint``) and to a fairchem 2.x inference
   checkpoint (``convert_checkpoint(..., to="fairchem2")``): ``equiformer_v2_fairchem2.pt``;
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
DATASET = "oc20"


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


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage
    from test_checkpoints import save_fairchem_hydra

    from fairchem_equiformerv2.checkpoints import convert_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = save_fairchem_hydra(Path(tmp))
        plugin = convert_checkpoint(source, Path(tmp) / "plugin.pt")
        convert_checkpoint(source, OUT / "equiformer_v2_fairchem2.pt", to="fairchem2", dataset=DATASET, overwrite=True)
        calc = OCPCalculator(checkpoint_path=str(plugin), cpu=True, trainer="ocp")
        ema = torch.load(plugin, weights_only=True)["ema"]
        average = ExponentialMovingAverage(calc.trainer.model.parameters(), ema["decay"])
        average.load_state_dict(ema)
        average.copy_to()
        reference = {}
        for name, atoms in structures().items():
            atoms.calc = calc
            reference[name] = {
                "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
                "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist(),
                "fixed": [int(i) for i in (atoms.constraints[0].index if atoms.constraints else [])],
                "energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist(),
            }
    (OUT / "reference.json").write_text(json.dumps({"dataset": DATASET, "structures": reference}, indent=1))
    print(f"wrote {OUT / 'equiformer_v2_fairchem2.pt'} and {OUT / 'reference.json'}: "
          + ", ".join(f"{k} {v['energy']:.6f} eV" for k, v in reference.items()))


if __name__ == "__main__":
    main()
