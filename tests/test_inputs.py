"""Every structure fairchem's model accepts gives fairchem's numbers; what cannot work is refused with
a message that names it.

Structures reach the model as a user's do: through ``AtomsToGraphs(r_pbc=True)`` (what fairchem's
``OCPCalculator`` runs), as LMDB-style batches (zero cell, no ``pbc``), through ``HydraModel`` built
from a YAML config, and through ``OCPCalculator`` on a converted checkpoint. The oracle is fairchem's
EquiformerV2 with the same weights on the same structure; where fairchem's model cannot run a batch
that has no edge at all, it runs that structure beside a slab, whose edges let it through.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ase.build import add_adsorbate, fcc111, molecule
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.common.relaxation.ase_utils import OCPCalculator
from fairchem.core.models.base import HydraModel
from fairchem.core.preprocessing import AtomsToGraphs
from oracle import build_pair
from structures import default_structures, slab_with_adsorbate, to_batch
from test_checkpoints import deterministic_fairchem_frames, save_fairchem_hydra  # noqa: F401 (an autouse fixture)
from test_conservative import model as conservative_model

from fairchem_equiformerv2.model.backbone import EquiformerV2Backbone
from fairchem_equiformerv2.tools.checkpoints import convert_checkpoint
from fairchem_equiformerv2.errors import ConfigError, ElementError, InputError
from fairchem_equiformerv2.model.graph import search_cell

warnings.filterwarnings("ignore", category=FutureWarning)
ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-5, 1e-4  # relative, float32, as the checkpoint parity tests
ABSOLUTE = 1e-5  # eV, eV/A: float32 rounding of edge terms that cancel by symmetry (lone atoms in a periodic cell)
A2G = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_pbc=True)
SHAPE = {"lmax_list": [3], "mmax_list": [2]}
HEADS = {"energy": {}, "forces": {}}


@pytest.fixture(scope="module")
def pair():
    return build_pair(SHAPE, HEADS)


@pytest.fixture(scope="module")
def pair_single():
    """With ``use_pbc_single``: fairchem builds each structure's graph alone, so it runs mixed batches."""
    return build_pair({**SHAPE, "use_pbc_single": True}, HEADS)


def batch_of(structures, pbc: bool = True):
    """A batch as fairchem's calculator makes it (``pbc`` flags, ASE's completed cell)."""
    a2g = A2G if pbc else AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False)
    return data_list_collater([a2g.convert(atoms) for atoms in structures], otf_graph=True)


def raw_batch(structures, pbc: bool = True):
    """A batch with each structure's own cell, zero vectors kept (as LMDBs written from ASE store it)."""
    batch = batch_of(structures, pbc)
    batch.cell = torch.stack([torch.tensor(a.cell.array, dtype=torch.float32) for a in structures])
    return batch


def run(model, batch):
    out = model(batch.clone())
    return out["energy"]["energy"], out["forces"]["forces"]


def assert_close(expected, got):
    """Relative to the largest reference value, as the parity tests, with a floor of :data:`ABSOLUTE`:
    a lone atom in a periodic box has forces near zero by symmetry, where float32 rounding is all
    that differs."""
    (e_energy, e_forces), (energy, forces) = expected, got
    assert torch.isfinite(energy).all() and torch.isfinite(forces).all()
    for reference, value, tolerance in ((e_energy, energy, ENERGY_TOLERANCE), (e_forces, forces, FORCE_TOLERANCE)):
        error = (reference - value).abs().max().item()
        assert error <= tolerance * reference.abs().max().item() + ABSOLUTE, f"{error:.2e} from {reference}"


def fairchem_alone(theirs, atoms):
    """fairchem's energy and forces for one structure; one without edges runs beside a slab."""
    try:
        return run(theirs, batch_of([atoms]))
    except RuntimeError as e:
        assert "cannot reshape tensor of 0 elements" in str(e)  # fairchem's model on a batch without edges
    energy, forces = run(theirs, batch_of([slab_with_adsorbate(), atoms]))
    return energy[1:], forces[-len(atoms):]


# --- structures that used to be refused or crash -----------------------------------------------


def h2_whole_angstrom_apart():
    return Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.0]])  # ASE's defaults: no cell, pbc False


def molecule_spanning_its_box():
    return Atoms("CO2", positions=[[0, 0, 0], [1.2, 0, 0], [2.4, 0, 0]], cell=[2.4, 5, 5], pbc=False)


