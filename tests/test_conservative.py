"""Forces and stress as gradients of the energy (``fairchem_equiformerv2.ConservativeHead``).

Float64 throughout unless a test says otherwise. The model's distance basis is 600 Gaussians of width
2 x 5/600 A (fairchem's), so the energy has structure on the 0.02 A scale: central differences need a
small step (error ~ h^2: 5.6e-5 relative at h = 1e-4, 5.6e-7 at 1e-5, 2e-8 at 1e-6 on the slab below),
hence ``STEP = 1e-6``.

Measured (float64, this file's models; ``pytest tests/test_conservative.py -s`` prints them):
forces against central differences 2.8e-8 (slab), 8.5e-8 (molecule), 7.7e-8 (skewed bulk) relative;
stress against finite strains 1.6e-8 (slab), 3.4e-8 (skewed bulk); rotation: energy 5.2e-5, gradient
forces 3.4e-3 (the S2 grid's error; direct forces of this variant: 1.5e-2 in ``test_symmetry.py``);
translations, periodic images and permutations exact to rounding.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from e3nn import o3
from fairchem.core.models.base import HydraModel
from structures import default_structures, moved, rotated, to_batch

from fairchem_equiformerv2.model.conservative import ConservativeHead
from fairchem_equiformerv2.errors import ConfigError, InputError
from fairchem_equiformerv2.so3.frames import _H0, _H1, edge_frames
from fairchem_equiformerv2.so3.smooth_wigner import smooth_wigner_d
from fairchem_equiformerv2.so3.wigner import wigner_d

SMALL = dict(
    num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
    attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, max_radius=5.0, max_neighbors=500,
    lmax_list=[4], mmax_list=[2], alpha_drop=0.0, drop_path_rate=0.0,
)
STEP = 1e-6
STRAIN_STEP = 2e-7  # moves atoms 5 A from the origin by 1e-6 A, as STEP does
FD_BOUND = 1e-6  # the bound; measured <= 3e-8


def model(stress: bool = False, direct: bool = False, dtype=torch.float64, **backbone) -> HydraModel:
    torch.manual_seed(0)
    heads = (
        {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}}
        if direct
        else {"energy": {"module": "fairchem_equiformerv2.ConservativeHead", "stress": stress}}
    )
    m = HydraModel(
        backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL, **backbone},
        heads=heads, pass_through_head_outputs=True,
    )
    with torch.no_grad():  # off the trivial initial values (LayerNorm weights 1, biases 0)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


def skewed_bulk() -> Atoms:
    # a = 3.61: with 3.6 a lattice vector of this skewed cell is 5.000 A long, on the cutoff, where
    # the graph (and so the energy: EquiformerV2 has no cutoff envelope) jumps
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell.array + np.array([[0.0, 0.3, -0.2], [0.4, 0.0, 0.1], [0.2, -0.3, 0.0]]), scale_atoms=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def lone_molecule() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.02, seed=4)
    atoms.pbc = False
    return atoms


STRUCTURES = {"slab": lambda: default_structures()[0], "molecule": lone_molecule, "skewed_bulk": skewed_bulk}


def energy_at(m, atoms: Atoms, dtype=torch.float64) -> float:
    with torch.no_grad():
        return float(m(to_batch([atoms], dtype))["energy"][0])


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def conservative():
    return model(stress=True)


@pytest.fixture(scope="module")
def forces_only():
    return model()


@pytest.mark.parametrize("name", STRUCTURES)
def test_forces_are_minus_the_energy_gradient(conservative, forces_only, name):
    """With the strain in the graph (stress on) for the periodic structures; without for the molecule."""
    atoms = STRUCTURES[name]()
    if name == "molecule":
        conservative = forces_only
    with torch.no_grad():  # as fairchem predicts: the head switches gradients on for itself
        forces = conservative(to_batch([atoms], torch.float64))["forces"]
    assert not forces.requires_grad and torch.isfinite(forces).all()
    picked = range(0, len(atoms), max(1, len(atoms) // 5))
    analytic, numeric = [], []
    for i in picked:
        for d in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, d] += STEP
            minus.positions[i, d] -= STEP
            numeric.append(-(energy_at(conservative, plus) - energy_at(conservative, minus)) / (2 * STEP))
            analytic.append(float(forces[i, d]))
    error = rel(numeric, analytic)
    print(f"{name}: forces vs central differences {error:.1e}")
    assert error <= FD_BOUND


@pytest.mark.parametrize("name", ["slab", "skewed_bulk"])
def test_stress_is_the_strain_derivative(conservative, name):
    atoms = STRUCTURES[name]()
    stress = conservative(to_batch([atoms], torch.float64))["stress"].view(3, 3).detach()
    cell, volume = atoms.cell.array, atoms.get_volume()
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            values = []
            for sign in (1, -1):
                strain = np.zeros((3, 3))
                strain[i, j] += sign * STRAIN_STEP / 2
                strain[j, i] += sign * STRAIN_STEP / 2
                strained = atoms.copy()
                strained.set_cell(cell @ (np.eye(3) + strain), scale_atoms=False)
                strained.positions = atoms.positions @ (np.eye(3) + strain)
                values.append(energy_at(conservative, strained))
            numeric[i, j] = (values[0] - values[1]) / (2 * STRAIN_STEP) / volume
    error = rel(numeric, stress)
    print(f"{name}: stress vs finite strains {error:.1e}")
    assert error <= FD_BOUND
    assert torch.allclose(stress, stress.T, atol=1e-12)


def predict(m, structures):
    with torch.no_grad():
        out = m(to_batch(structures, torch.float64))
    return out["energy"], out["forces"]


def test_rotation(conservative):
    structures = default_structures()
    energy, forces = predict(conservative, structures)
    torch.manual_seed(1)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    energy_r, forces_r = predict(conservative, rotated(structures, rotation))
    e_err, f_err = rel(energy, energy_r), rel(forces @ torch.from_numpy(rotation).T, forces_r)
    print(f"gradient forces: rotation energy {e_err:.1e}, forces {f_err:.1e}")
    # the direct model's bounds for this variant (test_symmetry.py): the S2 grid's error
    assert e_err <= 5e-4 and f_err <= 6e-2


def test_rotation_exact_with_gate_activations():
    """Gate activations are exactly equivariant: so are the gradient forces, to rounding."""
    m = model(use_gate_act=True)
    structures = default_structures()[:2]
    energy, forces = predict(m, structures)
    torch.manual_seed(2)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    energy_r, forces_r = predict(m, rotated(structures, rotation))
    assert rel(energy, energy_r) <= 1e-10 and rel(forces @ torch.from_numpy(rotation).T, forces_r) <= 1e-9


def test_translation_periodic_images_and_permutation(conservative):
    structures = default_structures()
    energy, forces = predict(conservative, structures)
    energy_m, forces_m = predict(conservative, moved(structures))
    assert rel(energy, energy_m) <= 1e-10 and rel(forces, forces_m) <= 1e-10

    permutations = [torch.randperm(len(a), generator=torch.Generator().manual_seed(i)) for i, a in enumerate(structures)]
    energy_p, forces_p = predict(conservative, [atoms[p.numpy()] for atoms, p in zip(structures, permutations)])
    offsets = torch.tensor([0] + [len(a) for a in structures]).cumsum(0)
    expected = torch.cat([forces[o + p] for o, p in zip(offsets, permutations)])
    assert rel(energy, energy_p) <= 1e-10 and rel(expected, forces_p) <= 1e-10


def test_supercell_forces_and_stress(conservative):
    """A 2x2x1 supercell: 4x the energy, the same forces per copy, the same stress (intensive)."""
    atoms = default_structures()[1]
    out = conservative(to_batch([atoms], torch.float64))
    out_s = conservative(to_batch([atoms.repeat((2, 2, 1))], torch.float64))
    assert rel(4 * out["energy"], out_s["energy"]) <= 1e-10
    assert rel(out["forces"].expand(4, -1, -1), out_s["forces"].view(4, -1, 3)) <= 1e-10
    assert rel(out["stress"], out_s["stress"]) <= 1e-9


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _tilted(direction: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` turned by ``angle`` radians towards a generic perpendicular."""
    perpendicular = _unit(np.cross(direction, [0.3, -0.5, 0.8]))
    return np.cos(angle) * direction + np.sin(angle) * perpendicular


