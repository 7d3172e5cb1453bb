"""Join per-split fairchem prediction files into one EvalAI submission ``.npz``, validated.

What fairchem-core 1.10 writes (``fairchem --mode predict``, ``OCPTrainer.predict`` then
``BaseTrainer.save_results``), one file per test split:

* path: ``<run_dir>/results/<timestamp_id>/<name>_predictions.npz`` where ``<name>`` is
  ``s2ef`` for ``trainer: forces | equiformerv2_forces``, ``is2re`` for
  ``trainer: energy | equiformerv2_energy`` and ``ocp`` for ``trainer: ocp``;
* ``ids``: str ``[N]``, ``f"{sid}_{fid}"`` when the data has ``fid`` (S2EF), else ``f"{sid}"``;
  sorted and de-duplicated (``np.unique``);
* one array per entry of the config's ``outputs``, float16 unless ``prediction_dtype:
  float32`` (always float32 for ``dataset: oc22_lmdb``):
  system-level outputs such as ``energy`` are ``[N, 1]`` (a ``[N]`` array is accepted too);
  atom-level outputs such as ``forces`` are ``[M, 3]``, free atoms only (``fixed == 0``),
  all systems concatenated;
* ``chunk_idx`` (for ``forces``; ``<key>_chunk_idx`` for other atom-level outputs): int
  ``[N - 1]``, the *split points* ``cumsum(free atoms per system)[:-1]``, so that
  ``np.split(forces, chunk_idx)`` gives one array per id.

IS2RS (``--mode run-relaxations`` with ``task.write_pos: True``) writes
``relaxed_positions.npz`` with ``ids``, ``pos`` ``[M, 3]`` (all atoms) and ``chunk_idx``.

The submission holds every array of every split as ``f"{split}_{key}"`` (e.g.
``ood_ads_forces``), dtypes unchanged, as fairchem's ``scripts/make_submission_file.py``
writes it. Splits: OC20 ``id, ood_ads, ood_cat, ood_both``; OC22 ``id, ood``.

Before writing anything, :func:`make_submission` checks that every split of the dataset is
given (and no other), each file loads without pickle, ``ids`` are unique strings (within a
split and across splits), every array is finite, per-system arrays have one row per id,
``chunk_idx`` is a valid ``[N - 1]`` list of split points into its per-atom array, and all
splits hold the same keys. The file is written to a temporary file next to ``out_path``
and renamed, so a failure never leaves a partial submission.
"""
from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .safe_write import check_destination, write_bytes_atomically
from ..errors import UserInputError

#: EvalAI test splits per dataset, in submission order.
SPLITS: dict[str, tuple[str, ...]] = {
    "OC20": ("id", "ood_ads", "ood_cat", "ood_both"),
    "OC22": ("id", "ood"),
}

#: Atom-level arrays whose split points are stored as plain ``chunk_idx`` (backwards compat).
PLAIN_CHUNK_IDX_KEYS = ("forces", "pos")


class SubmissionError(UserInputError):
    """A prediction input that EvalAI would reject or misread."""


@dataclass(frozen=True)
class SplitPredictions:
    """The arrays of one split, and where they came from (for error messages).

    Attributes:
        split: ``"id"``, ``"ood_ads"``, ...
        source: the file or folder read.
        arrays: ``ids`` ``[N]`` and the prediction arrays, by key.
    """

    split: str
    source: str
    arrays: dict[str, np.ndarray]

    def fail(self, problem: str) -> SubmissionError:
        """A :class:`SubmissionError` naming this split and its source."""
        return SubmissionError(f"split '{self.split}' ({self.source}): {problem}")


