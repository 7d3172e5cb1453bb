"""torch-sim with the converted EquiformerV2 checkpoint, through fairchem's torch-sim interface.

torch-sim (``torch-sim-atomistic`` >= 0.4) needs Python >= 3.12, so this does not run in
``.venv-fairchem2`` (Python 3.11, where only torch-sim 0.3.0 installs, too old for fairchem 2.x).
It runs in a separate Python 3.12 venv outside the repository: 6.2 GB installed, since for cp312 PyPI
has only the CUDA build of torch 2.13.0 (527 MB wheel plus nvidia-* cu13 libraries and triton, 2.7 GB
of ``nvidia/`` installed); it runs on the CPU. About 3.5 minutes of pip here::

    python3.12 -m venv /work/ts312          # here: /root/.pyenv/versions/3.12.1/bin/python -m venv ...
    echo "torch==2.13.0" > /tmp/torch-pin.txt
    /work/ts312/bin/pip install torch==2.13.0
    /work/ts312/bin/pip install -c /tmp/torch-pin.txt "fairchem-core~=2.24.0"
    /work/ts312/bin/pip install -c /tmp/torch-pin.txt torch-sim-atomistic    # 0.6.2 when checked
    /work/ts312/bin/pip install -e . --no-deps                               # e3nn comes with fairchem-core

Run from the repository root (20-40 s on one CPU thread, imports included)::

    OMP_NUM_THREADS=1 /work/ts312/bin/python scripts/torchsim_fairchem2.py

It prints OK and exits 0 when every check below holds, MISMATCH and 1 otherwise.

``torch_sim.models.fairchem.FairChemModel`` is fairchem's own
``fairchem.core.calculate.torchsim_interface.FairChemModel``. It takes the checkpoint *path*
(``model=``, loaded by ``pretrained_mlip.get_predict_unit`` with the ``"batch"`` inference settings:
no compile, activation checkpointing on) and ``task_name="oc20"`` (it must be a ``UMATask`` name; this
checkpoint's dataset is "oc20"). Nothing on the plugin's side needed changing. The script

1. runs ``ts.static`` on each system alone (a Cu(100) 2x2x3 slab with an O adsorbate in vacuum, and a
   rattled 8-atom Cu bulk cell; both periodic) and compares energy and forces with
   ``FAIRChemCalculator`` on a predict unit loaded separately (``load_predict_unit``, default settings)
   on the positions torch-sim hands to the model (tolerances as in ``tests_fairchem2``: 1e-5 relative
   on the energy, 1e-4 on the forces' norm);
2. runs ``ts.static`` on the two systems as one batch and compares with fairchem's own batched
   ``predict_unit.predict`` (``AtomicData.from_ase`` + ``atomicdata_list_to_batch``);
3. runs 10 NVE steps (``ts.nve_init``/``ts.nve_step``, 1 fs, 300 K start) on the slab, checking step 0
   against the calculator and printing potential, kinetic and total energy;
4. runs 10 steps of NVT Langevin (``ts.integrate``, 300 K, 1 fs) on the two-system batch.

Batches. The slab's forces in a batch with the bulk cell differ from the slab's alone (max 2.8e-2
eV/A here; energy 3e-7 relative), in torch-sim and in fairchem's own batched prediction alike, so
this is not torch-sim's doing: with ``max_neighbors=12`` and ``enforce_max_neighbors_strictly=True``
fairchem's ``radius_graph_pbc`` keeps 12 of several equally distant periodic images (here Cu-Cu at
3.61 A and Cu-O at 4.21 A), and which ones depends on how many images it enumerates, the maximum
over the batch (the small bulk cell needs more). fairchem 1.x's EquiformerV2 behaves the same.
Loading with ``overrides={"backbone": {"use_pbc_single": True}}`` (one search per structure) makes the
batch give each system's forces alone exactly; ``FairChemModel`` takes no ``overrides``, so the script
swaps its ``predictor`` for such a predict unit to show it.

The checkpoint has a direct (non-conservative) force head and random weights, so NVE does not
conserve the total energy (it drifts by ~2e-2 eV over 10 fs here). The checkpoint has no stress task:
keep ``compute_stress=False`` (the default); with ``compute_stress=True`` the interface returns no
stress (``"stress" not in predictions``) and ``ts.static`` then fails on ``model_outputs["stress"]``.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase.build import add_adsorbate, bulk, fcc100

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch_sim as ts  # noqa: E402
from fairchem.core.calculate.ase_calculator import FAIRChemCalculator  # noqa: E402
from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch  # noqa: E402
from fairchem.core.units.mlip_unit import load_predict_unit  # noqa: E402
from torch_sim.models.fairchem import FairChemModel  # noqa: E402
from torch_sim.units import MetalUnits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests_fairchem2" / "data" / "equiformer_v2_fairchem2.pt"
TASK = "oc20"
STEPS = 10
ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-5, 1e-4  # relative: energy, forces' norm (as tests_fairchem2)


def slab():
    atoms = fcc100("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", height=1.2, position="hollow")
    atoms.center(vacuum=6.0, axis=2)
    atoms.pbc = True
    return atoms


def cu_bulk():
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 2, 2))
    atoms.rattle(stdev=0.05, seed=1)
    return atoms


def compare(name, atoms, positions, energy, forces, calculator_unit):
    """torch-sim's energy and forces against FAIRChemCalculator on the same (wrapped, float32) positions."""
    check = atoms.copy()
    check.positions = positions
    check.calc = FAIRChemCalculator(calculator_unit, task_name=TASK)
    energy_ase, forces_ase = check.get_potential_energy(), check.get_forces()
    d_energy = abs(energy - energy_ase) / abs(energy_ase)
    d_forces = np.linalg.norm(forces - forces_ase) / max(np.linalg.norm(forces_ase), 1e-3)
    print(f"  {name:10s} E torch-sim {energy:.8f} eV, FAIRChemCalculator {energy_ase:.8f} eV, rel. diff "
          f"{d_energy:.2e}; |F| {np.linalg.norm(forces_ase):.6f} eV/A, rel. diff {d_forces:.2e}")
    return d_energy <= ENERGY_TOLERANCE and d_forces <= FORCE_TOLERANCE


