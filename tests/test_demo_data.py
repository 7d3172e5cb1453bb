"""The demo datasets: fairchem's LMDB format, EMT labels, OC20 conventions, determinism."""
from __future__ import annotations

import filecmp
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from fairchem.core.common.data_parallel import BalancedBatchSampler, data_list_collater
from fairchem.core.datasets import LmdbDataset
from fairchem_runs import eqv2_cmd

from fairchem_equiformerv2.tools import demo_data
from fairchem_equiformerv2.tools.demo_data import SID_STRIDE, SPLITS, TASKS, is2re_entries, make_demo_data, s2ef_entries
from fairchem_equiformerv2.errors import UserInputError

S2EF_SIZES = {"train": 10, "val": 3, "test": 3}
IS2RE_SIZES = {"train": 3, "val": 2, "test": 2}


def _make(out_dir, seed=0):
    return make_demo_data(out_dir, seed=seed, s2ef_sizes=S2EF_SIZES, is2re_sizes=IS2RE_SIZES, progress=False)


@pytest.fixture(scope="module")
def demo_data_paths(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("demo_data"))


def _dataset(path, **config):
    return LmdbDataset({"src": str(path), **config})


def _emt_atoms(data) -> Atoms:
    """The structure of an entry, periodic in all directions, with EMT attached."""
    atoms = Atoms(
        numbers=data.atomic_numbers.long().numpy(),
        positions=data.pos.double().numpy(),
        cell=data.cell[0].double().numpy(),
        pbc=True,
    )
    atoms.calc = EMT()
    return atoms


def test_layout_and_sizes(demo_data_paths):
    sizes = {"s2ef": S2EF_SIZES, "is2re": IS2RE_SIZES}
    assert set(demo_data_paths) == set(TASKS)
    for task in TASKS:
        assert set(demo_data_paths[task]) == set(SPLITS)
        for split in SPLITS:
            path = demo_data_paths[task][split]
            assert path.name == "data.lmdb" and path.parent.name == split and path.parent.parent.name == task
            assert len(_dataset(path)) == sizes[task][split]
            assert len(_dataset(path.parent)) == sizes[task][split]  # the folder form, as in OC20 S2EF
            natoms = np.load(path.parent / "metadata.npz")["natoms"]
            assert natoms.dtype == np.int32
            assert natoms.tolist() == [data.natoms for data in _dataset(path)]


def test_same_seed_gives_identical_bytes(demo_data_paths, tmp_path):
    again = _make(tmp_path / "again")
    for task in TASKS:
        for split in SPLITS:
            ours, theirs = demo_data_paths[task][split], again[task][split]
            assert filecmp.cmp(ours, theirs, shallow=False)
            assert filecmp.cmp(ours.parent / "metadata.npz", theirs.parent / "metadata.npz", shallow=False)


def test_other_seed_gives_other_data():
    for make_entries in (s2ef_entries, is2re_entries):
        first, other = (next(make_entries(seed, "train", 1)) for seed in (0, 1))
        assert first.pos.shape != other.pos.shape or not torch.equal(first.pos, other.pos)


def test_s2ef_keys_shapes_dtypes(demo_data_paths):
    for data in _dataset(demo_data_paths["s2ef"]["train"]):
        n = data.natoms
        assert isinstance(n, int) and 12 <= n <= 18
        assert data.pos.shape == (n, 3) and data.pos.dtype == torch.float32
        assert data.cell.shape == (1, 3, 3) and data.cell.dtype == torch.float32
        assert data.atomic_numbers.shape == (n,) and data.atomic_numbers.dtype == torch.uint8
        assert data.tags.shape == (n,) and data.tags.dtype == torch.int64
        assert data.fixed.shape == (n,) and data.fixed.dtype == torch.int32
        assert data.forces.shape == (n, 3) and data.forces.dtype == torch.float32
        assert isinstance(data.energy, float)
        assert isinstance(data.sid, int) and isinstance(data.fid, int)
        assert "edge_index" not in data  # graphs are built on the fly (r_edges=False)
        frac = torch.linalg.solve(data.cell[0].T, data.pos.T).T
        assert ((frac >= -1e-6) & (frac < 1 + 1e-6)).all()  # wrapped into the cell


def test_is2re_keys_shapes_dtypes(demo_data_paths):
    for data in _dataset(demo_data_paths["is2re"]["train"]):
        n = data.natoms
        assert data.pos.shape == data.pos_relaxed.shape == (n, 3)
        assert data.pos_relaxed.dtype == torch.float32
        assert isinstance(data.y_init, float) and isinstance(data.y_relaxed, float)
        assert "fid" not in data  # predictions are then named by sid alone, as IS2RE submissions need
        assert "energy" not in data and "forces" not in data