def make_submission(
    split_paths: Mapping[str, str | os.PathLike | None],
    out_path: str | os.PathLike,
    dataset: str = "OC20",
    is2re_relaxations: bool = False,
    hybrid: bool = False,
    overwrite: bool = False,
) -> Path:
    """Validate the per-split predictions and write the EvalAI submission file.

    Args:
        split_paths: split name -> prediction file (``id``, ``ood_ads``, ... see :data:`SPLITS`);
            ``None`` values count as absent. With ``is2re_relaxations``: folders of
            ``*.traj`` files instead (the energy of each file's last frame is the
            prediction, the file name is the id); with ``hybrid`` as well: S2EF prediction
            files whose ``"<sid>_<fid>"`` ids become ``"<sid>"``.
        out_path: the submission file; ``.npz`` is appended if missing.
        dataset: ``"OC20"`` or ``"OC22"``.
        is2re_relaxations: build IS2RE energies from relaxations (see ``split_paths``).
        hybrid: with ``is2re_relaxations``, read S2EF prediction files instead of trajectories.
        overwrite: replace ``out_path`` if it exists (never when it is one of the inputs).

    Returns:
        the path written.

    Raises:
        SubmissionError: naming the split, the file and the problem; nothing is written.
    """
    splits = _required_splits(split_paths, dataset)
    if hybrid and not is2re_relaxations:
        raise SubmissionError("--hybrid only applies together with --is2re-relaxations")
    out_path = _npz_path(out_path)
    check_destination(
        out_path, [split_paths[split] for split in splits], overwrite=overwrite, what="--out-path", error=SubmissionError
    )
    predictions = [_load_split(split, Path(split_paths[split]), is2re_relaxations, hybrid) for split in splits]
    for split_predictions in predictions:
        validate_split(split_predictions, dataset)
    validate_across_splits(predictions)
    return write_npz_atomically(
        out_path, submission_arrays(predictions), overwrite=overwrite, what="--out-path", error=SubmissionError
    )