def slab_2d_adsorbate_at_top_face():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=None, periodic=False)
    slab.pbc = [True, True, False]
    top = slab.positions[:, 2].max() + 1.8
    slab.cell[2] = [0, 0, top]  # the adsorbate sits on the cell's top face, above the first atom
    slab += Atoms("O", positions=[[slab.positions[0, 0], slab.positions[0, 1], top]])
    return slab


def chain_1d():
    atoms = Atoms("Cu4", positions=[[0.3 + 2.5 * i, 0.1 * i, 0] for i in range(4)], cell=[10, 0, 0], pbc=[True, False, False])
    return atoms


def lone_atom():
    return Atoms("Cu", positions=[[1, 2, 3]], cell=[10, 10, 10], pbc=True)


def atoms_beyond_cutoff():
    return Atoms("CuO", positions=[[0, 0, 0], [0, 0, 9]], cell=[20, 20, 20], pbc=False)


USER_STRUCTURES = {
    "H2 without a cell, 1 A apart": h2_whole_angstrom_apart,
    "CO2 spanning its non-periodic box": molecule_spanning_its_box,
    "CO molecule": lambda: molecule("CO"),
    "2-D slab, adsorbate on the top face": slab_2d_adsorbate_at_top_face,
    "1-D chain": chain_1d,
    "lone atom": lone_atom,
    "two atoms beyond the cutoff": atoms_beyond_cutoff,
    "periodic slab": slab_with_adsorbate,
}


@pytest.mark.parametrize("name", USER_STRUCTURES)
def test_structure_as_the_calculator_sees_it(pair, name):
    theirs, ours = pair
    atoms = USER_STRUCTURES[name]()
    assert_close(fairchem_alone(theirs, atoms), run(ours, batch_of([atoms])))


@pytest.mark.parametrize("name", ["H2 without a cell, 1 A apart", "1-D chain", "2-D slab, adsorbate on the top face", "lone atom"])
def test_structure_with_its_own_cell_as_lmdbs_store_it(pair, name):
    """Zero cell vectors in non-periodic directions (singular cells): fairchem's search cannot invert them."""
    theirs, ours = pair
    atoms = USER_STRUCTURES[name]()
    assert_close(fairchem_alone(theirs, atoms), run(ours, raw_batch([atoms])))


def test_molecular_lmdb_batch_zero_cell_without_pbc_flags(pair):
    """Molecular LMDBs store a zero cell and no ``pbc``: no cell, no periodic direction."""
    theirs, ours = pair
    structures = [h2_whole_angstrom_apart(), molecule("CH4")]
    batch = raw_batch(structures, pbc=False)
    assert "pbc" not in batch and batch.cell.abs().sum() == 0
    energy, forces = run(ours, batch)
    expected = [fairchem_alone(theirs, atoms) for atoms in structures]
    assert_close((torch.cat([e for e, _ in expected]), torch.cat([f for _, f in expected])), (energy, forces))


def test_batch_mixing_periodicities(pair, pair_single):
    """Slabs, molecules, 2-D and 1-D cells and lone atoms in one batch give each structure's own numbers."""
    theirs, ours = pair
    structures = [slab_with_adsorbate(), h2_whole_angstrom_apart(), slab_2d_adsorbate_at_top_face(), lone_atom(), chain_1d()]
    energy, forces = run(ours, batch_of(structures))
    expected = [fairchem_alone(theirs, atoms) for atoms in structures]
    assert_close((torch.cat([e for e, _ in expected]), torch.cat([f for _, f in expected])), (energy, forces))
    # fairchem's use_pbc_single runs the mixed batch itself (a structure per graph search)
    theirs_single, ours_single = pair_single
    mixed = batch_of([s for s in structures if len(s) > 1 or s.pbc.any()][:3])
    assert_close(run(theirs_single, mixed), run(ours_single, mixed))


def test_no_edge_anywhere_gives_zero_forces_and_trains():
    """Isolated-atom reference energies: a batch with no edge at all, forward and backward."""
    _, ours = build_pair(SHAPE, {"energy": {}, "forces": {}, "stress": {"decompose": True}})
    batch = batch_of([lone_atom(), atoms_beyond_cutoff()])
    ours.train()
    out = ours(batch)
    assert torch.equal(out["forces"]["forces"], torch.zeros(3, 3))
    assert torch.isfinite(out["stress"]["stress_isotropic"]).all()
    loss = out["energy"]["energy"].sum() + out["stress"]["stress_anisotropic"].sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("use_pbc_single", [False, True])
