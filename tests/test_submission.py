"""EvalAI submission files from fairchem prediction files: happy paths and every refusal."""
from __future__ import annotations

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory

from fairchem_equiformerv2.tools.cli import main
from fairchem_equiformerv2.tools.submission import SPLITS, SubmissionError, make_submission

OC20 = SPLITS["OC20"]


def _s2ef_predictions(first_sid: int, num_systems: int = 3, dtype=np.float16, seed: int = 0) -> dict:
    """Arrays as fairchem's predict + save_results write them for S2EF (free atoms only)."""
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(f"{first_sid + i}_{fid}" for i in range(num_systems) for fid in (0, 7)))
    free_atoms = rng.integers(3, 9, size=len(ids))
    return {
        "energy": rng.normal(size=(len(ids), 1)).astype(dtype),
        "forces": rng.normal(size=(int(free_atoms.sum()), 3)).astype(dtype),
        "chunk_idx": np.cumsum(free_atoms)[:-1],
        "ids": ids,
    }


def _is2re_predictions(first_sid: int, num_systems: int = 4, dtype=np.float16) -> dict:
    ids = np.array(sorted(str(first_sid + i) for i in range(num_systems)))
    return {"energy": np.linspace(-1, 1, num_systems, dtype=dtype)[:, None], "ids": ids}


def _write_splits(folder, splits, make_arrays, name="predictions.npz") -> dict:
    """One prediction file per split (ids disjoint across splits); returns split -> path."""
    paths = {}
    for index, split in enumerate(splits):
        (folder / split).mkdir()
        paths[split] = folder / split / name
        np.savez_compressed(paths[split], **make_arrays(first_sid=1000 * index))
    return paths


def _files_in(folder) -> set[str]:
    return {path.name for path in folder.iterdir()}


@pytest.fixture
def s2ef_paths(tmp_path):
    return _write_splits(tmp_path, OC20, _s2ef_predictions, name="s2ef_predictions.npz")