# The frame's helper vectors (h0, and h1 for edges near +-h0), e3nn's polar axis (where the Euler
# angles of the detached route lock) and the other coordinate axes; each exactly and within 1e-6 rad.
SPECIAL = {"h0": _unit(_H0), "-h0": -_unit(_H0), "h1": _unit(_H1), "y": np.array([0.0, 1.0, 0.0]),
           "-y": np.array([0.0, -1.0, 0.0]), "x": np.array([1.0, 0.0, 0.0]), "z": np.array([0.0, 0.0, 1.0])}
DIRECTIONS = {f"{k}{t}": _tilted(v, a) for k, v in SPECIAL.items() for t, a in (("", 0.0), ("+1e-6rad", 1e-6))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frame_and_wigner_gradients_for_every_direction(dtype):
    """d D(R(x)) / dx is finite at every special direction; in float64 it passes gradcheck there."""
    vectors = torch.tensor(np.stack(list(DIRECTIONS.values())) * 1.7, dtype=dtype, requires_grad=True)
    d = smooth_wigner_d(edge_frames(vectors, differentiable=True), 4)
    assert torch.allclose(d.detach(), wigner_d(edge_frames(vectors.detach()), 4), atol=1e-5 if dtype == torch.float32 else 1e-9)
    (grad,) = torch.autograd.grad((d * torch.randn_like(d)).sum(), vectors)
    assert torch.isfinite(grad).all()
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda v: smooth_wigner_d(edge_frames(v, differentiable=True), 4), (vectors,))