def test_structure_without_atoms_in_a_batch(use_pbc_single, reduce):
    """A structure with no atoms gets energy 0 (fairchem's model too, with ``reduce: sum``) and the
    others what they get without it; it used to crash (``max(): Expected reduction dim``) where it was
    searched alone: with ``use_pbc_single``, or as the batch's only non-periodic structure."""
    heads = {"energy": {"reduce": reduce}, "forces": {}, "stress": {}}
    _, ours = build_pair({**SHAPE, "use_pbc_single": use_pbc_single}, heads)
    structures = [Atoms(), slab_with_adsorbate(), chain_1d(), Atoms(cell=[10, 10, 10], pbc=True)]
    kept, empty = [1, 2], [0, 3]
    out, alone = ours(batch_of(structures)), ours(batch_of([structures[i] for i in kept]))
    energy, forces, stress = out["energy"]["energy"], out["forces"]["forces"], out["stress"]["stress"]
    assert energy.shape == (4,) and forces.shape == (18, 3) and stress.shape == (12, 3)
    assert torch.equal(energy[empty], torch.zeros(2))
    assert_close((alone["energy"]["energy"], alone["forces"]["forces"]), (energy[kept], forces))
    alone_stress = alone["stress"]["stress"].view(2, 9)
    assert (alone_stress - stress.view(4, 9)[kept]).abs().max() <= ENERGY_TOLERANCE * alone_stress.abs().max()
    ours.train()  # a training step on the batch
    out = ours(batch_of(structures))
    (out["energy"]["energy"].sum() + out["forces"]["forces"].square().sum() + out["stress"]["stress"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_structure_without_atoms_matches_fairchem(pair):
    theirs, ours = pair
    batch = batch_of([slab_with_adsorbate(), Atoms(cell=[10, 10, 10], pbc=True)])
    assert_close(run(theirs, batch), run(ours, batch))


def test_float64_geometry_into_a_float32_model(pair):
    """Positions and cell in float64 (as ASE holds them) are cast to the model's float32: the numbers
    of the float32 batch, in float32; fairchem's model fails (``expected scalar type Float``)."""
    _, ours = pair
    structures = default_structures()
    narrow, wide = to_batch(structures, torch.float32), to_batch(structures, torch.float64)
    energy, forces = run(ours, wide)
    assert energy.dtype == forces.dtype == torch.float32 and wide.pos.dtype == torch.float64
    assert_close(run(ours, narrow), (energy, forces))
    # a gradient of the energy reaches the caller's float64 positions
    gradients = []
    for batch in (narrow, wide):
        batch.pos.requires_grad_(True)
        gradients.append(torch.autograd.grad(ours(batch)["energy"]["energy"].sum(), batch.pos)[0])
    assert gradients[1].dtype == torch.float64
    assert_close((torch.zeros(1), gradients[0]), (torch.zeros(1), gradients[1].float()))


def test_float64_geometry_into_a_float32_conservative_model():
    """Gradient forces and stress of a float32 model are the same from float64 positions and cell."""
    model = conservative_model(stress=True, dtype=torch.float32)
    structures = default_structures()[:2]
    narrow, wide = (model(to_batch(structures, dtype)) for dtype in (torch.float32, torch.float64))
    for name in ("energy", "forces", "stress"):
        assert wide[name].dtype == torch.float32, name
        torch.testing.assert_close(wide[name], narrow[name], msg=name)


def test_orthogonal_cell_of_any_size_runs(pair):
    """The linear-dependence test of cell vectors is by angles: a 3 x 1e9 x 1e9 A cell (a chain
    periodic along a, its images along b and c far away) used to be refused as linearly dependent."""
    theirs, ours = pair
    atoms = Atoms("CuO", positions=[[0, 0, 0], [0.5, 0.3, 1.8]], cell=[3, 1e9, 1e9], pbc=True)
    assert_close(run(theirs, batch_of([atoms])), run(ours, batch_of([atoms])))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e9])