def main() -> int:
    start = time.perf_counter()
    print(f"torch-sim {ts.__version__}, torch {torch.__version__}, checkpoint "
          f"{CHECKPOINT.relative_to(ROOT)}, task {TASK!r}")
    model = FairChemModel(model=CHECKPOINT, task_name=TASK, device=torch.device("cpu"))
    print(f"model: {type(model).__module__}.{type(model).__name__}, backbone "
          f"{type(model.predictor.model.module.backbone).__module__}, inference settings "
          f"{model.predictor.inference_settings}")
    calculator_unit = load_predict_unit(str(CHECKPOINT), device="cpu")
    systems = {"Cu100+O": slab(), "Cu bulk": cu_bulk()}
    ok = True

    # 1. static evaluation: each system alone against the ASE calculator, then the two-system batch
    # against fairchem's own batched prediction (AtomicData.from_ase + atomicdata_list_to_batch)
    print("static, each system alone (ts.static) against FAIRChemCalculator:")
    alone = {}
    for name, atoms in systems.items():
        state = ts.initialize_state(atoms, model.device, model.dtype)
        result = ts.static(state, model)[0]
        alone[name] = result["forces"].double().numpy()
        # the positions torch-sim hands to the model (the interface wraps them into the cell, as from_ase does)
        ok &= compare(name, atoms, state.positions.double().numpy(),
                      float(result["potential_energy"].reshape(-1)[0]), alone[name], calculator_unit)

    state = ts.initialize_state(list(systems.values()), model.device, model.dtype)
    results = ts.static(state, model)
    batch = atomicdata_list_to_batch([AtomicData.from_ase(a, task_name=TASK) for a in systems.values()])
    reference = calculator_unit.predict(batch)
    print(f"static, one batch of {state.n_systems} systems ({state.n_atoms} atoms), against fairchem's batched "
          "predict_unit.predict:")
    for i, name in enumerate(systems):
        mask = (batch.batch == i).numpy()
        energy, forces = float(results[i]["potential_energy"].reshape(-1)[0]), results[i]["forces"].double().numpy()
        energy_fc, forces_fc = float(reference["energy"][i]), reference["forces"][mask].double().numpy()
        d_energy = abs(energy - energy_fc) / abs(energy_fc)
        d_forces = np.linalg.norm(forces - forces_fc) / max(np.linalg.norm(forces_fc), 1e-3)
        d_alone = np.abs(forces - alone[name]).max()
        print(f"  {name:10s} E torch-sim {energy:.8f} eV, fairchem {energy_fc:.8f} eV, rel. diff {d_energy:.2e}; "
              f"forces rel. diff {d_forces:.2e}; max |F(batch) - F(alone)| {d_alone:.2e} eV/A")
        ok &= d_energy <= ENERGY_TOLERANCE and d_forces <= FORCE_TOLERANCE
    # The slab's forces in the batch differ from the slab's alone (here 2.8e-2 eV/A, in torch-sim and in
    # fairchem's own batch alike): max_neighbors=12 with enforce_max_neighbors_strictly=True keeps 12 of
    # several equally distant periodic images, and which ones depends on how many images
    # radius_graph_pbc enumerates, which is the maximum over the batch (the bulk cell needs more).
    # fairchem 1.x's EquiformerV2 does the same. use_pbc_single=True (one search per structure) removes it:
    single = load_predict_unit(str(CHECKPOINT), inference_settings="batch", device="cpu",
                               overrides={"backbone": {"use_pbc_single": True}})
    default_predictor, model.predictor = model.predictor, single
    batched = model(state)["forces"]
    separate = torch.cat([model(ts.initialize_state(a, model.device, model.dtype))["forces"] for a in systems.values()])
    model.predictor = default_predictor
    d_single = float((batched - separate).abs().max())
    print(f"  with overrides={{'backbone': {{'use_pbc_single': True}}}}: max |F(batch) - F(alone)| {d_single:.2e} eV/A")
    ok &= d_single <= 1e-5

    # 2. NVE on the slab
    md = ts.initialize_state(systems["Cu100+O"], model.device, model.dtype)
    md.rng = 12345
    kT = torch.tensor(300.0 * MetalUnits.temperature, dtype=model.dtype)
    dt = torch.tensor(0.001 * MetalUnits.time, dtype=model.dtype)  # 1 fs
    md = ts.nve_init(md, model, kT=kT)
    ok &= compare("NVE step 0", systems["Cu100+O"], md.positions.double().numpy(), float(md.energy[0]),
                  md.forces.double().numpy(), calculator_unit)
    print(f"NVE, {STEPS} steps of 1 fs (step, E_pot, E_kin, E_tot in eV, T in K):")
    energies = []
    for step in range(STEPS + 1):
        if step:
            md = ts.nve_step(md, model, dt=dt)
        e_kin = float(ts.calc_kinetic_energy(masses=md.masses, momenta=md.momenta, system_idx=md.system_idx)[0])
        temperature = float(ts.calc_temperature(masses=md.masses, momenta=md.momenta, system_idx=md.system_idx)[0])
        energies.append(float(md.energy[0]) + e_kin)
        if step % 2 == 0 or step == STEPS:
            print(f"  {step:3d}  {float(md.energy[0]):.6f}  {e_kin:.6f}  {energies[-1]:.6f}  {temperature:7.1f}")
    ok &= bool(np.isfinite(energies).all())

    # 3. NVT Langevin on the batch through the runner
    final = ts.integrate(system=list(systems.values()), model=model, integrator=ts.Integrator.nvt_langevin,
                         n_steps=STEPS, temperature=300.0, timestep=0.001)
    temperatures = ts.calc_temperature(masses=final.masses, momenta=final.momenta, system_idx=final.system_idx)
    print(f"NVT Langevin (ts.integrate), {STEPS} steps of 1 fs on the batch: final E_pot "
          f"{[round(float(e), 6) for e in final.energy]} eV, T {[round(float(t), 1) for t in temperatures]} K")
    ok &= bool(torch.isfinite(final.energy).all() and torch.isfinite(final.positions).all())

    print(f"{time.perf_counter() - start:.1f} s")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