@pytest.fixture(scope="module")
def models_64_32():
    return model(), model(dtype=torch.float32)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forces_along_special_directions(direction, models_64_32):
    """A three-atom molecule with one bond along each special direction: forces finite in float32
    and float64, equal to central differences in float64, and float32 within 1e-3 of float64."""
    m64, m32 = models_64_32
    bond = DIRECTIONS[direction]
    atoms = Atoms("COH", positions=[[0, 0, 0], 1.2 * bond, 1.2 * bond + [0.3, 0.9, -0.2]], pbc=False)
    with torch.no_grad():
        f64 = m64(to_batch([atoms], torch.float64))["forces"]
        f32 = m32(to_batch([atoms], torch.float32))["forces"]
    assert torch.isfinite(f64).all() and torch.isfinite(f32).all()
    numeric = np.zeros((3, 3))
    for i in range(3):
        for d in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, d] += STEP
            minus.positions[i, d] -= STEP
            numeric[i, d] = -(energy_at(m64, plus) - energy_at(m64, minus)) / (2 * STEP)
    assert rel(numeric, f64) <= FD_BOUND
    assert rel(f64, f32.double()) <= 1e-3


def test_training_gradient_reaches_the_weights():
    """With gradients on (training), the forces keep their graph: d(force loss)/d(weight) by autograd
    (a second derivative of the energy) equals a central difference in the weight."""
    m = model()
    atoms = default_structures()[2]
    batch = to_batch([atoms], torch.float64)
    weight = m.backbone.blocks[0].ga.so2_conv_1.fc_m0.weight

    def loss() -> torch.Tensor:
        return (m(batch)["forces"] ** 2).sum()

    value = loss()
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, weight)
    index = (3, 5)
    numeric = []
    with torch.no_grad():
        original = weight[index].item()
    for h in (1e-6, -1e-6):
        with torch.no_grad():
            weight[index] = original + h
        numeric.append(loss().item())
    with torch.no_grad():
        weight[index] = original
    derivative = (numeric[0] - numeric[1]) / 2e-6
    assert grad[index] != 0
    assert abs(derivative - grad[index].item()) <= 1e-6 * abs(derivative) + 1e-9