def test_cell_dependence_does_not_depend_on_scale(scale):
    """Orthogonal or skewed cells pass :func:`search_cell` at every scale, also with lengths 3e8 apart;
    vectors in a plane or on a line are refused at every scale."""
    periodic = torch.ones(1, 3, dtype=torch.bool)
    for good in ([[3, 0, 0], [0, 1e9, 0], [0, 0, 1e9]], [[3, 0, 0], [1, 4, 0], [0.5, -1, 5]], [[1e-9, 0, 0], [0, 1, 0], [0, 0, 1]]):
        cell = torch.tensor([good], dtype=torch.float64) * scale
        assert torch.equal(search_cell(cell, periodic), cell)
    for bad in ([[3, 0, 0], [6, 0, 0], [0, 0, 5]], [[3, 0, 0], [0, 4, 0], [3, 4, 0]], [[3, 0, 0], [1, 4, 0], [2.2, 5.3, 1e-7]]):
        cell = torch.tensor([bad], dtype=torch.float32) * scale
        with pytest.raises(InputError, match="structure 0: the cell vectors of its periodic directions .* are linearly dependent"):
            search_cell(cell, periodic)


def test_non_periodic_model_needs_no_torch_cluster():
    """``use_pbc: False`` builds its graph with fairchem's own search (periodic directions off), the
    same edges as fairchem's model with the flags off, without torch_cluster or pyg-lib."""
    theirs, _ = build_pair(SHAPE, HEADS)
    _, ours = build_pair({**SHAPE, "use_pbc": False}, HEADS)
    structures = [molecule("CH3CH2OH"), slab_with_adsorbate()]  # the slab, too, as a finite cluster
    flags_off = batch_of(structures)
    flags_off.pbc[:] = False
    assert_close(run(theirs, flags_off), run(ours, batch_of(structures)))


# --- what cannot work: refused, naming it -------------------------------------------------------


def test_atoms_closer_than_fairchem_keeps_are_refused(pair):
    """fairchem's search drops pairs closer than 0.01 A; the plugin refuses them, images included."""
    _, ours = pair
    slab = slab_with_adsorbate()
    slab.positions[1] = slab.positions[0] + [0.005, 0, 0]
    with pytest.raises(InputError, match=r"atoms 0 and 1 are at the same position: 5\.0\de-03 A apart"):
        run(ours, batch_of([slab]))
    across = Atoms("Cu2", scaled_positions=[[0, 0.5, 0.5], [0.9995, 0.5, 0.5]], cell=[10, 10, 10], pbc=True)
    with pytest.raises(InputError, match="through the periodic boundary"):
        run(ours, batch_of([across]))
    across.pbc = False  # 9.995 A apart without the periodic image
    run(ours, batch_of([across]))


@pytest.mark.parametrize("as_stored", [True, False])
def test_periodic_direction_without_a_cell_vector_is_refused(pair, as_stored):
    """With its cell as stored (a zero vector) or as fairchem's AtomsToGraphs gives it (ASE's
    ``complete_cell`` puts a 1 A vector there: fairchem's model computes a crystal of 1 A period)."""
    _, ours = pair
    atoms = chain_1d()
    atoms.pbc = [True, True, False]
    what = "that vector is zero" if as_stored else r"that vector, \[0\.0, 1\.0, 0\.0\], is the 1 A vector .*complete_cell"
    with pytest.raises(InputError, match=rf"structure 0 is periodic along cell vector b \(pbc\[1\] is True\) but {what}"):
        run(ours, (raw_batch if as_stored else batch_of)([atoms]))


@pytest.mark.parametrize("as_stored", [True, False])
def test_molecule_with_pbc_and_no_cell_is_refused(pair, as_stored):
    """A molecule with ``pbc=True`` and no cell: fairchem's model computes it as a crystal in a 1 A box
    (its AtomsToGraphs completes the zero cell to the identity). Refused, naming the structure."""
    _, ours = pair
    water = molecule("H2O")
    water.pbc = True
    batch = (raw_batch if as_stored else batch_of)([slab_with_adsorbate(), water])
    with pytest.raises(InputError, match=r"structure 1 is periodic along cell vector a \(pbc\[0\] is True\).*set pbc False"):
        run(ours, batch)
    water.pbc = False
    run(ours, (raw_batch if as_stored else batch_of)([slab_with_adsorbate(), water]))


def test_completed_cell_without_pbc_flags_is_refused(pair):
    """A batch without ``pbc`` flags is periodic wherever there is a cell (fairchem's default); a cell
    ASE completed (AtomsToGraphs without ``r_pbc`` on a molecule) is no cell, so it is refused, naming
    the ways out. A zero cell without flags runs as a molecule (the molecular-LMDB test above)."""
    _, ours = pair
    batch = batch_of([slab_with_adsorbate(), molecule("CO")], pbc=False)
    assert "pbc" not in batch
    with pytest.raises(InputError, match=r"structure 1 is periodic along cell vector a \(the batch has no pbc flags.*use_pbc False"):
        run(ours, batch)