def test_tags_and_fixed_atoms_follow_oc20(demo_data_paths):
    for data in _dataset(demo_data_paths["s2ef"]["val"]):
        tags, fixed = data.tags, data.fixed
        assert set(tags.tolist()) == {0, 1, 2}
        assert torch.equal(fixed, (tags == 0).int())  # sub-surface atoms are the fixed ones
        adsorbate = data.atomic_numbers[tags == 2]
        assert set(adsorbate.tolist()) <= {1, 6, 7, 8}  # H, C, N, O
        slab_z = data.pos[tags < 2, 2]
        assert data.pos[tags == 0, 2].max() < data.pos[tags == 1, 2].min()  # fixed layers at the bottom
        assert data.pos[tags == 2, 2].min() > slab_z.max()  # adsorbate on top


def test_s2ef_labels_match_emt(demo_data_paths):
    dataset = _dataset(demo_data_paths["s2ef"]["train"])
    for index in (0, 4, len(dataset) - 1):
        data = dataset[index]
        atoms = _emt_atoms(data)
        assert atoms.get_potential_energy() == pytest.approx(data.energy, abs=1e-4)
        forces = atoms.get_forces()  # no constraints attached: all atoms, as stored
        np.testing.assert_allclose(data.forces.numpy(), forces, atol=2e-3)


def test_s2ef_frames_come_from_trajectories(demo_data_paths):
    dataset = _dataset(demo_data_paths["s2ef"]["train"])
    ids = [(data.sid, data.fid) for data in dataset]
    assert len(set(ids)) == len(ids)
    first = [data for data in dataset if data.sid == ids[0][0]]
    assert [data.fid for data in first] == list(range(len(first))) and len(first) > 2
    fixed = first[0].fixed.bool()
    for later in first[1:]:  # same system: same atoms, fixed atoms never move
        assert torch.equal(later.atomic_numbers, first[0].atomic_numbers)
        torch.testing.assert_close(later.pos[fixed], first[0].pos[fixed], atol=1e-5, rtol=0)
        assert not torch.equal(later.pos, first[0].pos)


def test_is2re_pairs_are_consistent(demo_data_paths):
    for data in _dataset(demo_data_paths["is2re"]["train"]):
        initial = _emt_atoms(data)
        assert initial.get_potential_energy() == pytest.approx(data.y_init, abs=1e-4)
        relaxed = initial.copy()
        relaxed.positions = data.pos_relaxed.double().numpy()
        relaxed.calc = EMT()
        assert relaxed.get_potential_energy() == pytest.approx(data.y_relaxed, abs=1e-4)
        assert data.y_relaxed < data.y_init  # a relaxation lowers the energy
        free = data.fixed == 0
        assert np.abs(relaxed.get_forces()[free.numpy()]).max() < 0.2  # relaxed: small forces
        torch.testing.assert_close(data.pos_relaxed[~free], data.pos[~free], atol=1e-5, rtol=0)


def test_system_ids_unique_across_splits(demo_data_paths):
    for task in TASKS:
        sids = {split: {data.sid for data in _dataset(demo_data_paths[task][split])} for split in SPLITS}
        for offset, split in enumerate(SPLITS):
            assert all(offset * SID_STRIDE <= sid < (offset + 1) * SID_STRIDE for sid in sids[split])


def test_batches_through_fairchem(demo_data_paths):
    s2ef = _dataset(demo_data_paths["s2ef"]["train"], key_mapping={"y": "energy", "force": "forces"})
    batch = data_list_collater([s2ef[i] for i in range(4)], otf_graph=True)
    assert batch.energy.shape == (4,) and batch.energy.dtype == torch.float32
    assert batch.forces.shape == (int(batch.natoms.sum()), 3)

    is2re = _dataset(demo_data_paths["is2re"]["train"], key_mapping={"y_relaxed": "energy"})
    batch = data_list_collater(list(is2re), otf_graph=True)
    assert batch.energy.shape == (3,) and batch.energy.dtype == torch.float32

    # load_balancing: atoms reads metadata.npz; it must not raise.
    sampler = BalancedBatchSampler(
        s2ef, batch_size=4, num_replicas=1, rank=0, device=torch.device("cpu"), seed=0, mode="atoms", on_error="raise"
    )
    assert sum(len(indices) for indices in sampler) == len(s2ef)


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(UserInputError, match="s2ef/val"):
        make_demo_data(tmp_path, s2ef_sizes={"val": 0}, progress=False)
    with pytest.raises(UserInputError, match="unknown split"):
        make_demo_data(tmp_path, is2re_sizes={"dev": 3}, progress=False)