def load_prediction_file(split: str, path: Path) -> SplitPredictions:
    """The arrays of a fairchem ``*_predictions.npz`` (or ``relaxed_positions.npz``) file."""
    if not path.is_file():
        raise SubmissionError(f"split '{split}': prediction file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise SubmissionError(
                f"split '{split}' ({path}): holds pickled object arrays; EvalAI needs plain arrays "
                "(ids as a str array, numbers as float/int arrays)"
            ) from None
        raise SubmissionError(f"split '{split}' ({path}): not a readable .npz file ({error})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise SubmissionError(f"split '{split}' ({path}): not a readable .npz file ({error})") from None
    return SplitPredictions(split, str(path), arrays)


def load_relaxation_trajectories(split: str, folder: Path) -> SplitPredictions:
    """IS2RE predictions from ML relaxations: ``ids`` = ``*.traj`` file names, ``energy`` =
    the energy of each trajectory's last frame (float64 ``[N]``)."""
    import ase.io

    if not folder.is_dir():
        raise SubmissionError(f"split '{split}': trajectory folder not found: {folder}")
    files = sorted(folder.glob("*.traj"))
    if not files:
        raise SubmissionError(f"split '{split}' ({folder}): no *.traj files in the folder")
    energies = []
    for file in files:
        try:
            energies.append(ase.io.read(file, index=-1).get_potential_energy())
        except Exception as error:  # ase raises many types for unreadable or label-less files
            raise SubmissionError(f"split '{split}' ({file}): cannot read the last frame's energy ({error})") from None
    arrays = {"ids": np.array([file.stem for file in files]), "energy": np.array(energies)}
    return SplitPredictions(split, str(folder), arrays)


def load_hybrid_predictions(split: str, path: Path) -> SplitPredictions:
    """IS2RE predictions from an S2EF prediction file: ids ``"<sid>_<fid>"`` -> ``"<sid>"``
    and its ``energy`` array unchanged."""
    s2ef = load_prediction_file(split, path)
    if "ids" not in s2ef.arrays or "energy" not in s2ef.arrays:
        raise s2ef.fail(f"--hybrid needs 'ids' and 'energy' arrays, found {sorted(s2ef.arrays)}")
    validate_split(s2ef, dataset=None)
    sids = np.array([str(system_id).split("_")[0] for system_id in s2ef.arrays["ids"]])
    arrays = {"ids": sids, "energy": s2ef.arrays["energy"]}
    return SplitPredictions(split, f"{path}, ids with the frame id dropped", arrays)


def validate_split(predictions: SplitPredictions, dataset: str | None) -> None:
    """Check one split's arrays; raise :class:`SubmissionError` on the first problem."""
    arrays = predictions.arrays
    ids = _validated_ids(predictions)
    per_atom = _per_atom_keys(predictions)
    if len(arrays) == 1:
        raise predictions.fail("holds only 'ids', no predictions")
    for key, array in arrays.items():
        if key == "ids":
            continue
        _check_numeric(predictions, key, array)
        if key in per_atom.values():
            continue
        if key in per_atom:
            _check_per_atom(predictions, key, array, arrays[per_atom[key]], num_systems=len(ids))
        else:
            _check_per_system(predictions, key, array, num_systems=len(ids))
    if dataset == "OC22" and "energy" in arrays and arrays["energy"].dtype == np.float16:
        raise predictions.fail(
            "energy is float16, too coarse for OC22 total energies (~0.25 eV steps at 500 eV); "
            "predict with --task.prediction_dtype=float32 (fairchem does so by itself for dataset: oc22_lmdb)"
        )


def validate_across_splits(predictions: list[SplitPredictions]) -> None:
    """All splits hold the same keys, and no id appears in two splits."""
    reference = predictions[0]
    for other in predictions[1:]:
        if set(other.arrays) != set(reference.arrays):
            raise other.fail(
                f"holds keys {sorted(other.arrays)} but split '{reference.split}' holds "
                f"{sorted(reference.arrays)}; all splits must come from the same task"
            )
    seen: dict[str, str] = {}
    for split_predictions in predictions:
        for system_id in split_predictions.arrays["ids"].tolist():
            if system_id in seen:
                raise split_predictions.fail(
                    f"id '{system_id}' also appears in split '{seen[system_id]}'; EvalAI needs ids "
                    "unique across splits (is the same file given for two splits?)"
                )
        seen.update(dict.fromkeys(split_predictions.arrays["ids"].tolist(), split_predictions.split))


def submission_arrays(predictions: list[SplitPredictions]) -> dict[str, np.ndarray]:
    """``{f"{split}_{key}": array}`` over all splits and keys, arrays unchanged."""
    return {
        f"{split_predictions.split}_{key}": array
        for split_predictions in predictions
        for key, array in split_predictions.arrays.items()
    }


def write_npz_atomically(path: Path, arrays: Mapping[str, np.ndarray], **options) -> Path:
    """``np.savez_compressed(path, **arrays)``, all or nothing (see :func:`.replaced_atomically`);
    ``options`` (``overwrite``, ``what``, ``error``) as for :func:`.write_bytes_atomically`."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomically(path, buffer.getvalue(), **options)


def _required_splits(split_paths: Mapping[str, object], dataset: str) -> tuple[str, ...]:
    if dataset not in SPLITS:
        raise SubmissionError(f"unknown dataset '{dataset}'; expected one of {', '.join(SPLITS)}")
    splits = SPLITS[dataset]
    given = {split for split, path in split_paths.items() if path is not None}
    missing = [split for split in splits if split not in given]
    if missing:
        flags = ", ".join(_flag(split) for split in missing)
        raise SubmissionError(f"{dataset} needs predictions for every split; missing {flags}")
    extra = sorted(given - set(splits))
    if extra:
        flags = ", ".join(_flag(split) for split in extra)
        raise SubmissionError(f"{flags} is not a {dataset} split ({dataset} splits: {', '.join(splits)})")
    return splits


def _load_split(split: str, path: Path, is2re_relaxations: bool, hybrid: bool) -> SplitPredictions:
    if not is2re_relaxations:
        return load_prediction_file(split, path)
    if hybrid:
        return load_hybrid_predictions(split, path)
    return load_relaxation_trajectories(split, path)


def _validated_ids(predictions: SplitPredictions) -> np.ndarray:
    ids = predictions.arrays.get("ids")
    if ids is None:
        raise predictions.fail(f"no 'ids' array (found {sorted(predictions.arrays)})")
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise predictions.fail(f"'ids' must be a 1-D str array, got dtype {ids.dtype} shape {ids.shape}")
    if len(ids) == 0:
        raise predictions.fail("'ids' is empty")
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        duplicates = values[counts > 1]
        shown = ", ".join(f"'{value}'" for value in duplicates[:5].tolist())
        raise predictions.fail(f"{len(duplicates)} duplicate id(s) in 'ids', e.g. {shown}")
    if (np.char.str_len(ids) == 0).any():
        raise predictions.fail("'ids' holds an empty string")
    return ids


def _per_atom_keys(predictions: SplitPredictions) -> dict[str, str]:
    """``{atom-level key: its split-points key}``, e.g. ``{"forces": "chunk_idx"}``."""
    arrays = predictions.arrays
    pairs = {}
    for key in arrays:
        if key.endswith("_chunk_idx"):
            target = key[: -len("_chunk_idx")]
            if target not in arrays:
                raise predictions.fail(f"'{key}' given but no '{target}' array")
            pairs[target] = key
    plain = [key for key in PLAIN_CHUNK_IDX_KEYS if key in arrays and key not in pairs]
    if len(plain) > 1:
        raise predictions.fail(f"one 'chunk_idx' for several atom-level arrays {plain}")
    if plain:
        if "chunk_idx" not in arrays:
            raise predictions.fail(f"'{plain[0]}' given without 'chunk_idx' (its per-system split points)")
        pairs[plain[0]] = "chunk_idx"
    elif "chunk_idx" in arrays:
        raise predictions.fail(f"'chunk_idx' given but no atom-level array ({' or '.join(PLAIN_CHUNK_IDX_KEYS)})")
    return pairs


def _check_numeric(predictions: SplitPredictions, key: str, array: np.ndarray) -> None:
    if array.dtype.kind not in "fiu":
        raise predictions.fail(f"'{key}' must be a numeric array, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise predictions.fail(f"'{key}' holds {bad} NaN/inf value(s)")


def _check_per_system(predictions: SplitPredictions, key: str, array: np.ndarray, num_systems: int) -> None:
    if array.ndim == 0 or array.shape[0] != num_systems:
        raise predictions.fail(f"'{key}' has shape {array.shape}, expected one row per id ({num_systems})")
    if key == "energy" and array.shape not in ((num_systems,), (num_systems, 1)):
        raise predictions.fail(f"'energy' has shape {array.shape}, expected ({num_systems},) or ({num_systems}, 1)")


def _check_per_atom(
    predictions: SplitPredictions, key: str, array: np.ndarray, chunk_idx: np.ndarray, num_systems: int
) -> None:
    """``array`` ``[M, ...]`` split by ``chunk_idx`` ``[N - 1]`` into one block per id."""
    chunk_key = "chunk_idx" if key in PLAIN_CHUNK_IDX_KEYS else f"{key}_chunk_idx"
    if key in PLAIN_CHUNK_IDX_KEYS and (array.ndim != 2 or array.shape[1] != 3):
        raise predictions.fail(f"'{key}' has shape {array.shape}, expected (num_atoms, 3)")
    if array.ndim == 0:
        raise predictions.fail(f"'{key}' is a scalar, expected one row per atom")
    if chunk_idx.dtype.kind not in "iu" or chunk_idx.ndim != 1:
        raise predictions.fail(f"'{chunk_key}' must be a 1-D int array, got dtype {chunk_idx.dtype} shape {chunk_idx.shape}")
    rows = array.shape[0]
    if len(chunk_idx) != num_systems - 1:
        hint = ""
        if len(chunk_idx) == num_systems and chunk_idx.sum() == rows:
            hint = " (these look like atom counts; fairchem stores split points, np.cumsum(counts)[:-1])"
        raise predictions.fail(
            f"'{chunk_key}' has {len(chunk_idx)} entries, expected {num_systems - 1} split points "
            f"for {num_systems} ids{hint}"
        )
    if len(chunk_idx) and (chunk_idx[0] < 0 or (np.diff(chunk_idx) < 0).any()):
        raise predictions.fail(f"'{chunk_key}' must be non-decreasing split points starting at >= 0")
    if len(chunk_idx) and chunk_idx[-1] > rows:
        raise predictions.fail(
            f"'{key}' has {rows} rows but '{chunk_key}' points up to row {int(chunk_idx[-1])}: "
            "the per-atom rows do not match the per-system chunks"
        )
    if rows == 0:
        raise predictions.fail(f"'{key}' is empty")


def _npz_path(out_path: str | os.PathLike) -> Path:
    text = os.fspath(out_path)
    return Path(text if text.endswith(".npz") else text + ".npz")


def _flag(split: str) -> str:
    return "--" + split.replace("_", "-")