def test_atomic_number_outside_the_table_is_both_value_and_assertion_error():
    _, ours = build_pair({**SHAPE, "max_num_elements": 20}, HEADS)
    for caught in (ValueError, AssertionError, ElementError):
        with pytest.raises(caught, match=r"atom 0 \(atomic number 29\).*max_num_elements=20"):
            run(ours, batch_of([slab_with_adsorbate()]))


BAD_FIELDS = [
    ("num_layers", -1, "must be >= 1"),
    ("num_layers", "2", "must be a whole number"),
    ("sphere_channels", 0, "must be >= 1"),
    ("max_radius", 0, "must be a number > 0"),
    ("max_radius", "5.0", "not a str"),
    ("max_neighbors", 2.5, "not a float"),
    ("grid_resolution", 7, "even number of latitudes"),
    ("grid_resolution", 8, "at least 2 \\(lmax \\+ 1\\) = 14"),
    ("drop_path_rate", -0.1, ">= 0 and < 1"),
    ("alpha_drop", 1.5, ">= 0 and < 1"),
    ("avg_degree", -3.0, "> 0"),
    ("avg_num_nodes", 0, "> 0"),
    ("use_pbc", "yes", "true or false"),
    ("lmax_list", [6.5], "whole number"),
    ("max_num_elements", 0, ">= 1"),
]


