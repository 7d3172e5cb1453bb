"""EquiformerV2 on fairchem-core 2.x: a converted checkpoint through ``load_predict_unit`` and
``FAIRChemCalculator`` gives the fairchem 1.x plugin's numbers; batches, relaxations, molecular
dynamics, inference settings.

Runs in the fairchem 2.x environment (``make setup-fairchem2``, then ``make test-fairchem2``). The
checkpoint and the reference energies and forces in ``data/`` were made in the fairchem 1.10
environment by ``scripts/fairchem2_reference.py`` (run it again after changing the model or the
converter): fairchem 1.10's EquiformerV2 saved by its trainer, converted with ``fairchem-eqv2
convert-checkpoint --to fairchem2``, and evaluated by the plugin's fairchem 1.x model.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from ase.units import fs
from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
from fairchem.core.units.mlip_unit import load_predict_unit
from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

import fairchem_equiformerv2
from fairchem_equiformerv2.errors import ConfigError

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "equiformer_v2_fairchem2.pt"
REFERENCE = json.loads((DATA / "reference.json").read_text())
ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-5, 1e-4  # relative: energy, forces' norm
NO_COMPILE = InferenceSettings(compile=False, tf32=False, merge_mole=False, activation_checkpointing=False)


def reference_atoms(name: str) -> Atoms:
    r = REFERENCE["structures"][name]
    atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"])
    if r["fixed"]:
        atoms.set_constraint(FixAtoms(indices=r["fixed"]))
    return atoms


def assert_matches_reference(name: str, energy: float, forces: np.ndarray) -> None:
    r = REFERENCE["structures"][name]
    expected = np.array(r["forces"])
    assert abs(energy - r["energy"]) <= ENERGY_TOLERANCE * abs(r["energy"]), (name, energy, r["energy"])
    error = np.linalg.norm(forces - expected)
    assert error <= FORCE_TOLERANCE * max(np.linalg.norm(expected), 1e-3), (name, error)


@pytest.fixture(scope="module")
def predict_unit():
    """As a user loads it: the default inference settings."""
    return load_predict_unit(str(CHECKPOINT), device="cpu")


def test_the_package_exports_the_fairchem2_adapter():
    assert fairchem_equiformerv2.fairchem_major_version() == 2
    assert fairchem_equiformerv2.EquiformerV2Backbone.__module__ == "fairchem_equiformerv2.adapters.fairchem2"


@pytest.mark.parametrize("name", list(REFERENCE["structures"]))
def test_calculator_gives_the_fairchem1_plugins_numbers(predict_unit, name):
    atoms = reference_atoms(name)
    atoms.calc = FAIRChemCalculator(predict_unit, task_name=REFERENCE["dataset"])
    assert_matches_reference(name, atoms.get_potential_energy(), atoms.get_forces())


def test_batched_prediction_of_structures_of_different_sizes(predict_unit):
    names = list(REFERENCE["structures"])
    atoms = [reference_atoms(n) for n in names]
    batch = atomicdata_list_to_batch(
        [AtomicData.from_ase(a, task_name=REFERENCE["dataset"], r_energy=False, r_forces=False, r_stress=False) for a in atoms]
    )
    out = predict_unit.predict(batch)
    assert out["energy"].shape == (len(names),) and out["forces"].shape == (sum(map(len, atoms)), 3)
    first = 0
    for i, (name, a) in enumerate(zip(names, atoms)):
        forces = out["forces"][first:first + len(a)].numpy().copy()
        forces[REFERENCE["structures"][name]["fixed"]] = 0  # as ASE's get_forces() gave the reference
        assert_matches_reference(name, float(out["energy"][i]), forces)
        first += len(a)


def test_a_prediction_leaves_the_callers_data_and_settings_as_they_were():
    """The backbone writes ``atomic_numbers_full`` and ``batch_full`` into the batch it is given (fairchem's
    element references read them there) and turns ``compile`` off in the settings it is given (the unit
    then skips its whole-model compile): both are the predict unit's own copies, not the caller's."""
    settings = InferenceSettings(compile=True, tf32=False, merge_mole=False, activation_checkpointing=False)
    settings_before = copy.deepcopy(settings)
    unit = load_predict_unit(str(CHECKPOINT), inference_settings=settings, device="cpu")
    batch = atomicdata_list_to_batch([AtomicData.from_ase(
        reference_atoms("slab_2d"), task_name=REFERENCE["dataset"], r_energy=False, r_forces=False, r_stress=False)])
    keys, tensors = set(batch.keys()), {key: value.clone() for key, value in batch if torch.is_tensor(value)}
    out = unit.predict(batch)
    assert settings == settings_before and unit.inference_settings.compile is False
    assert set(batch.keys()) == keys and "batch_full" not in keys
    assert all(torch.equal(batch[key], value) for key, value in tensors.items())
    assert_matches_reference("slab_2d", float(out["energy"][0]), out["forces"].numpy())


def test_relaxation_converges_below_the_start(predict_unit):
    """What BFGS guarantees on converging: forces under fmax. With direct forces the energy is not
    monotone along the way and the largest force swings (0.08-0.18 eV/A over the first 30 steps on an
    Intel Xeon), so only the end point is checked: converged, and lower than the start. It converged
    in 194 steps there and 326 on an AMD EPYC (float rounding picks the path); 1,000 leave room."""
    atoms = reference_atoms("slab")
    atoms.calc = FAIRChemCalculator(predict_unit, task_name=REFERENCE["dataset"])
    start_energy, start_fmax = atoms.get_potential_energy(), np.abs(atoms.get_forces()).max()
    fmax = 0.05
    assert start_fmax > fmax  # there is something to relax
    assert BFGS(atoms, logfile=None).run(fmax=fmax, steps=1000)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < fmax
    assert atoms.get_potential_energy() < start_energy
    assert np.array_equal(atoms.positions[:4], reference_atoms("slab").positions[:4])  # fixed atoms stay


def test_molecular_dynamics_runs(predict_unit):
    atoms = reference_atoms("water")
    atoms.calc = FAIRChemCalculator(predict_unit, task_name=REFERENCE["dataset"])
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))  # noqa: the ASE 3.2x name
    energies = []
    dynamics = VelocityVerlet(atoms, timestep=0.5 * fs, logfile=None)
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(20)
    assert len(energies) == 21 and np.all(np.isfinite(energies))


def test_float64_inference_setting_is_honoured():
    settings = InferenceSettings(compile=False, tf32=False, merge_mole=False, base_precision_dtype=torch.float64)
    unit = load_predict_unit(str(CHECKPOINT), inference_settings=settings, device="cpu")
    assert next(unit.model.parameters()).dtype == torch.float64
    atoms = reference_atoms("slab_2d")
    atoms.calc = FAIRChemCalculator(unit, task_name=REFERENCE["dataset"])
    assert_matches_reference("slab_2d", atoms.get_potential_energy(), atoms.get_forces())


def test_activation_checkpointing_setting_reaches_the_backbone():
    settings = InferenceSettings(compile=False, tf32=False, merge_mole=False, activation_checkpointing=True)
    unit = load_predict_unit(str(CHECKPOINT), inference_settings=settings, device="cpu")
    assert unit.model.module.backbone.activation_checkpoint is True
    unit = load_predict_unit(str(CHECKPOINT), inference_settings=NO_COMPILE, device="cpu")
    assert unit.model.module.backbone.activation_checkpoint is False


def test_settings_the_model_has_nothing_for_are_refused_by_name():
    for settings, name in (
        (InferenceSettings(compile=False, external_graph_gen=True), "external_graph_gen"),
        (InferenceSettings(compile=False, edge_chunk_size=1024), "edge_chunk_size"),
        (InferenceSettings(compile=False, predict_untrained_stress={"oc20"}), "predict_untrained_stress"),
    ):
        with pytest.raises(Exception) as caught:
            load_predict_unit(str(CHECKPOINT), inference_settings=settings, device="cpu")
        chain = [caught.value, *iter_causes(caught.value)]
        assert any(isinstance(e, ConfigError) and name in str(e) for e in chain), chain


def iter_causes(error: BaseException):
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
        yield error


# --- stress: an OMat24-style checkpoint with a decomposed stress head -------------------------------

STRESS_CHECKPOINT = DATA / "equiformer_v2_fairchem2_stress.pt"
STRESS_REFERENCE = json.loads((DATA / "reference_stress.json").read_text())


@pytest.mark.parametrize("name", list(STRESS_REFERENCE["structures"]))
def test_stress_in_ev_per_cubic_angstrom_as_the_fairchem1_plugin(name):
    unit = load_predict_unit(str(STRESS_CHECKPOINT), inference_settings=NO_COMPILE, device="cpu")
    r = STRESS_REFERENCE["structures"][name]
    atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"])
    atoms.calc = FAIRChemCalculator(unit, task_name=STRESS_REFERENCE["dataset"])
    expected = np.array(r["stress"])
    assert np.allclose(expected, expected.T, atol=1e-7)  # the decomposition's l = 1 part is zero
    voigt = expected[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # xx yy zz yz xz xy, as ASE's get_stress
    stress = atoms.get_stress()
    assert np.linalg.norm(stress - voigt) <= FORCE_TOLERANCE * np.linalg.norm(voigt), (stress, voigt)
    assert abs(atoms.get_potential_energy() - r["energy"]) <= ENERGY_TOLERANCE * abs(r["energy"])