def test_direct_and_conservative_share_the_energy_weights():
    """ConservativeHead is an EnergyHead: a direct model's energy weights load into it (fine-tuning)."""
    direct, conservative = model(direct=True), model()
    state = {k: v for k, v in direct.state_dict().items() if not k.startswith("output_heads.forces.")}
    missing, unexpected = conservative.load_state_dict(state, strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys
    batch = to_batch(default_structures()[:1], torch.float64)
    with torch.no_grad():
        assert torch.allclose(direct(batch)["energy"], conservative(batch)["energy"], rtol=1e-12)


def test_config_errors():
    backbone = HydraModel(backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL},
                          heads={"energy": {"module": "fairchem_equiformerv2.EnergyHead"}}).backbone
    with pytest.raises(ConfigError, match="stress"):
        ConservativeHead(backbone, stress="yes")
    with pytest.raises(ConfigError, match="distinct"):
        ConservativeHead(backbone, forces_name="energy")
    ConservativeHead(backbone)
    with pytest.raises(ConfigError, match="one per model"):
        ConservativeHead(backbone)


@pytest.mark.parametrize("option", [{"activation_checkpoint": True}, {"torch_compile": True}])
def test_refused_backbone_options(option):
    with pytest.raises(ConfigError, match=next(iter(option))):
        model(**option)


def test_stress_needs_a_volume(conservative):
    atoms = lone_molecule()
    with pytest.raises(InputError, match="volume"):
        conservative(to_batch([atoms], torch.float64))


def test_repr_names_the_outputs(conservative):
    text = repr(conservative.output_heads["energy"])
    assert "forces_name='forces'" in text and "stress=True" in text


def _nve_energy_error(m, atoms: Atoms, steps: int, dt_fs: float) -> float:
    """The largest |E_total(t) - E_total(0)| per atom, eV, of Velocity Verlet in float64 from 300 K."""
    from ase import units
    from ase.calculators.calculator import Calculator, all_changes
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    class _Calculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            with torch.no_grad():
                out = m(to_batch([self.atoms], torch.float64))
            self.results = {"energy": float(out["energy"][0]), "forces": out["forces"].numpy().astype(np.float64)}

    atoms = atoms.copy()
    atoms.calc = _Calculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.get_total_energy()
    errors = []
    dynamics = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    dynamics.attach(lambda: errors.append(abs(atoms.get_total_energy() - start)), interval=5)
    dynamics.run(steps)
    return max(errors) / len(atoms)


def test_nve_short_run_conserves_energy():
    """Gradient forces conserve the total energy in NVE (to the integrator's error); direct forces of
    the same model size do not. 100 steps of 0.1 fs of the ethanol molecule (no cutoff crossings:
    every pair is within 5 A) from 300 K, float64, random weights (whose energy is rough on the
    0.02 A scale: at 0.5 fs even the gradient model's Verlet error reaches 5e-3 eV/atom).
    Measured: gradient 2.8e-5 eV/atom (2.5e-4 eV), direct 1.2e-2 eV/atom, growing steadily.
    Bound: 3e-4 eV/atom, 10x the measured gradient error and 40x under the direct one."""
    atoms = lone_molecule()
    gradient = _nve_energy_error(model(), atoms, 100, 0.1)
    direct = _nve_energy_error(model(direct=True), atoms, 100, 0.1)
    print(f"NVE largest energy error per atom over 10 fs: gradient {gradient:.1e} eV, direct {direct:.1e} eV")
    assert gradient <= 3e-4
    assert direct > 10 * gradient


def _direct_checkpoint(tmp_path, **extra) -> tuple[HydraModel, Path, dict]:
    """(a direct-force plugin model, its checkpoint as fairchem saves it with ``extra`` entries, the demo's
    conservative config)."""
    import yaml

    direct = model(direct=True, dtype=torch.float32)
    model_config = {
        "name": "hydra", "pass_through_head_outputs": True,
        "backbone": {"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL},
        "heads": {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}},
    }
    source = tmp_path / "direct.pt"
    torch.save({"config": {"model": model_config, "dataset": {"format": "lmdb", "src": "x"}},
                "state_dict": {f"module.{k}": v for k, v in direct.state_dict().items()}, "ema": None, **extra}, source)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo" / "s2ef_conservative.yml").read_text())
    return direct, source, config