@pytest.mark.parametrize("field, value, problem", BAD_FIELDS)
def test_bad_backbone_field_is_named_at_construction(field, value, problem):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}".replace("[", r"\[").replace("(", r"\(") + f".*{problem}"):
        EquiformerV2Backbone(**{"num_layers": 1, "sphere_channels": 8, field: value})


def test_config_typo_through_hydra_model_names_the_field():
    config = yaml.safe_load(
        """
        backbone:
          model: fairchem_equiformerv2.EquiformerV2Backbone
          num_layers: "2"
          sphere_channels: 8
        heads:
          energy: {module: fairchem_equiformerv2.EnergyHead}
        """
    )
    with pytest.raises(ConfigError, match="num_layers='2': must be a whole number"):
        HydraModel(**config)


@pytest.mark.parametrize("field", ["attn_activation", "ffn_activation"])
def test_activation_names_fairchem_ignores_are_accepted_with_a_warning(field, caplog):
    with caplog.at_level(logging.WARNING):
        backbone = EquiformerV2Backbone(num_layers=1, sphere_channels=8, **{field: "swiglu"})
    assert f"{field}='swiglu' is ignored" in caplog.text
    assert getattr(backbone, field) == "swiglu"


# --- through OCPCalculator on a converted checkpoint ---------------------------------------------


def test_calculator_on_a_converted_checkpoint_runs_molecules_and_lone_atoms(tmp_path):
    source = save_fairchem_hydra(tmp_path, backbone={"attn_activation": "swiglu"})
    converted = convert_checkpoint(source, tmp_path / "plugin.pt")
    theirs = OCPCalculator(checkpoint_path=source, cpu=True, trainer="ocp")
    ours = OCPCalculator(checkpoint_path=str(converted), cpu=True, trainer="ocp")
    for make in (h2_whole_angstrom_apart, molecule_spanning_its_box, slab_2d_adsorbate_at_top_face, chain_1d):
        atoms = make()
        atoms.calc = theirs
        expected = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = ours
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert abs(energy - expected[0]) <= ENERGY_TOLERANCE * max(1.0, abs(expected[0])), make.__name__
        assert np.abs(forces - expected[1]).max() <= 1e-4 * max(1e-3, np.abs(expected[1]).max()), make.__name__
    atom = lone_atom()
    atom.calc = ours
    assert np.isfinite(atom.get_potential_energy())
    assert np.array_equal(atom.get_forces(), np.zeros((1, 3)))


# --- random structures: ours runs wherever fairchem's model does, with fairchem's numbers -------


@pytest.fixture(scope="module")
def tally():
    counts = {"drawn": 0, "compared": 0, "fairchem refused": 0}
    yield counts
    print(f"\nrandom structures: {counts}")  # pytest -s shows it


@st.composite
def random_structures(draw):
    """1-40 atoms of random elements in a random cell: skewed, periodic along any of its vectors,
    possibly with zero vectors along the others or no cell at all; atoms kept at least 0.5 A apart
    (their nearest periodic images too)."""
    pbc = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    lengths = draw(st.lists(st.floats(3.0, 12.0), min_size=3, max_size=3))
    skew = draw(st.lists(st.floats(-0.4, 0.4), min_size=3, max_size=3))
    cell = np.diag(lengths) + np.array([[0, skew[0], skew[1]], [0, 0, skew[2]], [0, 0, 0]]) * np.array(lengths)[:, None]
    if not any(pbc) and draw(st.booleans()):
        cell = np.zeros((3, 3))  # a molecule without a cell
    elif draw(st.booleans()):
        cell[[not p for p in pbc]] = 0  # ASE's slabs and chains without vacuum: zero non-periodic vectors
    count = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    numbers = rng.integers(1, 84, size=count)
    box = np.where(np.linalg.norm(cell, axis=1)[:, None] > 0, cell, np.diag([8.0, 8.0, 8.0]))
    atoms = Atoms(numbers=numbers[:1], positions=[rng.random(3) @ box], cell=cell, pbc=pbc)
    for number in numbers[1:]:
        candidate = Atoms(numbers=[number], positions=[rng.random(3) @ box])
        trial = atoms + candidate
        if len(atoms) and (trial.get_distances(len(atoms), range(len(atoms)), mic=any(pbc) and cell.any()) < 0.5).any():
            continue
        atoms = trial
    atoms.info["own_cell"] = draw(st.booleans())  # see the test
    return atoms


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(atoms=random_structures())
def test_random_structures_match_fairchem_or_fairchem_cannot(pair, tally, atoms):
    """fairchem's model sees the structure as its calculator makes it (ASE's completed cell); ours
    sees that or, for half of them, the structure's own cell as an LMDB stores it."""
    theirs, ours = pair
    tally["drawn"] += 1
    try:
        expected = run(theirs, batch_of([atoms]))
    except (RuntimeError, ValueError) as e:
        event(f"fairchem refused: {str(e)[:40]}")
        tally["fairchem refused"] += 1
        expected = None
    got = run(ours, raw_batch([atoms]) if atoms.info["own_cell"] else batch_of([atoms]))  # none closer than 0.5 A: ours runs all
    if expected is not None:
        tally["compared"] += 1
        assert_close(expected, got)
    else:
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


# --- a molecule-only training run with use_pbc: False ---------------------------------------------


def molecular_split(folder, names, seed):
    """EMT-labelled rattled molecules as molecular LMDBs store them: zero cell, no ``pbc``."""
    from ase.calculators.emt import EMT

    from fairchem_equiformerv2.tools.demo_data import write_split

    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_edges=False, r_fixed=True, r_distances=False)
    entries = []
    for sid, name in enumerate(names):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=seed + sid)
        atoms.calc = EMT()
        data = a2g.convert(atoms)
        data.cell = torch.zeros(1, 3, 3)
        data.sid, data.fid = sid, 0
        data.tags = torch.zeros(len(atoms), dtype=torch.long)
        entries.append(data)
    return write_split(folder, entries)


@pytest.mark.slow
def test_molecule_only_training_with_use_pbc_false(tmp_path):
    from fairchem_runs import DEMO_S2EF, base_env, fairchem_cmd, train_steps, val_metrics
    from fairchem_runs import run as run_command

    names = ["CH4", "H2O", "NH3", "CO", "CH3OH", "C2H6", "H2", "N2", "CO2", "HCN", "C2H4", "NO"]
    train = molecular_split(tmp_path / "train", names, seed=0)
    val = molecular_split(tmp_path / "val", names[:4], seed=100)
    log = run_command(
        fairchem_cmd() + [
            "--mode", "train", "--config-yml", DEMO_S2EF, "--cpu", "--seed", 0, "--print-every", 1,
            "--run-dir", tmp_path, "--timestamp-id", "molecules",
            f"--dataset.train.src={train.parent}", f"--dataset.val.src={val.parent}",
            "--model.backbone.use_pbc=False", "--optim.max_epochs=2", "--optim.batch_size=4",
            "--optim.scheduler_params.warmup_epochs=0.5",
        ],
        tmp_path / "train.log", env=base_env(),
    )
    steps = train_steps(log)
    assert len(steps) == 6 and all(np.isfinite(loss) for loss, _ in steps.values())
    assert np.isfinite(list(val_metrics(log).values())[-1]["forces_mae"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "molecules" / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["model"]["backbone"]["use_pbc"] is False