def test_oc20_recipe_starts_high_anywhere_and_relaxes_further():
    """The ``oc20`` IS2RE recipe: the adsorbate's binding atom starts 2.5-3.5 Å above the top layer at
    any lateral position, and the relaxation goes on to fmax 0.05 eV/Å, so atoms move further than in
    the ``demo`` recipe."""
    from fairchem_equiformerv2.tools.demo_data import IS2RE_RECIPES
    from fairchem_equiformerv2.tools.demo_structures import TAG_ADSORBATE, TAG_SURFACE

    moved = {}
    for recipe in ("demo", "oc20"):
        distances = []
        for data in is2re_entries(0, "train", 4, recipe):
            tags = data.tags
            binding = torch.nonzero(tags == TAG_ADSORBATE)[0, 0]
            height = float(data.pos[binding, 2] - data.pos[tags == TAG_SURFACE, 2].max())
            assert IS2RE_RECIPES[recipe].height[0] - 1e-4 <= height <= IS2RE_RECIPES[recipe].height[1] + 1e-4
            initial = _emt_atoms(data)
            relaxed = initial.copy()
            relaxed.positions = data.pos_relaxed.double().numpy()
            relaxed.calc = EMT()
            free = (data.fixed == 0).numpy()
            assert np.linalg.norm(relaxed.get_forces()[free], axis=1).max() < IS2RE_RECIPES[recipe].fmax + 1e-3
            distances.append((data.pos_relaxed - data.pos)[data.fixed == 0].norm(dim=1))
        moved[recipe] = float(torch.cat(distances).mean())
    assert moved["oc20"] > 1.5 * moved["demo"], moved
    with pytest.raises(UserInputError, match="recipe"):
        make_demo_data("unused", is2re_recipe="oc30", progress=False)


def test_cli_reports_how_far_the_relaxations_move(tmp_path):
    sizes = [f"--num-{task}-{split}=1" for task in ("s2ef", "is2re") for split in SPLITS]
    out = subprocess.run([*eqv2_cmd(), "demo-data", str(tmp_path), *sizes, "--num-is2re-train=3",
                          "--is2re-recipe", "oc20", "--no-progress"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("is2re/train"))
    mean = float(line.split("move ")[1].split(" A")[0])
    entries = list(is2re_entries(0, "train", 3, "oc20"))
    expected = torch.cat([(d.pos_relaxed - d.pos)[d.fixed == 0].norm(dim=1) for d in entries]).mean()
    assert mean == pytest.approx(float(expected), abs=1e-3)


SMALLEST = [f"--num-{task}-{split}=1" for task in TASKS for split in SPLITS]


def _files_under(folder) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir())


def test_a_file_written_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
    """Both runs pass the check; the other finishes its first file while this one makes the splits.
    This one is refused, and leaves nothing of its own: no file, no folder, no staging folder."""
    out = tmp_path / "demo"
    write_split = demo_data.write_split

    def the_other_run_writes_first(folder, entries):
        theirs = out / "s2ef" / "train" / "data.lmdb"
        theirs.parent.mkdir(parents=True, exist_ok=True)
        theirs.write_bytes(b"the other run's split")
        return write_split(folder, entries)

    monkeypatch.setattr(demo_data, "write_split", the_other_run_writes_first)
    sizes = {split: 1 for split in SPLITS}
    with pytest.raises(UserInputError, match=f"demo file {out / 's2ef' / 'train' / 'data.lmdb'} exists; pass --force"):
        make_demo_data(out, s2ef_sizes=sizes, is2re_sizes=sizes, progress=False)
    assert _files_under(out) == [Path("s2ef/train/data.lmdb")]
    assert (out / "s2ef" / "train" / "data.lmdb").read_bytes() == b"the other run's split"
    assert sorted(p.name for p in out.iterdir()) == ["s2ef"]


def _interrupted(out, signum) -> subprocess.CompletedProcess:
    """``demo-data OUT`` sent ``signum`` once its first file exists (IS2RE train, made after it, keeps
    it busy for seconds more)."""
    process = subprocess.Popen([*eqv2_cmd(), "demo-data", str(out), "--no-progress", *SMALLEST, "--num-is2re-train=20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and not _has_a_file(out):
        assert time.monotonic() < deadline, "demo-data wrote nothing in 300 s"
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _has_a_file(folder) -> bool:
    try:
        return any(p.is_file() for p in folder.rglob("*"))
    except FileNotFoundError:  # a folder that went while it was listed
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_leaves_nothing_and_a_rerun_works(tmp_path, signum):
    out = tmp_path / "demo"
    result = _interrupted(out, signum)
    assert result.returncode == 128 + signum, (result.returncode, result.stderr)
    line = "fairchem-eqv2 demo-data: interrupted; no output was left half-written"
    assert result.stderr.strip().splitlines() == [line]  # and no traceback
    assert not out.exists(), _files_under(out)
    if signum == signal.SIGINT:
        rerun = subprocess.run([*eqv2_cmd(), "demo-data", str(out), "--no-progress", *SMALLEST],
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert len(_files_under(out)) == 2 * len(TASKS) * len(SPLITS)