def test_direct_checkpoint_becomes_conservative(tmp_path):
    """The fine-tuning start: a direct model's checkpoint -> one fairchem loads as a conservative model
    with the same backbone and energy network (the same energy), the conservative config's normalisers."""
    from fairchem.core.common.utils import load_model_and_weights_from_checkpoint

    from fairchem_equiformerv2.tools.checkpoints import CheckpointError
    from fairchem_equiformerv2.tools.conservative_checkpoint import to_conservative_checkpoint

    direct, source, config = _direct_checkpoint(tmp_path)
    destination = to_conservative_checkpoint(source, tmp_path / "conservative.pt", config)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        to_conservative_checkpoint(source, destination, config)
    checkpoint = torch.load(destination, weights_only=True)
    assert not any("output_heads.forces" in key for key in checkpoint["state_dict"])
    assert float(checkpoint["normalizers"]["forces"]["rmsd"]) == float(checkpoint["normalizers"]["energy"]["rmsd"])
    conservative = load_model_and_weights_from_checkpoint(str(destination)).eval()
    batch = to_batch(default_structures()[:1], torch.float32)
    with torch.no_grad():
        direct_out, out = direct(batch), conservative(batch)
    assert torch.allclose(out["energy"], direct_out["energy"], rtol=1e-5)
    assert out["forces"].shape == direct_out["forces"].shape and torch.isfinite(out["forces"]).all()


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: any code could run there instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_conservative_checkpoint_does_not_unpickle_code(tmp_path):
    from fairchem_equiformerv2.tools.checkpoints import CheckpointError
    from fairchem_equiformerv2.tools.conservative_checkpoint import to_conservative_checkpoint

    marker = tmp_path / "code_ran"
    _, source, config = _direct_checkpoint(tmp_path, val_metrics=_RunsCode(marker))
    with pytest.raises(CheckpointError, match=r"Python objects other than tensors.*trust=True"):
        to_conservative_checkpoint(source, tmp_path / "conservative.pt", config)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.pt"]


def _nan_weight(source: Path, config: dict) -> str:
    checkpoint = torch.load(source, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("sphere_embedding.weight"))
    checkpoint["state_dict"][key][3, 1] = float("nan")
    torch.save(checkpoint, source)
    return f"weight {key} holds 1 NaN"


def _nan_element_reference(source: Path, config: dict) -> str:
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["elementrefs"] = {"energy": {"element_references": torch.full((100,), float("inf"))}}
    torch.save(checkpoint, source)
    return "element reference elementrefs.energy.element_references holds 100 NaN"


def _nan_normaliser(source: Path, config: dict) -> str:
    config["dataset"]["train"]["transforms"]["normalizer"]["energy"]["mean"] = float("nan")
    return "normaliser conservative_config.dataset.train.transforms.normalizer.energy.mean holds 1 NaN"


def _fairchem_layout(source: Path, config: dict) -> str:
    checkpoint = torch.load(source, weights_only=True)
    model = checkpoint["config"]["model"]
    model["backbone"]["model"] = "equiformer_v2_backbone"
    model["heads"] = {"energy": {"module": "equiformer_v2_energy_head"}, "forces": {"module": "equiformer_v2_force_head"}}
    torch.save(checkpoint, source)
    return "not a plugin checkpoint; convert it first"


@pytest.mark.parametrize("damage", [_nan_weight, _nan_element_reference, _nan_normaliser, _fairchem_layout])
def test_conservative_checkpoint_refusals_name_the_field_and_write_nothing(tmp_path, damage):
    from fairchem_equiformerv2.tools.checkpoints import CheckpointError
    from fairchem_equiformerv2.tools.conservative_checkpoint import to_conservative_checkpoint

    _, source, config = _direct_checkpoint(tmp_path)
    message = damage(source, config)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        to_conservative_checkpoint(source, tmp_path / "conservative.pt", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.pt"]