def _refused(tmp_path, split_paths, match, **kwargs):
    """``make_submission`` raises naming the problem and leaves no file behind."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(SubmissionError, match=match):
        make_submission(split_paths, out_dir / "submission.npz", **kwargs)
    assert _files_in(out_dir) == set()


def _rewrite(path, **changes):
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    np.savez_compressed(path, **arrays)


# Happy paths.


def test_oc20_s2ef(tmp_path, s2ef_paths):
    out = make_submission(s2ef_paths, tmp_path / "submission", dataset="OC20")
    assert out == tmp_path / "submission.npz"
    with np.load(out) as submission:
        assert set(submission.files) == {f"{split}_{key}" for split in OC20 for key in ("ids", "energy", "forces", "chunk_idx")}
        for split, path in s2ef_paths.items():
            with np.load(path) as source:
                for key in source.files:
                    np.testing.assert_array_equal(submission[f"{split}_{key}"], source[key])
                    assert submission[f"{split}_{key}"].dtype == source[key].dtype  # float16 stays float16
    assert not [name for name in _files_in(tmp_path) if name.endswith(".tmp")]


def test_oc20_is2re(tmp_path):
    paths = _write_splits(tmp_path, OC20, _is2re_predictions, name="is2re_predictions.npz")
    out = make_submission(paths, tmp_path / "is2re_submission.npz")
    with np.load(out) as submission:
        assert set(submission.files) == {f"{split}_{key}" for split in OC20 for key in ("ids", "energy")}
        assert submission["ood_cat_ids"].tolist() == ["2000", "2001", "2002", "2003"]


def test_oc22_s2ef_float32(tmp_path):
    paths = _write_splits(tmp_path, SPLITS["OC22"], lambda first_sid: _s2ef_predictions(first_sid, dtype=np.float32))
    out = make_submission(paths, tmp_path / "oc22.npz", dataset="OC22")
    with np.load(out) as submission:
        assert {name.split("_")[0] for name in submission.files} == {"id", "ood"}
        assert submission["ood_energy"].dtype == np.float32


def test_is2re_from_relaxation_trajectories(tmp_path):
    folders = {}
    for index, split in enumerate(OC20):
        folders[split] = tmp_path / split
        folders[split].mkdir()
        for sid in (index * 10, index * 10 + 1):
            with Trajectory(folders[split] / f"{sid}.traj", "w") as trajectory:
                for energy in (1.0, -float(sid)):  # the last frame counts
                    atoms = fcc111("Cu", size=(1, 1, 2), vacuum=5.0)
                    atoms.calc = SinglePointCalculator(atoms, energy=energy)
                    trajectory.write(atoms)
    out = make_submission(folders, tmp_path / "relaxed.npz", is2re_relaxations=True)
    with np.load(out) as submission:
        assert submission["ood_ads_ids"].tolist() == ["10", "11"]
        assert submission["ood_ads_energy"].tolist() == [-10.0, -11.0]


def test_is2re_hybrid_drops_frame_ids(tmp_path):
    def one_frame_per_system(first_sid):
        arrays = _s2ef_predictions(first_sid)
        keep = np.array([system_id.endswith("_0") for system_id in arrays["ids"]])
        return {"ids": arrays["ids"][keep], "energy": arrays["energy"][keep]}

    paths = _write_splits(tmp_path, OC20, one_frame_per_system)
    out = make_submission(paths, tmp_path / "hybrid.npz", is2re_relaxations=True, hybrid=True)
    with np.load(out) as submission:
        assert submission["id_ids"].tolist() == ["0", "1", "2"]


def test_cli_writes_submission(tmp_path, s2ef_paths, capsys):
    argv = ["make-submission", "--out-path", str(tmp_path / "cli.npz")]
    for split, path in s2ef_paths.items():
        argv += [f"--{split.replace('_', '-')}", str(path)]
    assert main(argv) == 0
    assert (tmp_path / "cli.npz").is_file()
    assert "cli.npz" in capsys.readouterr().out


# Refusals: each names the problem and writes nothing.


def test_refuses_missing_split(tmp_path, s2ef_paths):
    del s2ef_paths["ood_both"]
    _refused(tmp_path, s2ef_paths, "missing --ood-both")


def test_refuses_split_of_other_dataset(tmp_path, s2ef_paths):
    _refused(tmp_path, {**s2ef_paths, "ood": s2ef_paths["id"]}, "--ood is not a OC20 split")


def test_refuses_missing_file(tmp_path, s2ef_paths):
    s2ef_paths["ood_cat"].unlink()
    _refused(tmp_path, s2ef_paths, "split 'ood_cat': prediction file not found")


def test_refuses_duplicate_ids_within_split(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["ood_ads"]) as npz:
        ids = npz["ids"].copy()
    ids[1] = ids[0]
    _rewrite(s2ef_paths["ood_ads"], ids=ids)
    _refused(tmp_path, s2ef_paths, r"split 'ood_ads' .*duplicate id")


def test_refuses_ids_shared_across_splits(tmp_path, s2ef_paths):
    _refused(tmp_path, {**s2ef_paths, "ood_both": s2ef_paths["id"]}, r"split 'ood_both'.*also appears in split 'id'")


def test_refuses_nan(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["id"]) as npz:
        forces = npz["forces"].copy()
    forces[2, 1] = np.nan
    _rewrite(s2ef_paths["id"], forces=forces)
    _refused(tmp_path, s2ef_paths, r"split 'id' .*'forces' holds 1 NaN/inf")


def test_refuses_inf_energy(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["ood_cat"]) as npz:
        energy = npz["energy"].copy()
    energy[0] = np.inf
    _rewrite(s2ef_paths["ood_cat"], energy=energy)
    _refused(tmp_path, s2ef_paths, r"'energy' holds 1 NaN/inf")


def test_refuses_forces_chunk_idx_mismatch(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["ood_ads"]) as npz:
        forces = npz["forces"]
        chunk_idx = npz["chunk_idx"]
    _rewrite(s2ef_paths["ood_ads"], forces=forces[: chunk_idx[-1] - 1])
    _refused(tmp_path, s2ef_paths, r"split 'ood_ads' .*rows do not match")


def test_refuses_atom_counts_given_as_chunk_idx(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["id"]) as npz:
        counts = np.diff(np.concatenate([[0], npz["chunk_idx"], [len(npz["forces"])]]))
    _rewrite(s2ef_paths["id"], chunk_idx=counts)
    _refused(tmp_path, s2ef_paths, r"look like atom counts")


def test_refuses_forces_without_chunk_idx(tmp_path, s2ef_paths):
    _rewrite(s2ef_paths["ood_both"], chunk_idx=None)
    _refused(tmp_path, s2ef_paths, r"'forces' given without 'chunk_idx'")


@pytest.mark.parametrize(
    ("key", "bad_shape", "match"),
    [
        ("energy", lambda n, m: (n + 1, 1), r"'energy' has shape .*one row per id"),
        ("energy", lambda n, m: (n, 2), r"'energy' has shape .*expected"),
        ("forces", lambda n, m: (m, 2), r"'forces' has shape .*\(num_atoms, 3\)"),
        ("ids", lambda n, m: (n, 1), r"'ids' must be a 1-D str array"),
    ],
)
def test_refuses_wrong_shapes(tmp_path, s2ef_paths, key, bad_shape, match):
    with np.load(s2ef_paths["ood_cat"]) as npz:
        shape = bad_shape(len(npz["ids"]), len(npz["forces"]))
        value = np.resize(npz[key], shape)
    _rewrite(s2ef_paths["ood_cat"], **{key: value})
    _refused(tmp_path, s2ef_paths, match)


def test_refuses_mixed_tasks(tmp_path, s2ef_paths):
    np.savez_compressed(s2ef_paths["ood_cat"], **_is2re_predictions(first_sid=5000))
    _refused(tmp_path, s2ef_paths, r"split 'ood_cat' .*same task")


def test_refuses_object_arrays(tmp_path, s2ef_paths):
    with np.load(s2ef_paths["id"]) as npz:
        ids = npz["ids"].astype(object)
    np.savez_compressed(s2ef_paths["id"], ids=ids, energy=np.zeros((len(ids), 1)))
    _refused(tmp_path, s2ef_paths, "pickled object arrays")


def test_refuses_float16_energies_for_oc22(tmp_path):
    paths = _write_splits(tmp_path, SPLITS["OC22"], _is2re_predictions)
    _refused(tmp_path, paths, "float16", dataset="OC22")


def test_failed_write_leaves_previous_file(tmp_path, s2ef_paths):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "submission.npz").write_bytes(b"previous")
    with np.load(s2ef_paths["id"]) as npz:
        energy = npz["energy"].copy()
    energy[:] = np.nan
    _rewrite(s2ef_paths["id"], energy=energy)
    with pytest.raises(SubmissionError):
        make_submission(s2ef_paths, out_dir / "submission.npz")
    assert _files_in(out_dir) == {"submission.npz"}
    assert (out_dir / "submission.npz").read_bytes() == b"previous"


def test_cli_reports_user_error_in_one_line(tmp_path, s2ef_paths, capsys):
    argv = ["make-submission", "--id", str(s2ef_paths["id"]), "--out-path", str(tmp_path / "x.npz")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "missing --ood-ads" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "x.npz").exists()
